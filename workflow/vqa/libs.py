"""Libraries: question templates, the finding vocabulary and Medical-CXR-VQA's display names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from workflow.vqa.config import REPO


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
# the template file each answer/wording style (config `vqa.style`) uses by default
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
