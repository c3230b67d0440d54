"""Inputs: frontal studies and their usable findings as integer codes (one row per study)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from workflow.tables import Rejects
from workflow.vqa.config import STAGE, VIEWS
from workflow.vqa.levels import level_word_counts, level_words
from workflow.vqa.phrases import with_other_sides

log = logging.getLogger(__name__)

_VIEW_MEANING = {"postero-anterior": "PA", "antero-posterior": "AP"}
_PRESENCE_CODE = {"positive": 0, "negative": 1, "uncertain": 2}


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
    # location code -> canonical location string: the findings' locations (sorted), then the other side of
    # each one-sided one (the laterality-flipped presence questions ask about those)
    locations: list[str]
    levels: list[str]
    types: list[str]
    rejects: Rejects
    n_studies_in: int
    counts: dict[str, int]
    corpus: Corpus | None = None  # set when these are one shard's studies


def _clean(col) -> pa.Array:
    """Trimmed, lower-case, single-spaced strings; '' becomes null (pyarrow kernels: fast at 1M+ rows)."""
    arr = (
        col
        if isinstance(col, pa.Array | pa.ChunkedArray)
        else pa.array(col, type=pa.string(), from_pandas=True)
    )
    # cleaned once per distinct value: the columns are a few dozen words repeated over the rows
    arr = arr.cast(pa.string())
    distinct = (arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr).dictionary_encode()
    values = pc.utf8_lower(pc.utf8_trim_whitespace(distinct.dictionary))
    values = pc.replace_substring_regex(values, r"\s+", " ")
    values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    return values.take(distinct.indices)


def _codes(arr, values: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer codes of cleaned strings: index in ``values`` (default: the sorted distinct values); -1 = null/other."""
    if values is None:
        values = sorted(v for v in pc.unique(arr).to_pylist() if v is not None)
    codes = pc.index_in(arr, value_set=pa.array(values, pa.string()))
    return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False).astype(np.int64), list(values)


def frontal_images(images: pd.DataFrame) -> pd.DataFrame:
    """The first PA/AP image of every study, in table order (the original's rule, on ViewPosition)."""
    # worked out once per distinct (view_position, view_code_meaning): a handful over 100k+ images
    columns = [c for c in ("view_position", "view_code_meaning") if c in images]
    pair = np.zeros(len(images), dtype=np.int64)
    for c in columns:
        codes, uniques = pd.factorize(images[c], use_na_sentinel=False)
        pair = pair * max(len(uniques), 1) + codes
    pair, distinct = pd.factorize(pair)
    first = np.zeros(len(distinct), dtype=np.int64)
    first[pair[::-1]] = np.arange(len(pair))[::-1]
    view = _view(images[columns].iloc[first].reset_index(drop=True))
    is_frontal = view.isin(VIEWS).fillna(False).to_numpy(bool)[pair]
    frontal = images.assign(view=view.array.take(pair))[is_frontal]
    return frontal.drop_duplicates("study_id", keep="first")


def _view(images: pd.DataFrame) -> pd.Series:
    """PA/AP of each image: its ViewPosition, else its view's meaning (null when neither says)."""
    view = images["view_position"].astype("string").str.strip().str.upper()
    if "view_code_meaning" in images:
        meaning = images["view_code_meaning"].astype("string").str.strip().str.lower().map(_VIEW_MEANING)
        view = view.where(view.isin(VIEWS), meaning.astype("string"))
    return view


def frontal_studies(images: pd.DataFrame, studies: pd.DataFrame) -> pd.DataFrame:
    """One row per study with a frontal image, by study_id: its split and first frontal image's view.

    ``view``: 0 PA, 1 AP, -1 frontal of unknown projection; ``dicom_id`` / ``image_path`` when
    ``images`` has them. ``studies`` holds one row per study.
    """
    frontal = frontal_images(images)
    cols = [c for c in ("study_id", "dicom_id", "image_path", "view") if c in frontal]
    cols += [c for c in ("split", "view_code_meaning") if c in frontal]
    has_frontal = studies["study_id"].isin(frontal["study_id"])
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
    return st


@dataclass(frozen=True)
class Corpus:
    """What a shard must know of the whole corpus (it sees only its own patients' studies), so that
    its questions follow the same rules as one run over everything."""

    # splits with both PA and AP frontal studies: the view question is PA/AP balanced there
    view_splits: frozenset[str]
    # medical_cxr_vqa style: positive usable findings per level word (the level_word_min_count test)
    level_word_counts: dict[str, int] | None = None


def view_splits(st: pd.DataFrame) -> frozenset[str]:
    """The splits of ``st`` (:func:`frontal_studies`) with both a PA and an AP study."""
    split = st["split"].to_numpy(dtype=object)
    view = st["view"].to_numpy()
    return frozenset(set(split[view == 0]) & set(split[view == 1]))


