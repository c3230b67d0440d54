"""Which studies the clinicians review: a seeded sample balanced over strata.

A study belongs to every stratum it can inform: ``presence:<p>`` when it has a finding of presence p
(positive / uncertain / negative), ``question:<type>`` per question type asked about it, ``rg4:<scenario>``
per RG4 scenario it is in. Uncertain findings or a rare question type would hardly appear in a simple
random sample of 100, so the sampler fills strata in turn: each draw takes a random, not yet chosen
study from the stratum that the sample so far covers least. Per-stratum precision is then estimated from
enough items; the sample is not proportional to the corpus (overall figures are per stratum, not pooled).
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa

log = logging.getLogger(__name__)

NO_STRATUM = "other"  # a study with items but none of the strata (e.g. no finding, question or RG4 record)


def _distinct(table: pa.Table, columns: list[str]) -> list[list]:
    """The distinct rows of ``columns`` as Python columns."""
    unique = table.select(columns).group_by(columns, use_threads=False).aggregate([])
    return [unique.column(c).to_pylist() for c in columns]


def study_strata(findings: pa.Table, questions: pa.Table, rg4: Mapping[str, pa.Table]) -> dict[int, set[str]]:
    """study_id -> its strata, for every study that has at least one reviewable item."""
    strata: dict[int, set[str]] = {}
    studies, presences = _distinct(findings, ["study_id", "presence"])
    for study, presence in zip(studies, presences, strict=True):
        strata.setdefault(int(study), set()).add(f"presence:{presence}")
    studies, types = _distinct(questions, ["study_id", "question_type"])
    for study, qtype in zip(studies, types, strict=True):
        strata.setdefault(int(study), set()).add(f"question:{qtype}")
    for scenario, table in rg4.items():
        for study in _distinct(table, ["study_id"])[0]:
            strata.setdefault(int(study), set()).add(f"rg4:{scenario}")
    return strata


def stratified_sample(
    strata: Mapping[int, Iterable[str]], n: int, seed: int, exclude: Iterable[int] = ()
) -> list[int]:
    """``n`` study ids (fewer if fewer are eligible), in draw order; the same inputs give the same sample.

    Each draw picks the stratum with the fewest chosen studies so far (ties: a seeded random order of the
    strata) among those with studies left, then a seeded random study of it. Excluded ids never appear.
    """
    if n < 0:
        raise ValueError(f"review.n must be >= 0, got {n}")
    excluded = {int(x) for x in exclude}
    rng = random.Random(seed)
    labels_of = {
        int(s): (sorted(set(labels)) or [NO_STRATUM])
        for s, labels in strata.items()
        if int(s) not in excluded
    }
    members: dict[str, list[int]] = {}
    for study in sorted(labels_of):
        for label in labels_of[study]:
            members.setdefault(label, []).append(study)
    order = sorted(members)
    rng.shuffle(order)
    tie_rank = {label: i for i, label in enumerate(order)}
    for label in order:  # in a fixed order, so the draws do not depend on dict iteration
        rng.shuffle(members[label])
    next_index = dict.fromkeys(members, 0)
    coverage: Counter = Counter()
    chosen: list[int] = []
    taken: set[int] = set()
    target = min(n, len(labels_of))
    while len(chosen) < target:
        open_labels = [label for label in order if next_index[label] < len(members[label])]
        label = min(open_labels, key=lambda lb: (coverage[lb], tie_rank[lb]))
        pool = members[label]
        while next_index[label] < len(pool) and pool[next_index[label]] in taken:
            next_index[label] += 1
        if next_index[label] == len(pool):
            continue  # every study of this stratum is already in: try the next stratum
        study = pool[next_index[label]]
        next_index[label] += 1
        chosen.append(study)
        taken.add(study)
        coverage.update(labels_of[study])
    if len(chosen) < n:
        log.warning("review: %d studies requested, only %d eligible", n, len(chosen))
    return chosen


def read_exclusions(path: str | Path | None) -> set[int]:
    """Study ids never to sample (`review.exclude`): one id per line, or a CSV with a ``study_id`` column
    (e.g. an earlier round's verdicts.csv or sample.csv). Blank lines and ``#`` comments are ignored."""
    if not path:
        return set()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config: `review.exclude` points to {str(path)!r}, which does not exist")
    lines = [(number, ln.strip()) for number, ln in enumerate(path.read_text().splitlines(), start=1)]
    lines = [(number, ln) for number, ln in lines if ln and not ln.startswith("#")]
    if lines and "study_id" in next(csv.reader([lines[0][1]])):
        with path.open(newline="") as fh:
            rows = csv.DictReader(ln for ln in fh if ln.strip() and not ln.startswith("#"))
            return {int(row["study_id"]) for row in rows if row["study_id"].strip()}
    ids = set()
    for number, line in lines:
        try:
            ids.add(int(line))
        except ValueError:
            raise ValueError(
                f"config: `review.exclude` file {str(path)!r}: line {number} is not a study id: {line[:40]!r}"
            ) from None
    return ids
