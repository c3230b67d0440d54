"""Sectioning with MIT-LCP section_parser semantics: every branch of reference §1.8 with hand-written
expected outputs, the name normalisation rules, the special studies, the MIT csv byte format and the
rule's tables (sections / csv / rejects)."""

from __future__ import annotations

import csv
import io
import random
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow.contract import REJECTS, SECTION_NAMES, SECTIONS, STUDIES
from workflow.sections import (
    CONCLUSION_ORDER,
    CUSTOM_INDICES,
    CUSTOM_SECTION_NAMES,
    conclusion,
    main,
    mit_csv_rows,
    normalize_section_name,
    run,
    section_text,
    split_report,
)

REPO = Path(__file__).resolve().parents[1]
BANNER = "                                 FINAL REPORT\n"

STANDARD = (
    BANNER + " EXAMINATION:  CHEST (PA AND LAT)\n"
    " \n"
    " INDICATION:  ___ year old woman with ?pleural effusion  // ?pleural effusion\n"
    " \n"
    " TECHNIQUE:  Chest PA and lateral\n"
    " \n"
    " COMPARISON:  ___\n"
    " \n"
    " FINDINGS: \n"
    " \n"
    " Large left pleural effusion.  No pneumothorax.\n"
    " \n"
    " IMPRESSION: \n"
    " \n"
    " Large left pleural effusion.\n"
)


def conclusion_source(sections: dict) -> str | None:
    return next((name for name in CONCLUSION_ORDER if sections[name] is not None), None)


# --- §1.8 branches -----------------------------------------------------------------------------------


def test_standard_template_sections_texts_and_offsets():
    sections, names, starts = section_text(STANDARD)
    assert names == [
        "preamble",
        "examination",
        "indication",
        "technique",
        "comparison",
        "findings",
        "impression",
    ]
    assert sections[0] == BANNER + " "  # up to the header name: includes the "\n " before it
    assert sections[1] == " CHEST (PA AND LAT)\n "  # unstripped: one space after the colon is eaten
    assert sections[5] == "\n \n Large left pleural effusion.  No pneumothorax.\n "
    assert sections[6] == "\n \n Large left pleural effusion.\n"
    for body, start in zip(sections, starts, strict=True):
        assert STANDARD[start : start + len(body)] == body
    assert split_report(STANDARD) == {
        "preamble": "FINAL REPORT",
        "examination": "CHEST (PA AND LAT)",
        "indication": "___ year old woman with ?pleural effusion  // ?pleural effusion",
        "history": None,
        "technique": "Chest PA and lateral",
        "comparison": "___",
        "findings": "Large left pleural effusion.  No pneumothorax.",
        "impression": "Large left pleural effusion.",
        "last_paragraph": None,
    }


def test_headerless_three_paragraphs_become_full_report_plus_all_later_paragraphs():
    text = (
        BANNER + " PA and lateral views of the chest.\n"
        " \n"
        " The lungs are clear.  Heart size is normal.\n"
        " \n"
        " No acute cardiopulmonary process.\n"
    )
    sections, names, starts = section_text(text)
    assert names == ["full report", "last_paragraph"]
    assert sections[0] == BANNER + " PA and lateral views of the chest."
    # all paragraphs after the first, not literally the last one
    assert (
        sections[1] == " The lungs are clear.  Heart size is normal.\n \n No acute cardiopulmonary process.\n"
    )
    assert text[starts[1] :] == sections[1]
    parsed = split_report(text)
    assert (
        parsed["last_paragraph"]
        == "The lungs are clear.  Heart size is normal.\n \n No acute cardiopulmonary process."
    )
    assert conclusion_source(parsed) == "last_paragraph"


def test_headerless_single_paragraph_has_no_usable_section():
    text = BANNER + " Lungs are clear.  No effusion.\n"
    assert section_text(text) == ([text], ["full report"], [0])
    parsed = split_report(text)
    assert all(parsed[name] is None for name in SECTION_NAMES)
    assert conclusion(50000001, text) == ""


