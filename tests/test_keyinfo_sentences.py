"""Sentence splitting and the per-sentence cache of the rules extractor: a sentence is read the same however
it is wrapped, spaced or capitalised, and every row's offsets index the report's own text."""

from __future__ import annotations

import gc
import random
import re

import pyarrow as pa
import pytest

from workflow.contract import SECTIONS
from workflow.keyinfo.extract import (
    _SENTENCE_END,
    ABBREVIATIONS,
    ROW_COLUMNS,
    _merge_instances,
    extract_mentions,
    extract_sections,
    forget_sentences,
    label_vector,
    merge_presence,
    normalise,
    row_laterality,
    sections_read,
    sentences,
    squeeze,
    study_rows,
)
from workflow.keyinfo.libs import load_libs
from workflow.keyinfo.run_rules import run
from workflow.tables import write_table


def test_sentences_end_at_periods_but_not_at_abbreviations_or_decimals():
    norm = normalise(
        "Heart size is top normal, i.e. no cardiomegaly.  A 2.3 cm nodule vs. a nipple shadow. No effusion"
    )
    pieces = sentences(norm)
    assert [text for _, text in pieces] == [
        "heart size is top normal, i.e. no cardiomegaly.",
        "a 2.3 cm nodule vs. a nipple shadow.",
        "no effusion",
    ]
    assert all(norm[a : a + len(text)] == text for a, text in pieces)
    # "no." before a space reads as an abbreviation ("Effusion: no. Pneumothorax: no."), as in the scan
    assert [t for _, t in sentences(normalise("  Effusion: no. Size approx. 2 cm. Pneumothorax: no.  "))] == [
        "effusion: no. size approx. 2 cm.",
        "pneumothorax: no.",
    ]


def sentences_by_matches(norm: str) -> list[tuple[int, str]]:
    """The definition :func:`sentences` implements with one ``split``: each sentence ends at a match of
    _SENTENCE_END (its period kept, the spaces after it dropped)."""
    out = []
    start = len(norm) - len(norm.lstrip(" "))
    for m in _SENTENCE_END.finditer(norm):
        out.append((start, norm[start : m.start() + 1]))
        start = m.end()
    last = norm[start:].rstrip(" ")
    if last:
        out.append((start, last))
    return out


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "No effusion",
        "No effusion.",
        "  No effusion.  ",
        "Lungs clear. . No effusion",
        "Lungs clear.\x0bNo effusion. Dr. Smith. No. 2 tube.",
        "Heart size is top normal, i.e. no cardiomegaly.  A 2.3 cm nodule vs. a nipple shadow. No effusion",
        "Effusion: no. Size approx. 2 cm. Pneumothorax: no.",
        "..  A. B.C.  D .  ",
    ],
)
def test_sentences_are_cut_at_every_sentence_end_match(text):
    norm = normalise(text)
    assert sentences(norm) == sentences_by_matches(norm)


def test_a_sentence_end_is_a_period_after_no_abbreviation():
    """_SENTENCE_END's lookbehinds (one per abbreviation length) end a sentence where one lookbehind per
    abbreviation does: after a space or at the text's start (anywhere for six letters), not after a word."""
    one_each = re.compile(
        r"\."
        + "".join(
            rf"(?<!{re.escape(a)}\.)" if len(a) >= 6 else rf"(?<! {re.escape(a)}\.)(?<!^{re.escape(a)}\.)"
            for a in ABBREVIATIONS
        )
        + r"(?: +|(?=\s))"
    )
    for a in ABBREVIATIONS:
        for text in (f"{a}. x", f"  {a}. x", f"y {a}. x", f"y{a}. x", f"{a}.", f"x. {a}.\x0bz", f"{a}{a}. x"):
            norm = normalise(text)
            assert [m.span() for m in _SENTENCE_END.finditer(norm)] == [
                m.span() for m in one_each.finditer(norm)
            ], text
            assert sentences(norm) == sentences_by_matches(norm), text


def test_squeeze_keeps_one_space_per_run_and_says_where_the_characters_were():
    sentence = "small  left\n   effusion".replace("\n", " ")
    squeezed, starts, dropped = squeeze(sentence)
    assert squeezed == "small left effusion"
    # "effusion" starts at squeezed offset 11; in the sentence 1 + 3 spaces earlier were dropped
    k = max(i for i, s in enumerate(starts) if s <= 11)
    assert sentence[11 + dropped[k] :].startswith("effusion")


WRAPPED = {
    "findings": "There is a small left pleural effusion.\nNo pneumothorax. The heart is mildly enlarged.",
}
REWRAPPED = {
    "findings": "THERE IS A SMALL LEFT\n   PLEURAL   EFFUSION.  No  pneumothorax.\n\nThe heart is mildly\n enlarged.",
}


def reading(rows: list[dict]) -> list[tuple]:
    return [(r["name"], r["presence"], r["location"], r["level"], r["type"], r["change"]) for r in rows]


def test_a_sentence_reads_the_same_however_wrapped_and_its_offsets_index_each_report():
    first = extract_sections(WRAPPED)
    again = extract_sections(REWRAPPED)  # the same squeezed sentences: read from the cache
    assert reading(first) == reading(again)
    assert ("pleural effusion", "positive", "left", "mild", None, None) in reading(again)  # small: mild
    for sections, rows in ((WRAPPED, first), (REWRAPPED, again)):
        text = sections["findings"]
        for r in rows:
            assert text[r["start"] : r["end"]] == r["evidence"]
            assert r["raw_name"] in r["evidence"]
    effusion = next(r for r in again if r["name"] == "pleural effusion")
    assert effusion["raw_name"] == "PLEURAL   EFFUSION"
    assert effusion["evidence"] == "SMALL LEFT\n   PLEURAL   EFFUSION"