def corpus_facts(
    findings: pa.Table | None,
    images: pd.DataFrame,
    studies: pd.DataFrame,
    names: list[str],
    exclude_names: tuple[str, ...] = (),
    level_lib: dict[str, str] | None = None,
) -> Corpus:
    """:class:`Corpus` of the whole corpus. ``findings`` (an Arrow table) needs only the rows with a
    level (and only when ``level_lib`` is given: the medical_cxr_vqa style's level words), whose words
    are counted on codes (:func:`level_word_counts`: both shards count them over every study of the
    corpus, and no word is written out per row)."""
    st = frontal_studies(images, studies.drop_duplicates("study_id"))
    counts = None
    if level_lib is not None:
        frontal = pa.array(st["study_id"].to_numpy())
        f = findings.filter(pc.is_in(findings["study_id"], value_set=frontal))
        code, _ = _codes(_clean(f["name"]), list(names))
        presence, _ = _codes(_clean(f["presence"]), list(_PRESENCE_CODE))
        sel = (code >= 0) & (presence == 0)
        sel[sel] = _usable(names, exclude_names)[code[sel]]
        rows = pa.array(sel)
        surface = [
            f[c].cast(pa.string()).filter(rows) for c in ("raw_name", "evidence") if c in f.column_names
        ]
        counts = level_word_counts(
            _clean(f["level"]).filter(rows), _surface_text(surface, int(sel.sum())), level_lib
        )
    return Corpus(view_splits(st), counts)


def _usable(names: list[str], exclude_names: tuple[str, ...]) -> np.ndarray:
    usable = np.ones(len(names), dtype=bool)
    usable[[names.index(n) for n in exclude_names if n in names]] = False
    return usable


def positive_level_words(f: pd.DataFrame, sel: np.ndarray, ordinal: pd.Series, level_lib) -> pd.Series:
    """The level word (:func:`level_words`) of the findings rows ``f[sel]`` (``ordinal``: their cleaned
    levels), from where the report's words survive standardisation: the surface name and the evidence
    quote."""
    rows = pa.array(sel)
    surface = [
        pa.array(f[c], type=pa.string(), from_pandas=True).filter(rows)
        for c in ("raw_name", "evidence")
        if c in f
    ]
    return level_words(ordinal, _surface_text(surface, int(sel.sum())), level_lib)


def _surface_text(surface: list, n: int) -> pa.Array:
    """The rows' raw name and evidence quote (those of them there are) joined by a space; '' for none."""
    surface = [s.fill_null("") for s in surface]
    text = surface[0] if surface else pa.array([""] * n, pa.string())
    if len(surface) == 2:
        text = pc.binary_join_element_wise(surface[0], surface[1], " ")
    return text


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
    corpus: Corpus | None = None,
) -> Prepared:
    """Frontal studies and their usable findings.

    ``keyinfo_studies`` (KEYINFO_STUDIES: study_id, status) says which studies the key-information stage
    read and found normal; without it a study with findings rows and no positive/uncertain finding counts
    as normal. ``level_lib`` (levels.csv) switches levels to the report's level words (medical_cxr_vqa
    style, see :func:`level_words`). ``corpus``: the whole corpus's facts when these inputs are one
    shard of it (:func:`corpus_facts`); without it the inputs are the whole corpus.
    """
    rejects = Rejects(STAGE)
    studies = studies.drop_duplicates("study_id")
    st = frontal_studies(images, studies)
    has_image = studies["study_id"].isin(images["study_id"])
    has_frontal = studies["study_id"].isin(st["study_id"])
    for sid in studies.loc[~has_image, "study_id"]:
        rejects.add(int(sid), "no_image")
    for sid in studies.loc[has_image & ~has_frontal, "study_id"]:
        rejects.add(int(sid), "no_frontal_image")

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

    usable = _usable(names, exclude_names)
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
        ordinal = pd.Series(level_col.to_pandas().to_numpy(), dtype=object)
        words = positive_level_words(f, sel, ordinal, level_lib)
        if corpus is not None and corpus.level_word_counts is None:
            raise ValueError("corpus facts without level word counts (corpus_facts needs level_lib)")
        seen = words.value_counts() if corpus is None else pd.Series(corpus.level_word_counts, dtype="int64")
        rare = words.map(seen) < level_word_min_count
        words = words.where(~rare.fillna(False), ordinal)
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
        locations=with_other_sides([str(x) for x in locations]),
        levels=[str(x) for x in levels],
        types=[str(x) for x in types],
        rejects=rejects,
        n_studies_in=len(studies),
        counts=counts,
        corpus=corpus,
    )