def test_headers_without_leading_space_or_digit_or_lower_case_are_not_headers():
    no_space = "FINAL REPORT\nFINDINGS: Lungs clear.\n\nIMPRESSION: Normal.\n"
    assert section_text(no_space)[1] == ["full report"]  # "\n\n" is not a MIMIC paragraph break either
    digit_lower = BANNER + " IMPRESSION 1: Clear lungs.\n Findings: normal heart.\n"
    assert section_text(digit_lower)[1] == ["full report"]
    at_start = " IMPRESSION:  Clear.\n"  # a header needs the newline before it: not at offset 0
    assert section_text(at_start)[1] == ["full report"]


def test_empty_title_header_maps_to_findings_and_is_dropped():
    text = (
        BANNER + " CHEST, PA LATERAL:\n"
        " \n"
        " INDICATION:  Cough.\n"
        " \n"
        " FINDINGS:  Clear lungs.\n"
        " \n"
        " IMPRESSION:  Normal chest.\n"
    )
    assert normalize_section_name("CHEST, PA LATERAL") == "findings"
    sections, names, _ = section_text(text)
    assert names == ["preamble", "indication", "findings", "impression"]
    assert sections[2] == " Clear lungs.\n "


def test_duplicate_findings_header_drops_the_empty_one():
    text = BANNER + " FINDINGS: \n \n FINDINGS:  Heart normal.\n \n IMPRESSION:  Normal.\n"
    sections, names, _ = section_text(text)
    assert names == ["preamble", "findings", "impression"]
    assert split_report(text)["findings"] == "Heart normal."


def test_header_on_the_line_after_a_header_is_swallowed():
    text = BANNER + " FINDINGS:\n IMPRESSION: No acute process.\n"
    sections, names, _ = section_text(text)
    assert names == ["preamble", "findings"]
    assert sections[1] == " IMPRESSION: No acute process.\n"
    parsed = split_report(text)
    assert parsed["impression"] is None
    assert parsed["findings"] == "IMPRESSION: No acute process."


def test_comparison_followed_by_paragraphs_gives_last_paragraph_and_truncated_comparison():
    text = (
        BANNER + " HISTORY:  Chest pain.\n \n COMPARISON:  ___.\n \n The lungs are clear.\n \n No effusion.\n"
    )
    parsed = split_report(text)
    assert parsed["history"] == "Chest pain."
    assert parsed["comparison"] == "___."
    assert parsed["last_paragraph"] == "The lungs are clear.\n \n No effusion."
    assert conclusion_source(parsed) == "last_paragraph"


def test_ndication_typo_is_an_impression_upstream_bug_kept():
    text = BANNER + " NDICATION:  Pneumonia.\n \n COMPARISON:  None.\n"
    parsed = split_report(text)
    assert parsed["impression"] == "Pneumonia."
    assert parsed["indication"] is None
    assert conclusion(50000002, text) == "Pneumonia."


def test_duplicate_impression_keeps_both_and_the_last_wins():
    text = BANNER + " IMPRESSION:  First read.\n \n IMPRESSION:  Second read.\n"
    assert section_text(text)[1] == ["preamble", "impression", "impression"]
    assert split_report(text)["impression"] == "Second read."


def test_conclusion_impresson_findngs_aliases():
    text = BANNER + " FINDNGS:  Heart normal.\n CONCLUSION:  Normal one.\n IMPRESSON:  Normal two.\n"
    assert section_text(text)[1] == ["preamble", "findings", "impression", "impression"]
    parsed = split_report(text)
    assert parsed["findings"] == "Heart normal."
    assert parsed["impression"] == "Normal two."


def test_report_ending_in_one_paragraph_notification_has_no_conclusion():
    text = (
        BANNER + " PROVIDER:  Dr. ___\n"
        " \n"
        " REASON:  Evaluate.\n"
        " \n"
        " The lungs are clear.\n"
        " \n"
        " NOTIFICATION:  Discussed with Dr. ___ at 10:30 AM.\n"
    )
    parsed = split_report(text)
    assert parsed["provider"] == "Dr. ___"  # unmapped names are kept as they are
    assert parsed["reason"] == "Evaluate.\n \n The lungs are clear."  # the body text sits here
    assert parsed["notification"] == "Discussed with Dr. ___ at 10:30 AM."
    assert conclusion_source(parsed) is None
    assert conclusion(50000003, text) == ""


