"""Level words (medical_cxr_vqa style): the report's own word for a finding's level."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


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
