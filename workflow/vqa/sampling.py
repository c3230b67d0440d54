"""Random helpers (vectorised): one generator per question type, group picks, weighted draws, yes/no pairing."""

from __future__ import annotations

import numpy as np

from workflow.vqa.config import QUESTION_TYPES, VqaConfig
from workflow.vqa.libs import Templates


def type_rng(cfg: VqaConfig, qtype: str) -> np.random.Generator:
    """The generator of one question type; a shard's own one when the corpus is split in shards."""
    entropy = [cfg.seed, QUESTION_TYPES.index(qtype)]
    if cfg.shards > 1:
        entropy.append(cfg.shard)
    return np.random.default_rng(entropy)


def take_codes(values: np.ndarray, codes: np.ndarray, fill: int = -1) -> np.ndarray:
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


def choose_family(rng, n, qtype, fams, tpl: Templates) -> np.ndarray:
    w = np.array([tpl.weight(qtype, f) for f in fams], dtype=float)
    return rng.choice(len(fams), size=n, p=w / w.sum())


def uniform_template(rng, family_idx: np.ndarray, n: int) -> np.ndarray:
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