def test_wrapped_line_starting_with_note_is_a_false_header():
    text = (
        BANNER + " FINDINGS: \n"
        " \n"
        " Heart size is normal.  Lungs are clear.\n"
        " NOTE:  Comparison was made with a prior study.\n"
        " Mild degenerative changes of the spine.\n"
        " \n"
        " IMPRESSION: \n"
        " \n"
        " No acute process.\n"
    )
    parsed = split_report(text)
    assert parsed["findings"] == "Heart size is normal.  Lungs are clear."
    assert (
        parsed["note"] == "Comparison was made with a prior study.\n Mild degenerative changes of the spine."
    )
    assert parsed["impression"] == "No acute process."


def test_wet_read_absorbs_underscores_and_second_banner():
    underscores = " " + "_" * 78
    text = (
        "\n WET READ: ___ ___ 10:15 PM\n"
        "  No pneumothorax.\n" + underscores + "\n" + BANNER + " EXAMINATION:  CHEST (PORTABLE AP)\n"
        " \n"
        " INDICATION:  Line placement.\n"
        " \n"
        " IMPRESSION: \n"
        " \n"
        " Right IJ line tip in the SVC.  No pneumothorax.\n"
    )
    sections, names, _ = section_text(text)
    assert names == ["preamble", "wet read", "examination", "indication", "impression"]
    assert sections[0] == "\n "
    assert sections[
        1
    ].strip() == "___ ___ 10:15 PM\n  No pneumothorax.\n" + underscores + "\n" + BANNER.rstrip("\n")
    parsed = split_report(text)
    assert parsed["examination"] == "CHEST (PORTABLE AP)"
    assert parsed["impression"] == "Right IJ line tip in the SVC.  No pneumothorax."


def test_header_whitespace_is_one_character_of_any_kind():
    text = BANNER + " COMPARISON:\t___\n IMPRESSION:\xa0Normal.\n"  # tab and no-break space both count
    parsed = split_report(text)
    assert parsed["comparison"] == "___"
    assert parsed["impression"] == "Normal."
    assert section_text(BANNER + " IMPRESSION:Normal.\n")[1] == ["full report"]  # no whitespace: no header


def test_carriage_returns_are_read_as_text_mode_does():
    text = STANDARD.replace("\n", "\r\n")
    assert split_report(text) == split_report(STANDARD)


def test_empty_impression_alone_leaves_preamble_as_last_section():
    text = BANNER + " \n PA view.\n IMPRESSION: \n \n"
    sections, names, _ = section_text(text)
    assert names == ["preamble", "last_paragraph"]
    assert split_report(text)["last_paragraph"] == "PA view."


# --- name normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "canonical"),
    [
        ("IMPRESSION", "impression"),
        ("FINDINGS AND IMPRESSION", "impression"),
        ("FINDINGS/ IMPRESSION", "impression"),
        ("MPRESSION", "impression"),
        ("CHEST, TWO VIEWS", "findings"),
        ("REFERENCE FINDINGS", "findings"),
        ("COMPARISONS", "comparison"),
        ("REFERENCE EXAM", "comparison"),
        ("REASON FOR EXAM", "indication"),
        ("IDICATION", "indication"),
        ("EXAM", "examination"),
        ("TYPE OF EXAMINATION", "examination"),
        ("PFI", "history"),
        ("CLINICAL INFORMATION", "history"),
        ("RECOMMENDATION(S)", "recommendations"),
        ("WETREAD", "wet read"),
        # (b) substrings, first of impression > findings > history > comparison > addendum
        ("IMPRESSION AND RECOMMENDATIONS", "impression"),
        ("HISTORY OF PRESENT ILLNESS", "history"),
        ("COMPARISON STUDY", "comparison"),
        ("FINDINGS AND HISTORY", "findings"),
        ("HISTORY AND COMPARISON", "history"),
        ("ADDENDUM TO REPORT", "addendum"),
        # (c) describes the whole study
        ("PORTABLE CHEST", "findings"),
        ("CHEST (PA AND LAT)", "findings"),
        ("PA AND LATERAL", "findings"),
        ("BONE WINDOW", "findings"),
        ("FRONTAL SEMI-UPRIGHT", "findings"),
        ("RIBS", "findings"),
        # (d) kept as they are
        ("PROVIDER", "provider"),
        ("NOTE", "note"),
        ("CONCUSION", "concusion"),
        ("  FULL REPORT ", "full report"),
    ],
)
def test_normalize_section_name(header, canonical):
    assert normalize_section_name(header) == canonical


