"""Medical-CXR-VQA question generation: standardised findings + image metadata -> question/answer pairs.

Six question types, as in Medical-CXR-VQA (reference/medical_cxr_vqa.md §6): abnormality, presence,
view, location, level, type. Templates are data; answers are computed from the ``findings`` table; every
random choice comes from one seed (one generator per question type, so changing one type never
reshuffles another).

Two styles (``vqa.style``):
- ``medical_cxr_vqa`` (default, a drop-in replacement): the original's 13 fixed wordings
  (``libs/medical_cxr_vqa_templates.yaml``) and its answer forms: ``PA view`` / ``AP view``, locations
  ``<words> area``, side ``left side`` / ``right side``, levels as the report's level words (``small``,
  ``large``; recovered from the row's raw name / evidence, the ordinal level when there is none or it
  is rarer than ``level_word_min_count``), and the region question answered with one finding;
- ``clean``: our paraphrase pools (``libs/vqa_templates.yaml``), answers ``PA``, ``right basal``,
  ``left``, the five ordinal levels, and every finding at the asked region.
The fixes below hold in both styles.

What differs from the original ``question_gen.py`` on purpose:
- Findings are joined on their canonical name (integer codes), never by substring, so pericardial vs
  pleural effusion or "enlarged" vs cardiomegaly cannot be confused; a name outside the vocabulary
  (``unknown`` or anything else) is counted and skipped, never a crash.
- A location or left/right question is built from the rows of ONE (study, finding) group: the finding
  and its location cannot come from different findings.
- Yes/no questions are paired: for every "yes" question there is a "no" question with the same
  template, finding and location (presence), the same template (abnormality) or the same template
  and asked view (view). The question text alone therefore carries no information about the answer.
- "No" findings are drawn from the study's explicit negations and from findings the report does not
  mention, with the name distribution of the "yes" questions; never from uncertain findings, and
  never "unmentioned" in a study whose report has a positive finding we could not name.
- Studies without a frontal (PA/AP) image get no questions and are listed in ``rejects``; so is a
  frontal study left without any question. Normal studies (the key-information stage's per-study
  ``status``; without that table: findings rows but no positive or uncertain one) get the abnormality
  question ("no"); a study the stage did not read, or read as ``unknown``, is never called normal.
- ``split`` is the studies table's official split with MIMIC's names (train / validate / test). The
  released Medical-CXR-VQA CSV has no split column; its predecessor split CSV rows 80/10/10 by position.
- The view question is asked for as many AP as PA images in every split that has both views (the
  original kept 5 % of AP); a split with one view (a PA-only corpus) keeps all its view questions.
  Every rule that removes candidates logs how many, per type.

Outputs: ``questions.parquet`` (QUESTIONS), ``questions.csv`` (the original's columns), ``stats``
(VQA_STATS, per type and split), ``leak.csv`` (VQA_LEAK: a text-only classifier against the majority
answer) and ``rejects``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from workflow import cli
from workflow.contract import QUESTIONS, VQA_LEAK, VQA_STATS
from workflow.tables import Rejects, atomic_path, summary, write_table

log = logging.getLogger(__name__)

STAGE = "vqa"
QUESTION_TYPES = ("abnormality", "presence", "view", "location", "level", "type")
VIEWS = ("PA", "AP")
# The original's CSV, for drop-in use with code that reads the released medical_cxr_vqa_questions.csv.
CSV_COLUMNS = ["study_id", "subject_id", "question_type", "question", "answer"]
_VIEW_MEANING = {"postero-anterior": "PA", "antero-posterior": "AP"}
_PRESENCE_CODE = {"positive": 0, "negative": 1, "uncertain": 2}
# The released Medical-CXR-VQA 1.0.0 per type (PhysioNet abstract; 780,014 pairs), for the type mix.
RELEASED_COUNTS = {
    "abnormality": 190_525,
    "presence": 211_560,
    "view": 92_048,
    "location": 104_680,
    "level": 111_715,
    "type": 69_486,
}
REPO = Path(__file__).resolve().parents[1]


@dataclass
class VqaConfig:
    """The ``vqa:`` section of config.yaml (config.schema.yaml documents every key)."""

    seed: int = 0
    # medical_cxr_vqa: the original's answer forms ("PA view", "right basal area", "left side", the
    # report's level words, one finding per region question); clean: our forms ("PA", "right basal",
    # "left", five ordinal levels, every finding at the region)
    style: str = "medical_cxr_vqa"
    # medical_cxr_vqa style: a level word seen on fewer positive findings than this is answered with its
    # ordinal level instead (the original's frequency threshold of 10 on attribute words)
    level_word_min_count: int = 10
    # canonical names that never appear in a question (devices are not abnormalities; Rule 4 of the paper)
    exclude_names: tuple[str, ...] = ("support device",)
    # share of normal studies that get the abnormality yes/no question ("no"); the original asked half
    abnormality_no_finding_rate: float = 1.0
    # how much likelier an explicitly negated finding is picked as a "no" than an unmentioned one
    explicit_negative_weight: float = 4.0
    # share of located "no" presence questions made by moving a one-sided finding to the other side
    laterality_flip_share: float = 0.5
    # keep as many AP as PA view questions per split where the split has both views (the original kept
    # 5 % of AP studies instead); a split with one view keeps all its view questions
    view_balance: bool = True
    # presence/abnormality/view questions used by the text-only leak probe (0 = no probe)
    leak_probe_max: int = 200_000


# ----------------------------------------------------------------------------------------------------
# Libraries: templates, vocabulary, Medical-CXR-VQA display names


@dataclass
class Templates:
    """All templates, flattened: global index -> (type, family, id, text); families with weights."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    # (type, family) -> (weight, global template indices)
    families: dict[tuple[str, str], tuple[float, np.ndarray]] = field(default_factory=dict)
    # how {location} is filled: "phrase" ("the left lung base") or "words" (the canonical words, "left basal")
    location_slot: str = "phrase"

    def family(self, qtype: str, fam: str) -> np.ndarray:
        return self.families[(qtype, fam)][1]

    def weight(self, qtype: str, fam: str) -> float:
        return self.families[(qtype, fam)][0]


REQUIRED_FAMILIES = {
    "abnormality": ("list", "region", "yesno"),
    "presence": ("plain", "located"),
    "view": ("open", "yesno"),
    "location": ("where", "side"),
    "level": ("open",),
    "type": ("open",),
}
_SLOTS = {
    ("abnormality", "region"): {"location"},
    ("presence", "plain"): {"name"},
    ("presence", "located"): {"name", "location"},
    ("view", "yesno"): {"view"},
    ("location", "where"): {"name"},
    ("location", "side"): {"name"},
    ("level", "open"): {"name"},
    ("type", "open"): {"name"},
}
LOCATION_SLOT_FORMS = ("phrase", "words")
# the two answer/wording styles (config `vqa.style`) and the template file each uses by default
STYLES = ("medical_cxr_vqa", "clean")
STYLE_TEMPLATES = {
    "medical_cxr_vqa": REPO / "libs" / "medical_cxr_vqa_templates.yaml",
    "clean": REPO / "libs" / "vqa_templates.yaml",
}