def whole_section_statement(sections):
    """The definition the per-sentence reading must match: the first normal statement found in the
    normalised text of each section read, as written."""
    pattern = load_libs().normal_statements
    for section in sections_read(sections):
        text = sections.get(section)
        m = pattern.search(normalise(text)) if text else None
        if m:
            return text[m.start() : m.end()]
    return None


@pytest.mark.parametrize(
    "sections",
    [
        {"findings": "Lungs are clear.", "impression": "No acute\n   cardiopulmonary  process.  Stable."},
        {"findings": "Heart normal.  NO ACUTE CARDIOPULMONARY PROCESS.", "impression": "No acute process."},
        {"findings": None, "impression": "Small effusion. No  acute disease;  no acute process."},
        {"last_paragraph": "Stable. No acute\n cardiopulmonary abnormality."},
        {"findings": "Small left effusion.", "impression": "Unchanged."},
    ],
)
def test_the_normal_statement_comes_with_the_rows_from_the_same_reading(sections):
    rows, statement = study_rows(sections)
    assert statement == whole_section_statement(sections)
    assert [dict(zip(ROW_COLUMNS, r, strict=True)) for r in rows] == extract_sections(sections)


def test_a_cached_sentence_keeps_the_section_it_was_found_in():
    assert extract_sections({"findings": "No pneumothorax."})[0]["section"] == "findings"
    assert extract_sections({"impression": "No pneumothorax."})[0]["section"] == "impression"


def test_the_rule_leaves_the_callers_collector_settings_as_they_were(tmp_path):
    sections = tmp_path / "sections.parquet"
    cols = {f.name: [None] for f in SECTIONS}
    cols.update(subject_id=[1], study_id=[2], findings=["Small left effusion."])
    write_table(pa.Table.from_pydict(cols, schema=SECTIONS), sections, SECTIONS)
    before = gc.get_threshold()
    run(sections, tmp_path / "f.parquet", tmp_path / "s.parquet", tmp_path / "r.parquet")
    assert gc.get_threshold() == before


def labels_of_whole_text(text: str) -> dict[str, str]:
    """The definition label_vector's per-sentence reading must match: the merged presence of the mentions
    extract_mentions finds in the whole text read as findings."""
    return merge_presence((m.name, m.presence) for m in extract_mentions({"findings": text}))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "No effusion",
        "Compared to the prior study, there is a small left pleural effusion.  No pneumothorax.",
        "Small left pleural effusion. No pneumothorax.",  # the sentences of the rewrite above, read again
        "SMALL LEFT\n   PLEURAL   EFFUSION.  No  pneumothorax.",  # the same sentences, wrapped and capitalised
        "1. Stable mild cardiomegaly. 2. Hyperexpanded but clear lungs.",
        "Heart size is top normal, i.e. no cardiomegaly.  A 2.3 cm nodule vs. a nipple shadow. No effusion",
        "The pacemaker leads are unchanged. Dual-lead pacemaker device with leads in the right atrium.",
        "No new consolidation, effusion or edema. The previously seen opacity has resolved.",
        "Effusion: no. Size approx. 2 cm. Pneumothorax: no.",
    ],
)
def test_label_vector_reads_sentence_by_sentence_as_the_whole_text_reads(text):
    assert label_vector(text) == labels_of_whole_text(text)
    assert label_vector(text) == labels_of_whole_text(text)  # again, from the sentence cache


def plain_rows(sections: dict[str, str | None]) -> list[list]:
    """The definition the cached per-sentence reading implements: every mention of a whole-section scan
    (extract_mentions, no cache), as findings rows with offsets in the section's own text, merged."""
    libs = load_libs()
    rows, keys = [], []
    for m in extract_mentions(sections):
        row = [m.name, m.raw, m.presence, m.location(libs), m.level, m.type, m.change, m.section, m.ev_start,
               m.ev_end, m.evidence or m.raw]  # fmt: skip
        rows.append(row)
        keys.append(row_laterality(dict(zip(ROW_COLUMNS, row, strict=True))))
    return _merge_instances(rows, keys)


def rewrapped(text: str, seed: int) -> str:
    """``text`` as another report template writes it: some spaces doubled or made line breaks, upper case."""
    rng = random.Random(seed)
    words = text.split(" ")
    out = words[0]
    for word in words[1:]:
        out += rng.choice([" ", " ", "  ", "\n ", "   "]) + word
    return out.upper() if seed % 3 == 0 else out


def realistic_sections() -> list[dict[str, str | None]]:
    from test_keyinfo_scan import corpus_sentences

    sentences = corpus_sentences()
    out = []
    for k in range(0, len(sentences), 3):
        findings = " ".join(sentences[k : k + 3])
        out.append({"findings": findings, "impression": sentences[k]})
        out.append({"findings": rewrapped(findings, k), "impression": rewrapped(sentences[k], k + 1)})
    return out


def test_cached_sentence_rows_are_those_of_the_plain_reading():
    sections_list = realistic_sections()
    forget_sentences()
    cold = [study_rows(s)[0] for s in sections_list]  # each squeezed sentence read once
    warm = [study_rows(s)[0] for s in sections_list]  # every sentence from the cache
    again = [study_rows(s)[0] for s in reversed(sections_list)][::-1]
    for sections, a, b, c in zip(sections_list, cold, warm, again, strict=True):
        assert a == b == c == plain_rows(sections), sections