def test_section_text_equals_the_search_and_skip_loop_of_the_spec():
    """The spec resumes the header search after the first newline of each body; our finditer parse
    must give the same sections on report-like random text (headers, bad headers, odd whitespace)."""
    header = re.compile(r"\n ([A-Z ()/,-]+):\s")

    def spec_loop(text):
        match = header.search(text)
        if match is None:
            return [text], ["full report"]
        bodies, raw = [text[: match.start(1)]], ["preamble"]
        while match:
            start = match.end()
            skip = max(text[start:].find("\n"), 0)
            nxt = header.search(text, start + skip)
            bodies.append(text[start : nxt.start() if nxt else len(text)])
            raw.append(match.group(1))
            match = nxt
        return bodies, [normalize_section_name(n) for n in raw]

    pieces = ["\n", " ", "\n \n", ":", ": ", ":\n", "___", "Lungs clear.", "IMPRESSION 1: x", "\t", "\xa0"]
    headers = ["IMPRESSION", "FINDINGS", "COMPARISON", "NOTE", "CHEST, PA LATERAL", "X", "A B"]
    rng = random.Random(7)
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(0, 10)):
            if rng.random() < 0.4:
                parts.append(
                    "\n" + rng.choice([" ", "", "  "]) + rng.choice(headers) + rng.choice([":", ": ", ":\n"])
                )
            else:
                parts.append(rng.choice(pieces))
        text = "".join(parts)
        bodies, names = spec_loop(text)
        ours_bodies, ours_names, _ = section_text(text)
        # the spec's remaining steps: drop empty impression/findings, then split off last_paragraph
        keep = [i for i, n in enumerate(names) if n not in ("impression", "findings") or bodies[i].strip()]
        bodies, names = [bodies[i] for i in keep], [names[i] for i in keep]
        if "impression" not in names and "findings" not in names and "\n \n" in bodies[-1]:
            head, _, rest = bodies[-1].partition("\n \n")
            bodies[-1:] = [head, rest]
            names.append("last_paragraph")
        assert (ours_bodies, ours_names) == (bodies, names), text
        assert split_report(text) == {
            **dict.fromkeys(SECTION_NAMES),
            **{n: b.strip() for n, b in zip(names, bodies, strict=True)},
        }


# --- special studies and the conclusion --------------------------------------------------------------


def test_special_study_tables_have_the_documented_sizes():
    assert len(CUSTOM_SECTION_NAMES) == 23
    assert len(CUSTOM_INDICES) == 31
    assert sum(1 for span in CUSTOM_INDICES.values() if span == (0, 0)) == 8
    assert not set(CUSTOM_SECTION_NAMES) & set(CUSTOM_INDICES)


def test_conclusion_rules():
    text = STANDARD + " \n RECOMMENDATION(S):  Follow-up CT.\n"
    assert conclusion(50000004, text) == "Large left pleural effusion."  # impression first
    assert conclusion(50913680, text) == "Follow-up CT."  # custom section name: recommendations
    assert conclusion(50525523, text) == text[201:349]  # custom slice, raw and unstripped
    assert conclusion(58235663, text) == ""  # (0, 0): no findings at all
    # a custom-named study lacking its section: MIT would crash; we fall back to the generic priority
    assert conclusion(56451190, STANDARD) == "Large left pleural effusion."


# --- MIT csv format ----------------------------------------------------------------------------------


def test_mit_csv_rows_quote_like_csv_writer():
    cols = {
        "impression": ['Effusion, "large".\n More.', None, ""],
        "findings": [None, "plain", "cr\ronly"],
        "last_paragraph": [None, None, 'say "hi"'],
        "comparison": ["___", "a,b", None],
    }
    got = mit_csv_rows(pa.array([1, 2, 3], pa.int64()), pa.table(cols)).to_pybytes()
    assert got == (
        b's1,"Effusion, ""large"".\n More.",,,___\r\ns2,,plain,,"a,b"\r\ns3,,"cr\ronly","say ""hi""",\r\n'
    )