def load_templates(path: str | Path, key: str = "vqa.templates") -> Templates:
    """Read and check a template file; every problem raises naming the config ``key``, the file and the entry.

    Checked: the file exists and is a mapping; only known question types, families and template keys;
    every family present with at least one template; ids unique; slots as the family needs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such template file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{key}: {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{key}: {path} must be a mapping of question types")
    unknown = sorted(set(data) - set(REQUIRED_FAMILIES) - {"slots"})
    if unknown:
        raise ValueError(f"{key}: {path}: unknown key(s) {unknown}; expected {[*REQUIRED_FAMILIES, 'slots']}")
    slots_cfg = data.get("slots") or {}
    if set(slots_cfg) - {"location"} or slots_cfg.get("location", "phrase") not in LOCATION_SLOT_FORMS:
        raise ValueError(
            f"{key}: {path}: slots must be {{location: {' | '.join(LOCATION_SLOT_FORMS)}}}, got {slots_cfg}"
        )
    out = Templates(location_slot=slots_cfg.get("location", "phrase"))
    for qtype, fams in REQUIRED_FAMILIES.items():
        given = data.get(qtype) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{key}: {path}: {qtype} must be a mapping of families {list(fams)}")
        extra = sorted(set(given) - set(fams))
        if extra:
            raise ValueError(f"{key}: {path}: unknown family {qtype}.{extra[0]}; {qtype} has {list(fams)}")
        for fam in fams:
            spec = given.get(fam)
            if not spec or not spec.get("templates"):
                raise ValueError(f"{key}: {path}: no templates for {qtype}.{fam}")
            bad = sorted(set(spec) - {"weight", "templates"})
            if bad:
                raise ValueError(f"{key}: {path}: unknown key {qtype}.{fam}.{bad[0]} (weight, templates)")
            idx = []
            for t in spec["templates"]:
                if not isinstance(t, dict) or set(t) != {"id", "text"}:
                    raise ValueError(
                        f"{key}: {path}: template of {qtype}.{fam} needs exactly id and text: {t}"
                    )
                slots = set(re.findall(r"{(\w+)}", t["text"]))
                if slots != _SLOTS.get((qtype, fam), set()):
                    raise ValueError(
                        f"{key}: {path}: template {t['id']} has slots {sorted(slots)}, "
                        f"{qtype}.{fam} needs {sorted(_SLOTS.get((qtype, fam), set()))}"
                    )
                if t["id"] in out.ids:
                    raise ValueError(f"{key}: {path}: duplicate template id {t['id']}")
                idx.append(len(out.ids))
                out.ids.append(t["id"])
                out.texts.append(t["text"])
            out.families[(qtype, fam)] = (float(spec.get("weight", 1)), np.array(idx, dtype=np.int64))
    return out


def load_vocabulary(path: str | Path) -> list[str]:
    return list(yaml.safe_load(Path(path).read_text())["findings"])


def read_name_lib(path: str | Path | None, key: str = "vqa.names") -> pd.DataFrame | None:
    """The key-information stage's findings lib (csv / yaml / parquet with ``name`` and ``vqa_name``).

    None only when no lib is configured; a configured path that does not exist or lacks the columns is an
    error naming ``key`` (a misspelt path must not quietly change the questions).
    """
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: no such findings lib: {p} (set it to null for canonical names)")
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
    elif p.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(p.read_text())
        df = pd.DataFrame(raw.get("findings", raw) if isinstance(raw, dict) else raw)
    else:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    if not {"name", "vqa_name"} <= set(df.columns):
        raise ValueError(f"{key}: {p} has no name and vqa_name columns (columns: {list(df.columns)})")
    return pd.DataFrame(
        {
            "name": df["name"].astype(str).str.strip(),
            "vqa_name": df["vqa_name"].fillna("").astype(str).str.strip(),
        }
    )


def load_display_names(path: str | Path | None, names: list[str]) -> list[str]:
    """Canonical name -> the name questions and answers use (Medical-CXR-VQA's ``vqa_name`` when known).

    No lib (None) or an empty value falls back to the canonical name.
    """
    df = read_name_lib(path)
    mapping = {} if df is None else dict(zip(df["name"], df["vqa_name"], strict=True))
    return [mapping.get(n) or n for n in names]


def left_out_names(path: str | Path | None) -> list[str]:
    """Findings the lib gives an empty ``vqa_name``: Medical-CXR-VQA leaves them out (e.g. devices)."""
    df = read_name_lib(path)
    return [] if df is None else sorted(df.loc[df["vqa_name"] == "", "name"])


# ----------------------------------------------------------------------------------------------------
# Location phrases ("left basal" -> "the left lung base")

_STRUCTURE_PLURAL = {
    "lung": "lungs",
    "lobe": "lobes",
    "lingula": "lingula",
    "hemithorax": "hemithoraces",
    "costophrenic angle": "costophrenic angles",
    "hemidiaphragm": "hemidiaphragms",
    "fissure": "fissures",
    "hilum": "hila",
    "mediastinum": "mediastinum",
    "rib": "ribs",
    "clavicle": "clavicles",
    "spine": "spine",
    "chest wall": "chest walls",
}
_LATERALITIES = ("left", "right", "bilateral")
_ZONES = {
    "upper",
    "middle",
    "lower",
    "apical",
    "basal",
    "perihilar",
    "retrocardiac",
    "lateral",
    "medial",
    "peripheral",
    "central",
    "mid",
}
_ZONE_NOUN = {  # zones that name a place on their own: (singular, plural)
    "basal": ("lung base", "lung bases"),
    "apical": ("lung apex", "lung apices"),
    "perihilar": ("perihilar region", "perihilar regions"),
    "retrocardiac": ("retrocardiac region", "retrocardiac region"),
}


def location_phrase(location: str) -> str:
    """A readable noun phrase for a canonical location (laterality zone structure tokens).

    "left lower lobe" -> "the left lower lobe", "left basal" -> "the left lung base",
    "bilateral" -> "both lungs", "retrocardiac" -> "the retrocardiac region".
    """
    loc = " ".join(location.split())
    structure = next((s for s in _STRUCTURE_PLURAL if loc == s or loc.endswith(" " + s)), None)
    toks = (loc[: -len(structure)] if structure else loc).split()
    lat = toks[0] if toks and toks[0] in _LATERALITIES else None
    zones = toks[1:] if lat else toks
    if (not zones and not lat and not structure) or any(z not in _ZONES for z in zones):
        return f"the {loc} region"
    if structure == "lung" and any(z in _ZONE_NOUN for z in zones):
        structure = None  # "right basal lung" is the right lung base
    noun_zone = None if structure else next((z for z in reversed(zones) if z in _ZONE_NOUN), None)
    adjectives = [z for z in zones if z != noun_zone]
    if structure:
        singular, plural = structure, _STRUCTURE_PLURAL[structure]
    elif noun_zone:
        singular, plural = _ZONE_NOUN[noun_zone]
    else:
        singular, plural = "lung", "lungs"
    if lat == "bilateral":
        if plural == singular:
            return " ".join(["the bilateral", *adjectives, singular])
        return " ".join(["both", *adjectives, plural])
    # no laterality and no named structure ("basal", "upper"): both sides are meant
    noun = singular if (lat or structure) else plural
    return " ".join(["the", *([lat] if lat else []), *adjectives, noun])


def flip_laterality(location: str) -> str | None:
    toks = location.split(" ", 1)
    swap = {"left": "right", "right": "left"}.get(toks[0])
    return None if swap is None else " ".join([swap, *toks[1:]])


# ----------------------------------------------------------------------------------------------------
# Level words (medical_cxr_vqa style)


def load_level_lib(path: str | Path) -> dict[str, str]:
    """libs/levels.csv: surface phrase -> ordinal level."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(df["phrase"].str.strip().str.lower(), df["level"].str.strip(), strict=True))


def level_words(level: pd.Series, text: pd.Series, lib: dict[str, str]) -> pd.Series:
    """The report's own level word of each finding row, as the original's key information writes it.

    ``level`` is the standardised (ordinal) level, ``text`` the row's surface text (raw name and
    evidence). The word is the first phrase of ``levels.csv`` in the text that maps to the row's level
    (the longest one at that position), written as an adjective ("mildly" -> "mild"); without one the
    ordinal level itself. Null where the row has no level.
    """
    lev = pa.array(level.to_numpy(), type=pa.string(), from_pandas=True)
    txt = pc.utf8_lower(pa.array(text.to_numpy(), type=pa.string(), from_pandas=True).fill_null(""))
    out = level.to_numpy(dtype=object).copy()  # default: the ordinal level itself
    for value in sorted({v for v in lib.values()}):
        rows = np.flatnonzero(pc.fill_null(pc.equal(lev, value), False).to_numpy(zero_copy_only=False))
        if not len(rows):
            continue
        phrases = sorted((k for k, v in lib.items() if v == value), key=len, reverse=True)
        # RE2 in C++ over all rows at once; at one position the longest phrase wins (longest first)
        pattern = r"\b(?P<w>" + "|".join(re.escape(x) for x in phrases) + r")\b"
        found = pc.struct_field(pc.extract_regex(txt.take(pa.array(rows)), pattern), "w")
        words = np.asarray(found.to_pylist(), dtype=object)
        hit = pd.notna(words)
        out[rows[hit]] = words[hit]
    adjective = {w: (w[:-2] if w.endswith("ly") and w[:-2] in lib else w) for w in set(out[pd.notna(out)])}
    has = pd.notna(out)
    out[has] = [adjective[w] for w in out[has]]
    return pd.Series(out, index=level.index)


# ----------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Prepared:
    """Frontal studies (one row each, index = study number ``s``) and their usable findings."""

    studies: pd.DataFrame  # subject_id, study_id, dicom_id, image_path, split, view (0 PA, 1 AP, -1 frontal of unknown projection)
    names: list[str]  # canonical vocabulary (index = name code)
    display: list[str]
    usable: np.ndarray  # bool per name: may appear in questions
    pos: np.ndarray  # (n_studies, n_names) bool
    neg: np.ndarray
    unc: np.ndarray
    unknown_pos: np.ndarray  # bool per study: a positive finding whose name is outside the vocabulary
    normal: np.ndarray  # bool per study: read and normal (no positive or uncertain finding)
    # bool per study: "not mentioned" may be read as "absent" -- the study has findings rows (the
    # extractor read its report) and none of its positive/uncertain findings is outside the vocabulary
    absent_known: np.ndarray
    instances: pd.DataFrame  # positive usable findings: s, name, loc, level, type (codes, -1 = none)
    locations: list[str]  # location code -> canonical location string (may grow: flipped sides)
    levels: list[str]
    types: list[str]
    rejects: Rejects
    n_studies_in: int
    counts: dict[str, int]


def _clean(col) -> pa.Array:
    """Trimmed, lower-case, single-spaced strings; '' becomes null (pyarrow kernels: fast at 1M+ rows)."""
    arr = (
        col
        if isinstance(col, pa.Array | pa.ChunkedArray)
        else pa.array(col, type=pa.string(), from_pandas=True)
    )
    arr = pc.utf8_lower(pc.utf8_trim_whitespace(arr.cast(pa.string())))
    arr = pc.replace_substring_regex(arr, r"\s+", " ")
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def _codes(arr, values: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer codes of cleaned strings: index in ``values`` (default: the sorted distinct values); -1 = null/other."""
    if values is None:
        values = sorted(v for v in pc.unique(arr).to_pylist() if v is not None)
    codes = pc.index_in(arr, value_set=pa.array(values, pa.string()))
    return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False).astype(np.int64), list(values)


def frontal_images(images: pd.DataFrame) -> pd.DataFrame:
    """The first PA/AP image of every study, in table order (the original's rule, on ViewPosition)."""
    view = images["view_position"].astype("string").str.strip().str.upper()
    if "view_code_meaning" in images:
        meaning = images["view_code_meaning"].astype("string").str.strip().str.lower().map(_VIEW_MEANING)
        view = view.where(view.isin(VIEWS), meaning.astype("string"))
    frontal = images.assign(view=view)[view.isin(VIEWS).fillna(False).to_numpy(bool)]
    return frontal.drop_duplicates("study_id", keep="first")


def prepare(
    findings: pd.DataFrame,
    images: pd.DataFrame,
    studies: pd.DataFrame,
    names: list[str],
    display: list[str] | None = None,
    exclude_names: tuple[str, ...] = (),
    keyinfo_studies: pd.DataFrame | None = None,
    level_lib: dict[str, str] | None = None,
    level_word_min_count: int = 10,
) -> Prepared:
    """Frontal studies and their usable findings.

    ``keyinfo_studies`` (KEYINFO_STUDIES: study_id, status) says which studies the key-information stage
    read and found normal; without it a study with findings rows and no positive/uncertain finding counts
    as normal. ``level_lib`` (levels.csv) switches levels to the report's level words (medical_cxr_vqa
    style, see :func:`level_words`).
    """
    rejects = Rejects(STAGE)
    studies = studies.drop_duplicates("study_id")
    frontal = frontal_images(images)
    has_image = studies["study_id"].isin(images["study_id"])
    has_frontal = studies["study_id"].isin(frontal["study_id"])
    for sid in studies.loc[~has_image, "study_id"]:
        rejects.add(int(sid), "no_image")
    for sid in studies.loc[has_image & ~has_frontal, "study_id"]:
        rejects.add(int(sid), "no_frontal_image")

    cols = ["study_id", "dicom_id", "image_path", "view"]
    cols += [c for c in ("split", "view_code_meaning") if c in frontal]
    st = studies.loc[has_frontal, ["subject_id", "study_id", "split"]].merge(
        frontal[cols], on="study_id", how="left", suffixes=("", "_image")
    )
    if "split_image" in st:  # the study's official split; the image's only when the study has none
        st["split"] = st["split"].fillna(st.pop("split_image"))
    st["split"] = st["split"].fillna("unknown")
    st = st.sort_values("study_id", kind="stable").reset_index(drop=True)
    st["view"] = np.where(st["view"].to_numpy() == "PA", 0, 1).astype(np.int8)
    if "view_code_meaning" in st:
        # IU X-Ray says only "frontal" (ingest files it as PA): frontal, but no view question
        unknown_view = st.pop("view_code_meaning").astype("string").str.strip().str.lower() == "frontal"
        st.loc[unknown_view.fillna(False).to_numpy(bool), "view"] = -1

    n_s, n_n = len(st), len(names)
    s = pd.Index(st["study_id"]).get_indexer(findings["study_id"])
    f = findings.loc[s >= 0]
    s = s[s >= 0]
    raw_name = _clean(f["name"])
    code, _ = _codes(raw_name, list(names))
    presence, _ = _codes(_clean(f["presence"]), list(_PRESENCE_CODE))
    counts = {
        "findings_rows": len(f),
        "findings_rows_of_studies_without_questions": int(len(findings) - len(f)),
        "unknown_name_rows": int((code < 0).sum()),
        "bad_presence_rows": int((presence < 0).sum()),
    }
    odd = pc.filter(
        raw_name,
        pa.array(
            (code < 0)
            & (pc.fill_null(pc.not_equal(raw_name, "unknown"), True).to_numpy(zero_copy_only=False))
        ),
    )
    if len(odd):
        examples = [x for x in pc.unique(odd).to_pylist() if x is not None][:5]
        log.warning(
            "%d finding rows have a name outside the vocabulary (e.g. %s); skipped", len(odd), examples
        )
    unknown_pos = np.zeros(n_s, dtype=bool)
    unknown_pos[s[(code < 0) & (presence == 0)]] = True
    absent_known = np.zeros(n_s, dtype=bool)
    absent_known[s] = True
    absent_known[s[(code < 0) & np.isin(presence, (0, 2))]] = False
    has_rows = np.zeros(n_s, dtype=bool)
    has_rows[s] = True
    if keyinfo_studies is not None:
        status = (
            keyinfo_studies.drop_duplicates("study_id")
            .set_index("study_id")["status"]
            .reindex(st["study_id"].to_numpy())
            .astype("string")
            .str.strip()
            .str.lower()
        )
        normal = (status == "normal").fillna(False).to_numpy(bool)
        read = status.isin(["normal", "abnormal"]).fillna(False).to_numpy(bool)
        # a normal report ("No acute cardiopulmonary process") says every unmentioned finding is absent;
        # an `unknown` (read but silent) or unread study says nothing
        absent_known = (absent_known | normal) & read
        counts.update(
            {
                f"keyinfo_status_{k}": int(v)
                for k, v in status.fillna("missing").value_counts().sort_index().items()
            }
        )
    else:
        normal = has_rows.copy()  # refined below: no positive or uncertain finding

    usable = np.ones(n_n, dtype=bool)
    usable[[names.index(n) for n in exclude_names if n in names]] = False
    ok = (code >= 0) & (presence >= 0)
    ok[ok] = usable[code[ok]]
    mats = []
    for p in range(3):
        m = np.zeros((n_s, n_n), dtype=bool)
        sel = ok & (presence == p)
        m[s[sel], code[sel]] = True
        mats.append(m)
    pos, neg, unc = mats
    # a finding both asserted and negated in one study ("no left effusion; small right effusion") is positive
    neg &= ~pos & ~unc

    # normal: no positive or uncertain finding (named or not), and read (status table or findings rows)
    normal &= ~pos.any(axis=1) & ~unc.any(axis=1) & ~unknown_pos
    normal[s[(code < 0) & (presence == 2)]] = False

    sel = ok & (presence == 0)
    mask = pa.array(sel)
    loc_codes, locations = _codes(_clean(f["location"]).filter(mask))
    level_col = _clean(f["level"]).filter(mask)
    if level_lib is not None:
        # where the report's words survive standardisation: the surface name and the evidence quote
        surface = [f[c].astype("string").fillna("") for c in ("raw_name", "evidence") if c in f]
        text = surface[0] if surface else pd.Series("", index=f.index)
        if len(surface) == 2:
            text = surface[0] + " " + surface[1]
        lev = pd.Series(level_col.to_pandas().to_numpy(), dtype=object)
        words = level_words(lev, pd.Series(text[sel].to_numpy(), dtype=object), level_lib)
        rare = words.map(words.value_counts()) < level_word_min_count
        words = words.where(~rare.fillna(False), lev)
        counts["level_words_rare_to_ordinal"] = int(rare.fillna(False).sum())
        level_col = pa.array(words.to_numpy(), type=pa.string(), from_pandas=True)
    lev_codes, levels = _codes(level_col)
    typ_codes, types = _codes(_clean(f["type"]).filter(mask))
    instances = pd.DataFrame(
        {"s": s[sel], "name": code[sel], "loc": loc_codes, "level": lev_codes, "type": typ_codes}
    ).drop_duplicates()
    # a canonical row order (codes are sorted values): the output does not depend on the input's order
    instances = instances.sort_values(["s", "name", "loc", "level", "type"], kind="stable")
    return Prepared(
        studies=st,
        names=list(names),
        display=list(display or names),
        usable=usable,
        pos=pos,
        neg=neg,
        unc=unc,
        unknown_pos=unknown_pos,
        normal=normal,
        absent_known=absent_known,
        instances=instances.reset_index(drop=True),
        locations=[str(x) for x in locations],
        levels=[str(x) for x in levels],
        types=[str(x) for x in types],
        rejects=rejects,
        n_studies_in=len(studies),
        counts=counts,
    )


# ----------------------------------------------------------------------------------------------------
# Random helpers (vectorised)


def _rng(seed: int, qtype: str) -> np.random.Generator:
    return np.random.default_rng([seed, QUESTION_TYPES.index(qtype)])


def _take(values: np.ndarray, codes: np.ndarray, fill: int = -1) -> np.ndarray:
    """``values[codes]`` with ``fill`` where a code is -1 (no value)."""
    out = np.full(len(codes), fill, dtype=np.int64)
    has = codes >= 0
    out[has] = values[codes[has]]
    return out


def pick_one_per_group(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of one uniformly drawn row per distinct value of ``group``."""
    if len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((rng.random(len(group)), group))
    g = group[order]
    first = np.r_[True, g[1:] != g[:-1]]
    return order[first]


def weighted_choice_rows(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One column per row drawn with probability proportional to ``weights`` (-1 when a row is all zero)."""
    with np.errstate(divide="ignore"):
        score = np.log(weights, dtype=np.float32)
    score += rng.gumbel(size=weights.shape).astype(np.float32)
    choice = score.argmax(axis=1)
    choice[~(weights > 0).any(axis=1)] = -1
    return choice


def draw_matching(weights: np.ndarray, target: np.ndarray, rng: np.random.Generator, rounds: int = 4):
    """One column per row (see ``weighted_choice_rows``), reweighted so column counts approach ``target``.

    Per-row exclusions (a finding positive in that study cannot be a "no") distort the plain draw; a
    few multiplicative corrections bring the counts of every column close to the target shape.
    """
    target = target.astype(np.float64)
    correction = np.ones(weights.shape[1], dtype=np.float32)
    for _ in range(rounds):
        pick = weighted_choice_rows(weights * correction, rng)
        got = np.bincount(pick[pick >= 0], minlength=weights.shape[1])
        want = target * got.sum() / max(target.sum(), 1)
        correction *= np.clip((want + 1) / (got + 1), 0.2, 5).astype(np.float32)
    return weighted_choice_rows(weights * correction, rng)


def _choose_family(rng, n, qtype, fams, tpl: Templates) -> np.ndarray:
    w = np.array([tpl.weight(qtype, f) for f in fams], dtype=float)
    return rng.choice(len(fams), size=n, p=w / w.sum())


def _uniform_template(rng, family_idx: np.ndarray, n: int) -> np.ndarray:
    return family_idx[rng.integers(len(family_idx), size=n)]


def pair_yes_no(strata: np.ndarray, is_yes: np.ndarray, rng: np.random.Generator):
    """Keep as many yes as no rows in every stratum (random subset of the larger side).

    Returns (kept row positions, pair number of each kept row): the yes and the no row of one pair
    share a pair number, so they can be given the same template.
    """
    n = len(strata)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, st = np.unique(strata, return_inverse=True)
    st = st.ravel()
    yes = is_yes.astype(np.int64)
    order = np.lexsort((rng.random(n), yes, st))
    key = st[order] * 2 + yes[order]
    start = np.r_[0, np.flatnonzero(key[1:] != key[:-1]) + 1]
    sizes = np.diff(np.r_[start, n])
    rank = np.arange(n) - np.repeat(start, sizes)
    n_st = st.max() + 1
    cnt = np.zeros((n_st, 2), dtype=np.int64)
    np.add.at(cnt, (st, yes), 1)
    keep_n = cnt.min(axis=1)
    kept = rank < keep_n[st[order]]
    rows = order[kept]
    offset = np.r_[0, np.cumsum(keep_n)[:-1]]
    pair = offset[st[rows]] + rank[kept]
    return rows, pair


# ----------------------------------------------------------------------------------------------------
# Question builders. Each returns a frame: s, tid (template), name, loc, view (slots; -1 = unused), answer.

_FRAME_COLS = ["s", "tid", "name", "loc", "view", "answer"]


def _frame(s, tid, answer, name=None, loc=None, view=None) -> pd.DataFrame:
    n = len(s)
    minus = np.full(n, -1, dtype=np.int64)
    return pd.DataFrame(
        {
            "s": np.asarray(s, dtype=np.int64),
            "tid": np.asarray(tid, dtype=np.int64),
            "name": minus if name is None else np.asarray(name, dtype=np.int64),
            "loc": minus if loc is None else np.asarray(loc, dtype=np.int64),
            "view": minus if view is None else np.asarray(view, dtype=np.int64),
            "answer": np.asarray(answer, dtype=object),
        }
    )


def _join_names(pairs: pd.DataFrame, display: np.ndarray) -> pd.Series:
    """Per study: the distinct names of ``pairs`` (s, name) in vocabulary order, comma-joined."""
    pairs = pairs.drop_duplicates(["s", "name"]).sort_values(["s", "name"], kind="stable")
    s = pairs["s"].to_numpy()
    name = pairs["name"].to_numpy()
    if len(display) > 62:  # too many names for a bit set: join per study
        return pd.Series(display[name], index=s).groupby(level=0).agg(", ".join)
    # a study's name set as one int64 bit set; each distinct set is formatted once
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, dtype=np.int64)
    sets = np.add.reduceat(np.left_shift(np.int64(1), name), start) if len(s) else np.zeros(0, np.int64)
    uniq, inv = np.unique(sets, return_inverse=True)
    texts = [", ".join(display[j] for j in range(len(display)) if (int(m) >> j) & 1) for m in uniq]
    return pd.Series(np.asarray(texts, dtype=object)[inv.ravel()], index=s[start])


def _distinct_join(groups: pd.DataFrame, values: list[str], col: str) -> pd.Series:
    """Per (s, name): distinct non-null ``col`` values, sorted, comma-joined (fast path for one value)."""
    g = groups[groups[col] >= 0][["s", "name", col]].drop_duplicates()
    vals = np.asarray(values, dtype=object)[g[col].to_numpy()]
    g = g.assign(v=vals).sort_values(["s", "name", "v"], kind="stable")
    key = g["s"].to_numpy() * 1_000_003 + g["name"].to_numpy()
    multi = pd.Series(key).duplicated(keep=False).to_numpy()
    out = pd.Series(g["v"].to_numpy()[~multi], index=key[~multi])
    if multi.any():
        joined = pd.Series(g["v"].to_numpy()[multi], index=key[multi]).groupby(level=0).agg(", ".join)
        out = pd.concat([out, joined])
    return out


def build_abnormality(p: Prepared, tpl: Templates, cfg: VqaConfig, info: dict | None = None) -> pd.DataFrame:
    rng = _rng(cfg.seed, "abnormality")
    info = {} if info is None else info
    n_s = len(p.studies)
    has_pos = p.pos.any(axis=1)
    abnormal = has_pos | p.unknown_pos
    # "no abnormality" only for a study read and found normal (key-information status, or findings rows
    # without any positive or uncertain finding); never for an unread or silent one
    normal = np.flatnonzero(p.normal & ~abnormal)
    no_rows = normal[rng.random(len(normal)) < cfg.abnormality_no_finding_rate]
    abn_rows = rng.permutation(np.flatnonzero(abnormal))
    yes_rows = abn_rows[: len(no_rows)]  # as many "yes" as "no" yes/no questions
    rest = abn_rows[len(no_rows) :]
    n_pair = min(len(yes_rows), len(no_rows))
    info["abnormality: normal studies"] = len(normal)
    info["abnormality: normal studies not sampled (abnormality_no_finding_rate)"] = len(normal) - len(no_rows)
    info["abnormality: 'no' removed by yes/no balancing"] = len(no_rows) - n_pair
    yes_rows, no_rows = yes_rows[:n_pair], no_rows[:n_pair]
    pair_tid = _uniform_template(rng, tpl.family("abnormality", "yesno"), n_pair)
    frames = [
        _frame(yes_rows, pair_tid, np.full(n_pair, "yes", dtype=object)),
        _frame(no_rows, pair_tid, np.full(n_pair, "no", dtype=object)),
    ]

    inst = p.instances
    display = np.asarray(p.display, dtype=object)
    located = inst[inst["loc"] >= 0]
    has_located = np.zeros(n_s, dtype=bool)
    has_located[located["s"].to_numpy()] = True
    fam = _choose_family(rng, len(rest), "abnormality", ("list", "region"), tpl)
    can_list = ~p.unknown_pos[rest] & has_pos[rest]  # an unnamed finding would make the list incomplete
    region = (fam == 1) | ~can_list
    region &= has_located[rest]
    listed = rest[~region & can_list]
    region_rows = rest[region]
    info["abnormality: abnormal studies without a named or located finding"] = int(
        len(rest) - len(listed) - len(region_rows)
    )

    if len(listed):
        answers = _join_names(inst[inst["s"].isin(listed)], display)
        frames.append(
            _frame(
                listed,
                _uniform_template(rng, tpl.family("abnormality", "list"), len(listed)),
                answers.reindex(listed).to_numpy(),
            )
        )
    if len(region_rows):
        cand = located[located["s"].isin(region_rows)]
        pick = cand.iloc[pick_one_per_group(cand["s"].to_numpy(), rng)]
        if cfg.style == "medical_cxr_vqa":  # the original answers with the one finding it picked
            answers = display[pick["name"].to_numpy()]
        else:  # every finding seen at that location
            at_loc = located.merge(pick[["s", "loc"]], on=["s", "loc"])
            answers = _join_names(at_loc, display).reindex(pick["s"].to_numpy()).to_numpy()
        frames.append(
            _frame(
                pick["s"],
                _uniform_template(rng, tpl.family("abnormality", "region"), len(pick)),
                answers,
                loc=pick["loc"],
            )
        )
    return pd.concat(frames, ignore_index=True)


def build_presence(p: Prepared, tpl: Templates, cfg: VqaConfig) -> tuple[pd.DataFrame, dict]:
    rng = _rng(cfg.seed, "presence")
    n_s, n_n = p.pos.shape
    has_pos = p.pos.any(axis=1)
    n_pos = int(has_pos.sum())
    # which findings may be a "no" in which study: explicit negations, and findings the report does
    # not mention (when that can be read as absent); never a positive or uncertain one
    w_row = np.where(
        p.neg, np.float32(cfg.explicit_negative_weight), p.absent_known[:, None].astype(np.float32)
    )
    w_row[p.pos | p.unc] = 0
    can_no = (w_row > 0).any(axis=1)
    # one candidate per study; studies with a positive say "yes" often enough to balance the studies
    # that can only say "no"
    n_only_no = int((can_no & ~has_pos).sum())
    q_yes = min(1.0, (n_pos + n_only_no) / (2 * n_pos)) if n_pos else 0.0
    answer_yes = has_pos & (rng.random(n_s) < q_yes)
    located_fam = _choose_family(rng, n_s, "presence", ("plain", "located"), tpl) == 1

    inst = p.instances
    pairs = inst[["s", "name"]].drop_duplicates()
    located = inst[inst["loc"] >= 0][["s", "name", "loc"]].drop_duplicates()

    # yes: a located positive finding (located family) or any positive finding (plain family)
    want_loc = answer_yes & located_fam
    cand = located[want_loc[located["s"].to_numpy()]]
    yes_loc = cand.iloc[pick_one_per_group(cand["s"].to_numpy(), rng)]
    plain_yes_s = answer_yes & ~np.isin(np.arange(n_s), yes_loc["s"].to_numpy())
    cand = pairs[plain_yes_s[pairs["s"].to_numpy()]]
    yes_plain = cand.iloc[pick_one_per_group(cand["s"].to_numpy(), rng)].assign(loc=-1)

    no_s = np.flatnonzero(~answer_yes)

    # located "no": flip a one-sided finding to the other side, or a finding absent from the study at a
    # location drawn from where that finding is seen when present
    # as many located "no" as located "yes" (not every "yes" study has a located finding)
    located_share = len(yes_loc) / max(1, len(yes_loc) + len(yes_plain))
    want_loc_no = no_s[rng.random(len(no_s)) < located_share]
    flip = want_loc_no[rng.random(len(want_loc_no)) < cfg.laterality_flip_share]
    locations = list(p.locations)
    loc_index = {loc: i for i, loc in enumerate(locations)}
    flipped_code = np.full(len(locations), -1, dtype=np.int64)
    for i, loc in enumerate(p.locations):
        other = flip_laterality(loc)
        if other is not None:
            if other not in loc_index:
                loc_index[other] = len(locations)
                locations.append(other)
            flipped_code[i] = loc_index[other]
    loc_code = inst["loc"].to_numpy()
    inst_all = inst.assign(side=_take(flipped_code, loc_code))
    # flippable: every positive instance of the name in the study is located on the same single side
    side_of = np.full(len(locations), 0, dtype=np.int64)
    for loc, i in loc_index.items():
        side_of[i] = {"left": 1, "right": 2}.get(loc.split(" ", 1)[0], 3)
    inst_all["lat"] = _take(side_of, loc_code, fill=4)
    lat_stats = inst_all.groupby(["s", "name"])["lat"].agg(["min", "max"])
    one_side = lat_stats[(lat_stats["min"] == lat_stats["max"]) & (lat_stats["min"] <= 2)].reset_index()
    flippable = inst_all.merge(one_side[["s", "name"]], on=["s", "name"])
    flippable = flippable[np.isin(flippable["s"].to_numpy(), flip)]
    # "possible right effusion" makes "is there effusion on the right?" unanswerable
    flippable = flippable[~p.unc[flippable["s"].to_numpy(), flippable["name"].to_numpy()]]
    flip_pick = flippable.iloc[pick_one_per_group(flippable["s"].to_numpy(), rng)]
    no_flip = pd.DataFrame({"s": flip_pick["s"], "name": flip_pick["name"], "loc": flip_pick["side"]})

    # absent/negated names, drawn so that per family the "no" names match the "yes" names
    no_named = np.setdiff1d(no_s, no_flip["s"].to_numpy())
    wants_loc = np.isin(no_named, want_loc_no)
    name_pick = np.full(len(no_named), -1, dtype=np.int64)
    for sel, target in (
        (wants_loc, np.bincount(yes_loc["name"].to_numpy(), minlength=n_n)),
        (~wants_loc, np.bincount(yes_plain["name"].to_numpy(), minlength=n_n)),
    ):
        base = w_row[no_named[sel]] * target.astype(np.float32)[None, :]
        name_pick[sel] = draw_matching(base, target, rng)
    got = name_pick >= 0
    no_all = pd.DataFrame({"s": no_named[got], "name": name_pick[got], "loc": -1})
    loc_rows = np.flatnonzero(wants_loc[got])
    if len(loc_rows):
        # each located "no" takes the location of a located "yes" of the same finding (a random
        # permutation, reused only when there are more "no" than "yes"), so the locations match too
        drawn = np.full(len(loc_rows), -1, dtype=np.int64)
        sub_names = no_all["name"].to_numpy()[loc_rows]
        yes_names_loc = yes_loc["name"].to_numpy()
        yes_locs = yes_loc["loc"].to_numpy()
        for name in np.unique(sub_names):
            pool = yes_locs[yes_names_loc == name]
            sel = np.flatnonzero(sub_names == name)
            if len(pool):
                drawn[sel] = np.resize(rng.permutation(pool), len(sel))
        loc_col = no_all["loc"].to_numpy().copy()
        loc_col[loc_rows] = drawn  # -1 (the finding is never seen located) falls back to plain
        no_all["loc"] = loc_col
    no = pd.concat([no_flip, no_all], ignore_index=True)
    yes = pd.concat([yes_loc, yes_plain], ignore_index=True)

    cand = pd.concat([yes.assign(yes=True), no.assign(yes=False)], ignore_index=True)
    strata = cand["name"].to_numpy() * (len(locations) + 1) + cand["loc"].to_numpy() + 1
    rows, pair = pair_yes_no(strata, cand["yes"].to_numpy(), rng)
    kept = cand.iloc[rows]
    n_pairs = int(pair.max()) + 1 if len(pair) else 0
    plain_t = _uniform_template(rng, tpl.family("presence", "plain"), n_pairs)
    loc_t = _uniform_template(rng, tpl.family("presence", "located"), n_pairs)
    tid = np.where(kept["loc"].to_numpy() >= 0, loc_t[pair], plain_t[pair])
    p.locations = locations
    explicit = p.neg[kept["s"].to_numpy(), kept["name"].to_numpy()] & ~kept["yes"].to_numpy()
    info = {
        "presence_candidates": len(cand),
        "presence_dropped_by_balancing": len(cand) - len(kept),
        "presence_no_from_explicit_negation": int(explicit.sum()),
        "presence_no_from_laterality_flip": int(
            (~kept["yes"].to_numpy() & kept["s"].isin(no_flip["s"]).to_numpy()).sum()
        ),
    }
    answer = np.where(kept["yes"].to_numpy(), "yes", "no").astype(object)
    return _frame(kept["s"], tid, answer, name=kept["name"], loc=kept["loc"]), info


def build_view(p: Prepared, tpl: Templates, cfg: VqaConfig, info: dict | None = None) -> pd.DataFrame:
    rng = _rng(cfg.seed, "view")
    info = {} if info is None else info
    st = p.studies
    known = np.flatnonzero(st["view"].to_numpy() >= 0)
    view = st["view"].to_numpy().astype(np.int64)
    split_code = pd.factorize(st["split"])[0].astype(np.int64)
    info["view: frontal studies of unknown projection (no view question)"] = int(len(st) - len(known))
    if cfg.view_balance and len(known):
        # balance PA against AP only in splits that have both; a one-view split (a PA-only corpus)
        # keeps every study, or the whole type would vanish
        pa_split = np.zeros(split_code.max() + 1, dtype=bool)
        pa_split[split_code[known][view[known] == 0]] = True
        ap_split = np.zeros_like(pa_split)
        ap_split[split_code[known][view[known] == 1]] = True
        both = pa_split & ap_split
        bal = known[both[split_code[known]]]
        rows, pair = pair_yes_no(split_code[bal], view[bal] == 0, rng)
        rows = bal[rows]
        rest = known[~both[split_code[known]]]
        info["view: removed by PA/AP balancing"] = int(len(bal) - len(rows))
        info["view: one-view splits kept unbalanced"] = int(len(rest))
        start = int(pair.max()) + 1 if len(pair) else 0
        rows = np.r_[rows, rest]
        pair = np.r_[pair, start + np.arange(len(rest))]
    else:
        rows = known
        pair = np.arange(len(known))
    n_pairs = int(pair.max()) + 1 if len(pair) else 0
    fam = _choose_family(rng, n_pairs, "view", ("open", "yesno"), tpl)
    open_t = _uniform_template(rng, tpl.family("view", "open"), n_pairs)
    yesno_t = _uniform_template(rng, tpl.family("view", "yesno"), n_pairs)
    asked = rng.integers(2, size=n_pairs)
    f = fam[pair]
    v = view[rows]
    tid = np.where(f == 0, open_t[pair], yesno_t[pair])
    view_answer = np.asarray(VIEWS, dtype=object)
    if cfg.style == "medical_cxr_vqa":
        view_answer = view_answer + " view"
    answer = np.where(f == 0, view_answer[v], np.where(asked[pair] == v, "yes", "no"))
    return _frame(rows, tid, answer.astype(object), view=np.where(f == 1, asked[pair], -1))


def build_location(p: Prepared, tpl: Templates, cfg: VqaConfig, info: dict | None = None) -> pd.DataFrame:
    rng = _rng(cfg.seed, "location")
    info = {} if info is None else info
    compat = cfg.style == "medical_cxr_vqa"
    inst = p.instances
    located = inst[inst["loc"] >= 0]
    pairs = located[["s", "name"]].drop_duplicates()
    pick = pairs.iloc[pick_one_per_group(pairs["s"].to_numpy(), rng)]
    chosen = located.merge(pick, on=["s", "name"])
    # the original answers "<location> area"; one finding seen at several places lists each
    loc_answers = [f"{loc} area" for loc in p.locations] if compat else p.locations
    where = _distinct_join(chosen, loc_answers, "loc")
    key = pick["s"].to_numpy() * 1_000_003 + pick["name"].to_numpy()
    answer_where = where.reindex(key).to_numpy()
    # left/right only for a finding seen on one side only (never "bilateral", never two sides)
    first = chosen.assign(
        side=np.asarray([loc.split(" ", 1)[0] for loc in p.locations], dtype=object)[chosen["loc"]]
    )
    sides = first.groupby(["s", "name"])["side"].agg(["min", "max"])
    one = sides[(sides["min"] == sides["max"]) & sides["min"].isin(["left", "right"])]["min"]
    side = one.reindex(pd.MultiIndex.from_arrays([pick["s"], pick["name"]])).to_numpy()
    fam = _choose_family(rng, len(pick), "location", ("where", "side"), tpl)
    use_side = (fam == 1) & pd.notna(side)
    info["location: side question asked 'where' instead (finding not on exactly one side)"] = int(
        ((fam == 1) & ~pd.notna(side)).sum()
    )
    tid = np.where(
        use_side,
        _uniform_template(rng, tpl.family("location", "side"), len(pick)),
        _uniform_template(rng, tpl.family("location", "where"), len(pick)),
    )
    side_answer = np.where(pd.notna(side), pd.Series(side, dtype=object) + " side", None) if compat else side
    answer = np.where(use_side, side_answer, answer_where)
    return _frame(pick["s"], tid, answer, name=pick["name"])


def _build_attribute(
    p: Prepared,
    tpl: Templates,
    cfg: VqaConfig,
    qtype: str,
    col: str,
    values: list[str],
    info: dict | None = None,
):
    rng = _rng(cfg.seed, qtype)
    inst = p.instances
    have = inst[inst[col] >= 0]
    joined = _distinct_join(have, values, col)
    if qtype == "level":  # two different levels for one finding is ambiguous: no question
        ambiguous = joined.str.contains(",", regex=False)
        if info is not None:
            info["level: findings with two different levels (not asked)"] = int(ambiguous.sum())
        joined = joined[~ambiguous]
    key = have["s"].to_numpy() * 1_000_003 + have["name"].to_numpy()
    have = have[np.isin(key, joined.index.to_numpy())][["s", "name"]].drop_duplicates()
    pick = have.iloc[pick_one_per_group(have["s"].to_numpy(), rng)]
    key = pick["s"].to_numpy() * 1_000_003 + pick["name"].to_numpy()
    tid = _uniform_template(rng, tpl.family(qtype, "open"), len(pick))
    return _frame(pick["s"], tid, joined.reindex(key).to_numpy(), name=pick["name"])


# ----------------------------------------------------------------------------------------------------
# Rendering, statistics, leak probe


def render_questions(frame: pd.DataFrame, p: Prepared, tpl: Templates) -> pa.Array:
    """Fill templates once per distinct (template, name, location, view) combination."""
    n_loc = len(p.locations) + 1
    key = (
        (
            (frame["tid"].to_numpy() * (len(p.names) + 1) + frame["name"].to_numpy() + 1) * n_loc
            + frame["loc"].to_numpy()
            + 1
        )
        * 3
        + frame["view"].to_numpy()
        + 1
    )
    codes, uniq = pd.factorize(key)
    rows = pd.DataFrame({"i": np.arange(len(frame))}).groupby(codes)["i"].first().to_numpy()
    texts = []
    for r in rows:
        tid, name, loc, view = (int(frame[c].iat[r]) for c in ("tid", "name", "loc", "view"))
        slots = {}
        if name >= 0:
            slots["name"] = p.display[name]
        if loc >= 0:
            words = p.locations[loc]
            slots["location"] = words if tpl.location_slot == "words" else location_phrase(words)
        if view >= 0:
            slots["view"] = VIEWS[view]
        texts.append(_indefinite_article(tpl.texts[tid].format(**slots)))
    return _expand(codes, texts)


_A_BEFORE_AP = re.compile(r"\b([Aa]) (?=AP\b)")


def _indefinite_article(text: str) -> str:
    """ "is this a AP view?" -> "is this an AP view?" (the filled {view} slot decides the article)."""
    return _A_BEFORE_AP.sub(lambda m: m.group(1) + "n ", text)


def _expand(codes: np.ndarray, values) -> pa.Array:
    """``values[codes]`` as a plain string array, through a dictionary array (no Python objects per row)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(values, pa.string())).cast(
        pa.string()
    )


def generate(
    findings: pd.DataFrame,
    images: pd.DataFrame,
    studies: pd.DataFrame,
    tpl: Templates,
    names: list[str],
    cfg: VqaConfig | None = None,
    display: list[str] | None = None,
    keyinfo_studies: pd.DataFrame | None = None,
    level_lib: dict[str, str] | None = None,
) -> tuple[pa.Table, Prepared, dict]:
    """Build the QUESTIONS table; also returns the prepared inputs (rejects, counts) and run info.

    ``keyinfo_studies``: the key-information stage's per-study status (KEYINFO_STUDIES); ``level_lib``:
    levels.csv as read by :func:`load_level_lib` (default: libs/levels.csv), used by the
    medical_cxr_vqa style only.
    """
    cfg = cfg or VqaConfig()
    if cfg.style not in STYLES:
        raise ValueError(f"vqa.style: {cfg.style!r} is not one of {list(STYLES)}")
    if cfg.style == "medical_cxr_vqa" and level_lib is None:
        level_lib = load_level_lib(REPO / "libs" / "levels.csv")
    p = prepare(
        findings,
        images,
        studies,
        names,
        display,
        cfg.exclude_names,
        keyinfo_studies=keyinfo_studies,
        level_lib=level_lib if cfg.style == "medical_cxr_vqa" else None,
        level_word_min_count=cfg.level_word_min_count,
    )
    info = dict(p.counts)
    presence, pinfo = build_presence(p, tpl, cfg)
    info.update(pinfo)
    parts = {
        "abnormality": build_abnormality(p, tpl, cfg, info),
        "presence": presence,
        "view": build_view(p, tpl, cfg, info),
        "location": build_location(p, tpl, cfg, info),
        "level": _build_attribute(p, tpl, cfg, "level", "level", p.levels, info),
        "type": _build_attribute(p, tpl, cfg, "type", "type", p.types, info),
    }
    for qtype, part in parts.items():
        info[f"{qtype}: questions"] = len(part)
        if not len(part) and len(p.studies):
            log.warning("vqa: no %s question at all (see the per-rule counts above)", qtype)
    frame = pd.concat(
        [f.assign(qtype=np.int8(QUESTION_TYPES.index(t))) for t, f in parts.items()], ignore_index=True
    )
    missing = frame["answer"].isna().to_numpy()
    if missing.any():  # cannot happen by construction; never write a question without an answer
        log.error("%d questions without an answer dropped", int(missing.sum()))
        frame = frame[~missing]
    frame = frame.sort_values(["s", "qtype"], kind="stable").reset_index(drop=True)
    question = render_questions(frame, p, tpl)
    st = p.studies
    s = frame["s"].to_numpy()
    per_study = pa.Table.from_pandas(
        st[["subject_id", "study_id", "dicom_id", "image_path", "split"]], preserve_index=False
    ).take(pa.array(s))
    answer_codes, answer_values = pd.factorize(frame["answer"])
    table = pa.table(
        {
            "qa_id": np.arange(len(frame), dtype=np.int64),
            **{c: per_study[c] for c in per_study.column_names},
            "question_type": _expand(frame["qtype"].to_numpy(), list(QUESTION_TYPES)),
            "question": question,
            "answer": _expand(answer_codes, list(answer_values)),
            "template_id": _expand(frame["tid"].to_numpy(), tpl.ids),
        }
    )
    asked = np.zeros(len(st), dtype=bool)
    asked[s] = True
    for sid in st["study_id"].to_numpy()[~asked]:
        p.rejects.add(int(sid), "no_question", "frontal image but nothing to ask after sampling")
    return table, p, info


def question_stats(questions: pd.DataFrame) -> pd.DataFrame:
    """Counts and answer distribution per question type and split (plus split 'all')."""
    q = questions[["question_type", "split", "answer", "study_id"]]
    q = pd.concat([q, q.assign(split="all")], ignore_index=True)
    g = q.groupby(["question_type", "split"], sort=True)
    out = g.agg(
        n_questions=("answer", "size"),
        n_studies=("study_id", "nunique"),
        n_distinct_answers=("answer", "nunique"),
    ).reset_index()
    yn = q.assign(is_yes=q["answer"] == "yes", is_no=q["answer"] == "no").groupby(["question_type", "split"])
    out["n_yes"] = yn["is_yes"].sum().to_numpy()
    out["n_no"] = yn["is_no"].sum().to_numpy()
    both = out["n_yes"] + out["n_no"]
    out["yes_ratio"] = (out["n_yes"] / both).where(both > 0)
    counts = q.groupby(["question_type", "split", "answer"]).size().rename("n").reset_index()
    counts = counts.sort_values(
        ["question_type", "split", "n", "answer"], ascending=[True, True, False, True]
    )
    top = counts.groupby(["question_type", "split"]).head(5)
    top_text = (
        top.assign(t=top["answer"] + " (" + top["n"].astype(str) + ")")
        .groupby(["question_type", "split"])["t"]
        .agg("; ".join)
    )
    first = counts.groupby(["question_type", "split"]).head(1).set_index(["question_type", "split"])
    idx = pd.MultiIndex.from_frame(out[["question_type", "split"]])
    out["top_answer"] = first["answer"].reindex(idx).to_numpy()
    out["top_answer_share"] = (first["n"].reindex(idx).to_numpy() / out["n_questions"]).astype(float)
    out["top_answers"] = top_text.reindex(idx).to_numpy()
    out["share"] = out["n_questions"] / out.groupby("split")["n_questions"].transform("sum")
    released_total = sum(RELEASED_COUNTS.values())
    is_all = out["split"] == "all"
    released = out["question_type"].map(RELEASED_COUNTS)
    out["released_n"] = released.where(is_all).astype("Int64")
    out["released_share"] = (released / released_total).where(is_all)
    order = {t: i for i, t in enumerate(QUESTION_TYPES)}
    out = out.sort_values(
        ["question_type", "split"], key=lambda c: c.map(order) if c.name == "question_type" else c
    )
    return out.reset_index(drop=True)


_TOKEN = re.compile(r"[a-z0-9\-]+")


def _features(texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """Binary unigram + bigram features of each distinct question."""
    docs = []
    for t in texts:
        toks = _TOKEN.findall(t.lower())
        docs.append(set(toks) | {f"{a} {b}" for a, b in zip(toks, toks[1:], strict=False)})
    vocab = sorted(set().union(*docs)) if docs else []
    index = {w: i for i, w in enumerate(vocab)}
    x = np.zeros((len(texts), len(vocab)), dtype=np.float64)
    for i, d in enumerate(docs):
        x[i, [index[w] for w in d]] = 1.0
    return x, vocab


def _logreg(
    x: np.ndarray, n_yes: np.ndarray, n_no: np.ndarray, l2: float = 1e-4, steps: int = 300
) -> np.ndarray:
    """Weighted logistic regression on distinct questions (weights = answer counts); returns P(yes)."""
    xb = np.c_[x, np.ones(len(x))]
    w = np.zeros(xb.shape[1])
    total = n_yes + n_no
    n = total.sum()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in range(1, steps + 1):  # Adam, full batch
        prob = 1 / (1 + np.exp(-(xb @ w)))
        grad = xb.T @ (prob * total - n_yes) / n + l2 * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        w -= 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return 1 / (1 + np.exp(-(xb @ w)))


def text_only_probe(questions: pd.Series, answers: pd.Series, seed: int = 0, max_rows: int = 200_000) -> dict:
    """How well the question text alone predicts a yes/no answer (80/20 split of rows).

    Three text-only classifiers: naive Bayes and logistic regression on word uni/bigrams, and a lookup of
    the exact question's majority answer (the best any text-only model can do on seen questions).
    ``gain`` = best accuracy - majority-answer accuracy on the held-out rows.
    """
    mask = answers.isin(["yes", "no"]).to_numpy()
    q = questions[mask].to_numpy()
    y = (answers[mask] == "yes").to_numpy()
    rng = np.random.default_rng(seed)
    if len(q) > max_rows:
        take = rng.choice(len(q), size=max_rows, replace=False)
        q, y = q[take], y[take]
    n = len(q)
    if n < 20:
        return {"n": n}
    test = rng.random(n) < 0.2
    codes, uniq = pd.factorize(q)
    u = len(uniq)
    yes_tr = np.bincount(codes[~test & y], minlength=u).astype(float)
    no_tr = np.bincount(codes[~test & ~y], minlength=u).astype(float)
    yes_te = np.bincount(codes[test & y], minlength=u).astype(float)
    no_te = np.bincount(codes[test & ~y], minlength=u).astype(float)
    n_te = yes_te.sum() + no_te.sum()
    majority_yes = yes_tr.sum() >= no_tr.sum()
    majority_acc = (yes_te.sum() if majority_yes else no_te.sum()) / n_te

    def acc(pred_yes: np.ndarray) -> float:
        return float((np.where(pred_yes, yes_te, no_te)).sum() / n_te)

    seen = (yes_tr + no_tr) > 0
    lookup = np.where(seen, yes_tr > no_tr, majority_yes) | (seen & (yes_tr == no_tr) & majority_yes)
    x, _ = _features(list(uniq))
    # Bernoulli naive Bayes with Laplace smoothing
    fy = (x * yes_tr[:, None]).sum(0)
    fn = (x * no_tr[:, None]).sum(0)
    py = (fy + 1) / (yes_tr.sum() + 2)
    pn = (fn + 1) / (no_tr.sum() + 2)
    logit = (
        x @ (np.log(py) - np.log(pn))
        + (1 - x) @ (np.log1p(-py) - np.log1p(-pn))
        + np.log((yes_tr.sum() + 1) / (no_tr.sum() + 1))
    )
    nb = acc(logit > 0)
    lr = acc(_logreg(x, yes_tr, no_tr) > 0.5)
    lk = acc(lookup)
    best = max(nb, lr, lk)
    return {
        "n": int(n),
        "n_distinct_questions": int(u),
        "yes_ratio": float(y.mean()),
        "majority_accuracy": float(majority_acc),
        "naive_bayes_accuracy": nb,
        "logreg_accuracy": lr,
        "lookup_accuracy": lk,
        "gain": float(best - majority_acc),
    }


def leak_report(questions: pd.DataFrame, seed: int = 0, max_rows: int = 200_000) -> pd.DataFrame:
    rows = []
    for qtype in ("presence", "abnormality", "view"):
        sub = questions[questions["question_type"] == qtype]
        r = text_only_probe(sub["question"], sub["answer"], seed, max_rows)
        if r.get("n", 0) >= 20:
            rows.append({"question_type": qtype, **r})
    cols = VQA_LEAK.names
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------------------------------
# Entry point


def write_outputs(table: pa.Table, questions_path, csv_path, stats_path, stats_csv_path) -> pd.DataFrame:
    write_table(table, questions_path, QUESTIONS)
    with atomic_path(csv_path) as tmp:
        pacsv.write_csv(table.select(CSV_COLUMNS), tmp)
    stats = question_stats(table.select(["question_type", "split", "answer", "study_id"]).to_pandas())
    write_table(pa.Table.from_pandas(stats, preserve_index=False), stats_path, VQA_STATS)
    with atomic_path(stats_csv_path) as tmp:
        stats.to_csv(tmp, index=False)
    return stats


def run(args) -> dict:
    names = load_vocabulary(args.vocabulary)
    display = load_display_names(args.names, names)
    if args.style not in STYLES:
        raise ValueError(f"vqa.style: {args.style!r} is not one of {list(STYLES)}")
    tpl = load_templates(args.templates or STYLE_TEMPLATES[args.style])
    cfg = VqaConfig(
        seed=args.seed,
        style=args.style,
        level_word_min_count=args.level_word_min_count,
        exclude_names=tuple(dict.fromkeys([*args.exclude_names, *left_out_names(args.names)])),
        abnormality_no_finding_rate=args.abnormality_no_finding_rate,
        explicit_negative_weight=args.explicit_negative_weight,
        laterality_flip_share=args.laterality_flip_share,
        view_balance=args.view_balance,
        leak_probe_max=args.leak_probe_max,
    )
    wanted = ["study_id", "name", "presence", "location", "level", "type", "raw_name", "evidence"]
    available = set(pq.read_schema(args.findings).names)
    findings = pq.read_table(args.findings, columns=[c for c in wanted if c in available]).to_pandas()
    images = pq.read_table(args.images).to_pandas()
    studies = pq.read_table(args.studies, columns=["subject_id", "study_id", "split"]).to_pandas()
    keyinfo_studies = (
        pq.read_table(args.keyinfo_studies, columns=["study_id", "status"]).to_pandas()
        if args.keyinfo_studies
        else None
    )
    table, p, info = generate(
        findings,
        images,
        studies,
        tpl,
        names,
        cfg,
        display,
        keyinfo_studies=keyinfo_studies,
        level_lib=load_level_lib(args.levels),
    )
    write_outputs(table, args.questions, args.csv, args.stats, args.stats_csv)
    if args.leak:
        leak = (
            leak_report(
                table.select(["question_type", "question", "answer"]).to_pandas(),
                cfg.seed,
                cfg.leak_probe_max,
            )
            if cfg.leak_probe_max
            else pd.DataFrame(columns=VQA_LEAK.names)
        )
        with atomic_path(args.leak) as tmp:
            leak.to_csv(tmp, index=False)
        for r in leak.itertuples():
            log.info(
                "text-only probe %s: majority %.3f, best text-only %.3f (gain %+.3f)",
                r.question_type,
                r.majority_accuracy,
                max(r.naive_bayes_accuracy, r.logreg_accuracy, r.lookup_accuracy),
                r.gain,
            )
    p.rejects.write(args.rejects)
    for k, v in info.items():
        log.info("%s: %s", k, v)
    n_out = int(pc.count_distinct(table["study_id"]).as_py()) if table.num_rows else 0
    summary(STAGE, p.n_studies_in, n_out, len(p.rejects))
    log.info("vqa: %d questions", table.num_rows)
    return info


def _flag(text: str) -> bool:
    if text.strip().lower() in ("true", "1", "yes"):
        return True
    if text.strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _optional(text: str) -> str | None:
    return None if text.strip() in ("", "None", "null") else text


def main(argv=None) -> None:
    ap = cli.parser(__doc__.splitlines()[0])
    ap.add_argument("--findings", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--studies", required=True)
    ap.add_argument(
        "--keyinfo-studies",
        type=_optional,
        default=None,
        help="the key-information stage's per-study status (KEYINFO_STUDIES): which studies are normal",
    )
    ap.add_argument("--style", default="medical_cxr_vqa", help=" | ".join(STYLES))
    ap.add_argument(
        "--templates", type=_optional, default=None, help="template file (default: the style's own)"
    )
    ap.add_argument("--levels", default=str(REPO / "libs" / "levels.csv"))
    ap.add_argument("--level-word-min-count", type=int, default=10)
    ap.add_argument("--vocabulary", default=str(REPO / "libs" / "vocabulary.yaml"))
    ap.add_argument(
        "--names",
        type=_optional,
        default=None,
        help="findings lib with name,vqa_name columns (optional; 'None' or '' = canonical names)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude-names", nargs="*", default=["support device"])
    ap.add_argument("--abnormality-no-finding-rate", type=float, default=1.0)
    ap.add_argument("--explicit-negative-weight", type=float, default=4.0)
    ap.add_argument("--laterality-flip-share", type=float, default=0.5)
    ap.add_argument("--view-balance", type=_flag, default=True, help="true/false")
    ap.add_argument("--leak-probe-max", type=int, default=200_000)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--stats-csv", required=True)
    ap.add_argument("--leak", default=None)
    ap.add_argument("--rejects", required=True)
    args = ap.parse_args(argv)
    cli.setup_logging(args.verbose)
    run(args)


if __name__ == "__main__":
    main()
