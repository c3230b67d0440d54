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


def level_words(level: pd.Series, text, lib: dict[str, str]) -> pd.Series:
    """The report's own level word of each finding row, as the original's key information writes it.

    ``level`` is the standardised (ordinal) level, ``text`` the row's surface text (raw name and
    evidence; a Series or a pyarrow string array). The word is the first phrase of ``levels.csv`` in the
    text that maps to the row's level (the longest one at that position), written as an adjective
    ("mildly" -> "mild"); without one the ordinal level itself. Null where the row has no level.
    """
    out = level.to_numpy(dtype=object).copy()  # default (and the rows without a level): the ordinal level
    code, adjective = _word_codes(pa.array(out, type=pa.string(), from_pandas=True), text, lib)
    has = code >= 0
    out[has] = adjective[code[has]]
    return pd.Series(out, index=level.index)


def level_word_counts(level, text, lib: dict[str, str]) -> dict[str, int]:
    """How many rows have each level word (:func:`level_words`; the rows without a level left out, as
    ``value_counts`` leaves them out), from the word codes: no word is written out per row."""
    code, adjective = _word_codes(_strings(level), text, lib)
    rows = np.bincount(code[code >= 0], minlength=len(adjective))
    counts: dict[str, int] = {}
    for word, n in zip(adjective.tolist(), rows.tolist(), strict=True):
        if n:  # a word no row has is not counted (value_counts would not list it)
            counts[word] = counts.get(word, 0) + n
    return counts


def _word_codes(level: pa.Array, text, lib: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`level_words` as codes: per row an index into the returned words (adjectives), -1 where
    the row has no level."""
    lev = level.dictionary_encode()
    # the result depends on the row's (level, text) only; sentences and stock phrasings repeat (4x at
    # 228k studies), so each distinct text is searched once and words are worked on as codes into
    # ``words`` (the levels, then the phrases found), not as one Python string per row
    words = [str(w) for w in lev.dictionary.to_pylist()]
    code = lev.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    txt = _strings(text).fill_null("").dictionary_encode()
    distinct_text = pc.utf8_lower(txt.dictionary)
    text_code = txt.indices.to_numpy(zero_copy_only=False)
    for value in sorted({v for v in lib.values()}):
        if value not in words[: len(lev.dictionary)]:
            continue
        rows = np.flatnonzero(code == words.index(value))
        phrases = sorted((k for k, v in lib.items() if v == value), key=len, reverse=True)
        # RE2 in C++ over all texts at once; at one position the longest phrase wins (longest first)
        pattern = r"\b(?P<w>" + "|".join(re.escape(x) for x in phrases) + r")\b"
        searched, row_text = np.unique(text_code[rows], return_inverse=True)
        found = pc.struct_field(pc.extract_regex(distinct_text.take(pa.array(searched)), pattern), "w")
        found = found.dictionary_encode()
        found_code = found.indices.fill_null(-1).to_numpy(zero_copy_only=False)[row_text]
        hit = found_code >= 0
        code[rows[hit]] = len(words) + found_code[hit]
        words += found.dictionary.to_pylist()
    adjective = np.asarray([w[:-2] if w.endswith("ly") and w[:-2] in lib else w for w in words], dtype=object)
    return code, adjective


def _strings(values) -> pa.Array:
    """``values`` (a pandas Series, array or pyarrow array) as one pyarrow string array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(np.asarray(values, dtype=object), type=pa.string(), from_pandas=True)