def test_mit_csv_rows_match_csv_writer_on_random_fields_and_slices():
    rng = random.Random(3)
    alphabet = ["a", ",", '"', "\n", "\r", " ", "ü", "\t", "'"]
    cols = {
        name: [
            None if rng.random() < 0.2 else "".join(rng.choices(alphabet, k=rng.randint(0, 6)))
            for _ in range(400)
        ]
        for name in CONCLUSION_ORDER
    }
    ids = list(range(50_000_000, 50_000_400))
    expected = io.StringIO(newline="")
    writer = csv.writer(expected)
    for i, study in enumerate(ids):
        writer.writerow([f"s{study}", *(cols[name][i] for name in CONCLUSION_ORDER)])
    table = pa.table(cols)
    assert mit_csv_rows(pa.array(ids), table).to_pybytes() == expected.getvalue().encode()
    # a slice (non-zero array offset) gives exactly its rows
    expected_slice = io.StringIO(newline="")
    writer = csv.writer(expected_slice)
    for i in range(100, 150):
        writer.writerow([f"s{ids[i]}", *(cols[name][i] for name in CONCLUSION_ORDER)])
    sliced = mit_csv_rows(pa.array(ids).slice(100, 50), table.slice(100, 50)).to_pybytes()
    assert sliced == expected_slice.getvalue().encode()


# --- the rule ----------------------------------------------------------------------------------------


def studies_table(rows: list[tuple[int, int, str]]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "subject_id": [r[0] for r in rows],
            "study_id": [r[1] for r in rows],
            "split": ["train"] * len(rows),
            "study_datetime": [None] * len(rows),
            "report": [r[2] for r in rows],
            "source_path": [f"files/p{str(r[0])[:2]}/p{r[0]}/s{r[1]}.txt" for r in rows],
        },
        schema=STUDIES,
    )


HEADERLESS = BANNER + " PA and lateral views.\n \n Lungs clear.\n \n No effusion.\n"
SINGLE = BANNER + " Lungs are clear.\n"


@pytest.fixture
def studies(tmp_path) -> Path:
    rows = [
        (10000001, 50000010, STANDARD),
        (10000001, 50000011, HEADERLESS),
        (10000002, 50000012, SINGLE),  # no usable section: kept, every column but none-of-four
        (10000002, 50000013, ""),  # empty → rejected, but MIT writes an all-empty row
        (10000003, 50000014, " \n \n"),  # whitespace → rejected
        (10000003, 50913680, STANDARD + " \n RECOMMENDATION(S):  CT.\n"),  # special: not in the csv
        (10000004, 58235663, HEADERLESS),  # special (0, 0)
        (10000004, 50000010, SINGLE),  # duplicate id → rejected, first occurrence wins
        (10000005, 50000015, BANNER + ' IMPRESSION:  Effusion, "small".\n'),
    ]
    path = tmp_path / "studies.parquet"
    pq.write_table(studies_table(rows), path, row_group_size=3)  # chunks are made of row groups
    return path


def read_csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


def test_rule_outputs(studies, tmp_path):
    out = tmp_path / "out"
    line = run(studies, out / "sections.parquet", out / "mimic_cxr_sectioned.csv", out / "rejects.parquet")
    assert line == "sections: 9 studies in, 6 out, 3 rejected"

    sections = pq.read_table(out / "sections.parquet")
    assert sections.schema.equals(SECTIONS)
    by_id = {row["study_id"]: row for row in sections.to_pylist()}
    assert list(by_id) == [50000010, 50000011, 50000012, 50913680, 58235663, 50000015]
    assert by_id[50000010]["impression"] == "Large left pleural effusion."
    assert by_id[50000010]["technique"] == "Chest PA and lateral"
    assert by_id[50000011]["last_paragraph"] == "Lungs clear.\n \n No effusion."
    assert all(by_id[50000012][name] is None for name in SECTION_NAMES)
    assert by_id[50913680]["impression"] == "Large left pleural effusion."  # generic parse for specials
    assert by_id[58235663]["last_paragraph"] == "Lungs clear.\n \n No effusion."

    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects.schema.equals(REJECTS)
    assert sorted((r["study_id"], r["reason"]) for r in rejects.to_pylist()) == [
        (50000010, "duplicate_study_id"),
        (50000013, "empty_report"),
        (50000014, "empty_report"),
    ]

    raw = (out / "mimic_cxr_sectioned.csv").read_bytes()
    assert raw.startswith(b"study,impression,findings,last_paragraph,comparison\r\n")
    assert raw.count(b"\r\n") == 7  # header + 6 rows; newlines inside fields stay "\n"
    assert b'"Lungs clear.\n \n No effusion."' in raw
    assert read_csv_rows(out / "mimic_cxr_sectioned.csv")[1:] == [
        [
            "s50000010",
            "Large left pleural effusion.",
            "Large left pleural effusion.  No pneumothorax.",
            "",
            "___",
        ],
        ["s50000011", "", "", "Lungs clear.\n \n No effusion.", ""],
        ["s50000012", "", "", "", ""],
        ["s50000013", "", "", "", ""],
        ["s50000014", "", "", "", ""],
        ["s50000015", 'Effusion, "small".', "", "", ""],
    ]


