"""The frame every question builder returns, and the answer joins they share.

A frame has one row per question: ``s`` (study number), ``tid`` (template), ``name``, ``loc``, ``view``
(slot codes; -1 = unused) and ``answer``."""

from __future__ import annotations

import numpy as np
import pandas as pd


def question_frame(s, tid, answer, name=None, loc=None, view=None) -> pd.DataFrame:
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


def join_names(pairs: pd.DataFrame, display: np.ndarray) -> pd.Series:
    """Per study: the distinct names of ``pairs`` (s, name) in vocabulary order, comma-joined."""
    pairs = pairs.drop_duplicates(["s", "name"]).sort_values(["s", "name"], kind="stable")
    s = pairs["s"].to_numpy()
    name = pairs["name"].to_numpy()
    if len(display) > 62:  # too many names for a bit set: join per study
        return pd.Series(display[name], index=s).groupby(level=0).agg(", ".join)
    return _join_bit_sets(s, name, display, range(len(display)))


def _join_bit_sets(keys: np.ndarray, codes: np.ndarray, texts: np.ndarray, order) -> pd.Series:
    """Per run of equal ``keys`` (grouped): its ``codes`` (distinct within a run, each < 63) as ``texts``
    listed in ``order``, comma-joined. A run's codes become one int64 bit set, and each distinct set is
    joined once (the same few sets repeat over thousands of studies)."""
    start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=np.int64)
    sets = np.add.reduceat(np.left_shift(np.int64(1), codes), start) if len(keys) else np.zeros(0, np.int64)
    uniq, inv = np.unique(sets, return_inverse=True)
    joined = [", ".join(texts[j] for j in order if (int(m) >> j) & 1) for m in uniq]
    return pd.Series(np.asarray(joined, dtype=object)[inv.ravel()], index=keys[start])


def distinct_join(groups: pd.DataFrame, values: list[str], col: str) -> pd.Series:
    """Per (s, name): distinct non-null ``col`` values, sorted, comma-joined (fast path for one value)."""
    g = groups[groups[col] >= 0][["s", "name", col]].drop_duplicates()
    values = np.asarray(values, dtype=object)
    # sorted as the values' strings (a code's rank among them) without sorting Python strings per row
    rank = np.empty(len(values), dtype=np.int64)
    rank[np.argsort(values.astype(str), kind="stable")] = np.arange(len(values))
    s, name, code = (g[c].to_numpy() for c in ("s", "name", col))
    order = np.lexsort((rank[code], name, s))
    key = s[order] * 1_000_003 + name[order]
    code = code[order]
    multi = pd.Series(key).duplicated(keep=False).to_numpy()
    out = pd.Series(values[code[~multi]], index=key[~multi])
    if multi.any():
        key, code = key[multi], code[multi]
        if len(values) <= 62:
            joined = _join_bit_sets(key, code, values, np.argsort(rank))
        else:
            joined = pd.Series(values[code], index=key).groupby(level=0).agg(", ".join)
        out = pd.concat([out, joined])
    return out
