"""The rules extractor's shortcuts read as its full definitions do: a clause's marks skip only readings that
cannot change its mentions, and word-gap limits are checked without counting words when a gap is short."""

from __future__ import annotations

import csv
from functools import reduce
from pathlib import Path

import pytest

from workflow.keyinfo.extract import (
    DEFAULT_CONVENTIONS,
    Conventions,
    Mention,
    _beyond,
    _clause_mentions,
    _marks,
    _scan,
    _words,
    normalise,
)
from workflow.keyinfo.libs import load_libs

CORPUS = Path(__file__).resolve().parent / "data" / "rg4_rewrite_corpus.tsv"
# one sentence at least per role a clause mark stands for, and the scan's cut of a phrase hiding a finding
SENTENCES = [
    "Small left pleural effusion.",
    "No pneumothorax, small left effusion, or consolidation.",
    "No focal consolidation, large effusion, or pneumothorax is seen.",
    "Atelectasis/scarring at the left base; possible pneumonia.",
    "Opacity may be secondary to atelectasis or pneumonia.",
    "Nodular opacity in the right lower lobe, consistent with a nipple shadow.",
    "Unchanged moderate cardiomegaly. Interval increase in small bilateral effusions.",
    "No enlargement of the cardiomediastinal silhouette.",
    "The heart is not significantly enlarged and the lungs are clear.",
    "Small left and moderate right pleural effusions, new since the prior study.",
    "Pacemaker with leads in the right atrium and right ventricle, dual-lead pacemaker device.",
    "Evaluation for pneumonia.  Correlate clinically for fracture.",
    "Calcified nodule   in the  left upper lobe, e.g. a granuloma, vs. scarring.",
    "Mild pulmonary edema has resolved; no residual effusion.",
]
ALL_MARKS = -1  # every reading runs, as if the clause held every role


def corpus_sentences() -> list[str]:
    with open(CORPUS, encoding="utf-8") as fh:
        rows = [r for r in csv.reader((line for line in fh if not line.startswith("#")), delimiter="\t") if r]
    return SENTENCES + [r[1] for r in rows if len(r) > 1]


def fields(mentions: list[Mention]) -> list[tuple]:
    return [
        tuple(sorted(m.lat) if slot == "lat" else getattr(m, slot) for slot in Mention.__slots__)
        for m in mentions
    ]


@pytest.mark.parametrize(
    "conv", [DEFAULT_CONVENTIONS, Conventions(alternatives="positive"), Conventions(hedges="positive")]
)
def test_a_clause_reads_the_same_with_its_marks_as_with_every_reading(conv):
    libs = load_libs()
    for text in corpus_sentences():
        norm = normalise(text)
        for marks, clause in _scan(norm, libs):
            assert marks == reduce(lambda acc, c: acc | _marks(c[2]), clause, 0), text
            shortcut = _clause_mentions(marks, clause, norm, text, "findings", libs, conv)
            full = _clause_mentions(ALL_MARKS, clause, norm, text, "findings", libs, conv)
            assert fields(shortcut) == fields(full), text


def test_the_splitter_yields_the_matchers_matches():
    """The scan reads the phrases and marks from ``splitter.split`` by their lengths: the same matches, at
    the same offsets, as the named matcher finds, also in a text cut where a phrase starts."""
    libs = load_libs()
    for text in corpus_sentences():
        norm = normalise(text)
        matches = [(m.start(), m.group()) for m in libs.matcher.finditer(norm)]
        for cut in {0, *(start for start, _ in matches)}:
            parts = libs.splitter.split(norm[cut:])
            found, at = [], cut + len(parts[0])
            for match, gap in zip(parts[1::2], parts[2::2], strict=True):
                found.append((at, match))
                at += len(match) + len(gap)
            assert found == [(s, g) for s, g in matches if s >= cut], (text, cut)


def test_the_hidden_finding_is_read_after_the_cut():
    libs = load_libs()
    norm = normalise("No enlargement of the cardiomediastinal silhouette.")
    (marks, clause), *_ = _scan(norm, libs)
    assert [tok.finding for _, _, tok in clause if tok.finding] == ["enlarged cardiomediastinum"]
    mentions = _clause_mentions(marks, clause, norm, norm, "findings", libs, DEFAULT_CONVENTIONS)
    assert [(m.name, m.presence) for m in mentions] == [("enlarged cardiomediastinum", "negative")]


def test_a_word_gap_is_beyond_a_limit_exactly_when_its_word_count_is():
    for text in [*SENTENCES, "a  b   c d", "xxx  ___ [** **] effusion", "", " ", "ab"]:
        norm = normalise(text)
        for a in range(len(norm) + 1):
            for b in range(len(norm) + 1):
                for limit in range(0, 12):
                    assert _beyond(norm, a, b, limit) == (_words(norm, a, b) > limit), (text, a, b, limit)