def test_rule_batches_and_workers_do_not_change_outputs(studies, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    run(studies, a / "s.parquet", a / "m.csv", a / "r.parquet", batch_size=1000, workers=1)
    scratch = tmp_path / "scratch"  # where the pool's workers hand their chunks back
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run(studies, b / "s.parquet", b / "m.csv", b / "r.parquet", batch_size=2, workers=2)  # 3 chunks, a pool
    assert list(scratch.iterdir()) == []
    assert pq.read_table(a / "s.parquet").equals(pq.read_table(b / "s.parquet"))
    assert (a / "m.csv").read_bytes() == (b / "m.csv").read_bytes()
    assert pq.read_table(a / "r.parquet").equals(pq.read_table(b / "r.parquet"))


def test_cli_and_missing_input(studies, tmp_path):
    out = tmp_path / "cli"
    args = [
        "--sections",
        str(out / "s.parquet"),
        "--mit-csv",
        str(out / "m.csv"),
        "--rejects",
        str(out / "r.parquet"),
    ]
    main(["--studies", str(studies), *args])
    assert pq.read_table(out / "s.parquet").num_rows == 6
    with pytest.raises(SystemExit):
        main(["--studies", str(tmp_path / "missing.parquet"), *args])


DEMO = REPO / "data" / "demo"


@pytest.mark.skipif(not (DEMO / "truth_studies.parquet").exists(), reason="demo corpus absent")
def test_demo_corpus_conclusion_source_matches_generator_truth():
    """The synthetic generator records which section MIT's rules take the conclusion from for every
    report it wrote (all §1.8 branches); our parser must agree on each readable report file."""
    checked = 0
    for truth in pq.read_table(DEMO / "truth_studies.parquet").to_pylist():
        subject = str(truth["subject_id"])
        path = DEMO / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{truth['study_id']}.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            continue
        assert conclusion_source(split_report(text)) == truth["conclusion_section"], path.name
        checked += 1
    assert checked >= 250


def test_empty_studies_table_gives_header_only_csv_and_empty_tables(tmp_path):
    path = tmp_path / "studies.parquet"
    pq.write_table(studies_table([]), path)
    out = tmp_path / "out"
    assert (
        run(path, out / "s.parquet", out / "m.csv", out / "r.parquet")
        == "sections: 0 studies in, 0 out, 0 rejected"
    )
    assert pq.read_table(out / "s.parquet").num_rows == 0
    assert (out / "m.csv").read_bytes() == b"study,impression,findings,last_paragraph,comparison\r\n"


IU = REPO.parent / "shared" / "data" / "iu_xray"


@pytest.mark.skipif(not (IU / "indiana_reports.csv").exists(), reason="IU X-Ray reports absent")
def test_iu_reports_laid_out_by_ingest_section_back_to_their_findings_and_impression():
    from workflow.ingest.iu import iu_report_text

    def one_line(value: str) -> str:
        return " ".join(value.split())

    checked = 0
    with open(IU / "indiana_reports.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            findings, impression = one_line(row["findings"]), one_line(row["impression"])
            if not (findings or impression):
                continue
            text = iu_report_text(
                one_line(row["image"]),
                one_line(row["indication"]),
                one_line(row["comparison"]),
                findings,
                impression,
            )
            parsed = split_report(text)
            assert (parsed["findings"] or "", parsed["impression"] or "") == (findings, impression), row[
                "uid"
            ]
            checked += 1
    assert checked > 3000
