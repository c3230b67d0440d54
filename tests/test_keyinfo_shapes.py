"""Sentence shapes of real reports that once turned a negated finding positive (issue 11), in our own words.

Each class is a mechanism (list structure, scope, hedges, change words, explanations), so every class is
tested with several variants, not the one sentence that exposed it.
"""

from __future__ import annotations

import pytest

from workflow.keyinfo.extract import Conventions, extract_sections, merge_presence, sections_for_reading


def read(text: str, conventions: Conventions | None = None) -> dict[str, str]:
    rows = extract_sections({"findings": text}, conventions)
    return merge_presence((r["name"], r["presence"]) for r in rows)


def case(text, **expected):
    return pytest.param(text, {k.replace("_", " "): v for k, v in expected.items()}, id=text[:60])


NEG, POS, UNC, ABSENT = "negative", "positive", "uncertain", None


# 1. A negated list stays negated to its coordinator, whatever size or quality words its items carry.
NEGATED_LISTS = [
    case("No focal consolidation, large pleural effusion, or pneumothorax.",
         consolidation=NEG, pleural_effusion=NEG, pneumothorax=NEG),
    case("No focal consolidation, large effusion or pneumothorax.",
         consolidation=NEG, pleural_effusion=NEG, pneumothorax=NEG),
    case("There is no pneumothorax, moderate or large pleural effusion, or focal airspace consolidation.",
         pneumothorax=NEG, pleural_effusion=NEG, consolidation=NEG),
    case("No acute osseous abnormality, definite focal consolidation, sizable effusion, nor pneumothorax.",
         consolidation=NEG, pleural_effusion=NEG, pneumothorax=NEG),
    case("Without new consolidation, significant effusion, and pneumothorax.",
         consolidation=NEG, pleural_effusion=NEG, pneumothorax=NEG),
    # no coordinator closes the list: a new noun phrase after the comma is positive (unchanged rule)
    case("No pneumothorax, small left effusion.", pneumothorax=NEG, pleural_effusion=POS),
    case("No pneumothorax, small left effusion and mild basilar atelectasis.",
         pneumothorax=NEG, pleural_effusion=POS, atelectasis=POS),
]  # fmt: skip

# 2. "clear of" / "free of" after an adverb, a conjunction or a participle.
CLEAR_OF = [
    case("The lungs are grossly clear of focal airspace disease, pneumothorax, or pleural effusion.",
         lung_opacity=NEG, pneumothorax=NEG, pleural_effusion=NEG),
    case("The lungs are otherwise clear of consolidation or effusion.",
         consolidation=NEG, pleural_effusion=NEG),
    case("Lungs are hypoinflated but clear of consolidation, effusion or pneumothorax.",
         consolidation=NEG, pleural_effusion=NEG, pneumothorax=NEG),
    case("The lungs are essentially free of consolidation and edema.", consolidation=NEG, edema=NEG),
    case("Lungs remain clear of focal opacity.", lung_opacity=NEG),
    case("The lungs are well expanded and clear of pneumothorax.", pneumothorax=NEG),
]  # fmt: skip

# 3. Negated predicates with a degree word between the negation and the predicate.
DEGREE = [
    case("The heart is not significantly enlarged.", cardiomegaly=NEG),
    case("The heart is not substantially enlarged.", cardiomegaly=NEG),
    case("Cardiac silhouette is not appreciably enlarged.", cardiomegaly=NEG),
    case("Heart size is not markedly enlarged compared to prior.", cardiomegaly=NEG),
    case("The mediastinum is not significantly widened.", enlarged_cardiomediastinum=NEG),
    case("The heart is mildly enlarged.", cardiomegaly=POS),
]  # fmt: skip

# 4. Hedges that follow or govern a finding; requests and limits are no finding at all.
HEDGES = [
    case("Findings may be secondary to pulmonary edema.", edema=UNC),
    case("Hazy bibasilar opacity, possibly due to edema.", lung_opacity=POS, edema=UNC),
    case("Interstitial prominence could be related to mild edema.", edema=UNC),
    case("Question small right effusion.", pleural_effusion=UNC),
    case("Questionable tiny left apical pneumothorax.", pneumothorax=UNC),
    case("Evaluation for pneumothorax is limited.", pneumothorax=ABSENT),
    case("Correlate clinically for pneumonia.", pneumonia=ABSENT),
    case("Clinical correlation for infection is recommended.", pneumonia=ABSENT),
    case("Assessment for small effusion is limited by positioning.", pleural_effusion=ABSENT),
    case("Left basilar opacity likely atelectasis.", lung_opacity=POS, atelectasis=UNC),
]  # fmt: skip

# 5. Change words that negate a whole preceding list, and "without ... change" that does not negate.
CHANGES = [
    case("Consolidation, atelectasis, and effusion at the left base have cleared.",
         consolidation=NEG, atelectasis=NEG, pleural_effusion=NEG),
    case("Previously seen right lower lobe consolidation and small right effusion have resolved.",
         consolidation=NEG, pleural_effusion=NEG),
    case("Without significant interval change of mild atelectasis.", atelectasis=POS),
    case("Mild bibasilar atelectasis without interval change.", atelectasis=POS),
    case("Without change in the small left pleural effusion.", pleural_effusion=POS),
]  # fmt: skip

# 6. Findings explained away by a mimic; a healed fracture is still a fracture.
EXPLAINED = [
    case("Nodular opacity projecting over the left lower lung is consistent with a nipple shadow.", nodule=ABSENT),
    case("Rounded density at the right base likely represents a nipple shadow.", nodule=ABSENT, lung_opacity=ABSENT),
    case("Linear opacity at the left apex is likely artifact.", lung_opacity=ABSENT),
    case("Apparent opacity in the right upper lobe is due to overlapping soft tissue.", lung_opacity=ABSENT),
    case("Old healed right rib fracture.", fracture=POS),
    case("Healed fractures of the left posterior ribs.", fracture=POS),
]  # fmt: skip

# 7. Vocabulary.
VOCABULARY = [
    case("Small left apical pleural air collection.", pneumothorax=POS),
    case("Left apical capping.", pleural_thickening=POS),
    case("Minor fissural thickening.", pleural_thickening=POS),
    case("Thickening of the minor fissure.", pleural_thickening=POS),
    case("6 mm nodular density in the right upper lobe.", nodule=POS),
    case("Calcified nodule in the right upper lobe.", nodule=POS, granuloma=POS),
    case("Hyperinflated lungs consistent with COPD.", hyperinflation=POS, emphysema=ABSENT),
    case("Bilateral interstitial infiltrates.", infiltrate=POS),
    case("No focal infiltrate.", infiltrate=NEG),
]  # fmt: skip


@pytest.mark.parametrize(
    "text,expected", NEGATED_LISTS + CLEAR_OF + DEGREE + HEDGES + CHANGES + EXPLAINED + VOCABULARY
)
def test_real_report_sentence_shapes(text, expected):
    got = read(text)
    assert {name: got.get(name) for name in expected} == expected, got


def test_a_comma_list_keeps_its_items_negative_in_a_long_run_on_clause():
    items = ["focal consolidation", "large pleural effusion", "pneumothorax", "pulmonary edema"] * 50
    got = read("No " + ", ".join(items[:-1]) + ", or " + items[-1] + ".")
    assert set(got.values()) == {NEG}, got


def test_alternatives_convention_is_configurable():
    text = "Left basilar opacity may represent atelectasis or pneumonia."
    assert read(text)["atelectasis"] == UNC
    # "X or Y" in a plain statement: CheXpert reads both as uncertain, NegBio as positive
    plain = "Atelectasis or pneumonia in the left lower lobe."
    assert read(plain)["pneumonia"] == UNC
    assert read(plain, Conventions(alternatives="positive"))["pneumonia"] == POS
    # a hedge stays a hedge whatever the alternatives convention says
    assert read(text, Conventions(alternatives="positive"))["atelectasis"] == UNC


def test_hedges_convention_is_configurable():
    text = "Possible small right pleural effusion."
    assert read(text)["pleural effusion"] == UNC
    assert read(text, Conventions(hedges="positive"))["pleural effusion"] == POS
    assert read("No definite effusion.", Conventions(hedges="positive"))["pleural effusion"] == NEG


@pytest.mark.parametrize(
    "report",
    [
        "Findings: The lungs are clear. No pleural effusion.\n\nImpression: No acute cardiopulmonary process.",
        "FINDINGS: The lungs are clear. No pleural effusion.\n\nImpression: No acute cardiopulmonary process.",
        "Findings:\nThe lungs are clear. No pleural effusion.\nImpression:\nNo acute cardiopulmonary process.",
    ],
)
def test_mixed_case_headers_are_read_leniently(report):
    strict = {"findings": None, "impression": None, "last_paragraph": report.split("\n")[-1]}
    sections = sections_for_reading(strict, report)
    assert "lungs are clear" in (sections["findings"] or "").lower()
    assert "acute cardiopulmonary" in (sections["impression"] or "").lower()


def test_strict_sections_are_kept_when_the_parser_found_them():
    strict = {"findings": "No effusion.", "impression": "Normal.", "last_paragraph": "Normal."}
    assert sections_for_reading(strict, "whatever") == strict


# ---- the study-level normal signal ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "impression,expected",
    [
        ("No acute cardiopulmonary process.", "No acute cardiopulmonary process"),
        ("Normal chest x-XXXX.", "Normal chest"),
        ("1. No acute cardiopulmonary abnormality identified.", "No acute cardiopulmonary abnormality"),
        (
            "Hypoinflation with no visible active cardiopulmonary disease.",
            "no visible active cardiopulmonary disease",
        ),
        ("Small left effusion.", None),
    ],
)
def test_normal_statements_are_found_as_written(impression, expected):
    from workflow.keyinfo.extract import study_rows

    assert study_rows({"findings": None, "impression": impression})[1] == expected


def test_study_status_tells_normal_from_silent_and_abnormal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflow.contract import SECTIONS, STUDIES
    from workflow.keyinfo.run_rules import run as run_rules
    from workflow.keyinfo.studies import run as run_studies

    reports = {
        1: ("FINDINGS: Lungs are clear.\n\nIMPRESSION: No acute cardiopulmonary process.", None, None),
        2: (None, "No acute cardiopulmonary process. Pacemaker in place.", None),
        3: (None, "Small right pleural effusion.", None),
        4: (None, None, "Comparison is made to the prior study."),  # read, says nothing
        5: (None, None, None),  # nothing to read: rejected upstream, no status
        # MIT-LCP's parser knows capitals only: the lenient reading finds these sections
        6: (None, None, "Impression: No pneumothorax."),
    }
    full = {6: "Findings:\nHeart size is normal.\n\nImpression: No pneumothorax."}
    ids = sorted(reports)
    cols = {"subject_id": [10 + i for i in ids], "study_id": ids}
    for name in SECTIONS.names[2:]:
        cols[name] = [None] * len(ids)
    for k, i in enumerate(ids):
        cols["findings"][k], cols["impression"][k], cols["last_paragraph"][k] = reports[i]
    pq.write_table(pa.Table.from_pydict(cols, schema=SECTIONS), tmp_path / "sections.parquet")
    studies = {"subject_id": [16], "study_id": [6], "split": ["train"], "study_datetime": [None],
               "report": [full[6]], "source_path": ["x"]}  # fmt: skip
    pq.write_table(pa.Table.from_pydict(studies, schema=STUDIES), tmp_path / "studies.parquet")
    run_rules(tmp_path / "sections.parquet", tmp_path / "f.parquet", tmp_path / "s.parquet", tmp_path / "r.parquet",
              reports=tmp_path / "studies.parquet", normal_statements=tmp_path / "n.parquet")  # fmt: skip
    run_studies(
        tmp_path / "sections.parquet", tmp_path / "n.parquet", tmp_path / "f.parquet", tmp_path / "k.parquet"
    )
    got = {r["study_id"]: r["status"] for r in pq.read_table(tmp_path / "k.parquet").to_pylist()}
    assert got == {1: "normal", 2: "normal", 3: "abnormal", 4: "unknown", 6: "normal"}
    findings = pq.read_table(tmp_path / "f.parquet").to_pylist()
    assert {(r["study_id"], r["name"], r["presence"]) for r in findings if r["study_id"] == 6} == {
        (6, "cardiomegaly", "negative"), (6, "pneumothorax", "negative")}  # fmt: skip


def test_a_report_without_any_header_keeps_its_strict_sections():
    strict = {"findings": None, "impression": None, "last_paragraph": "No effusion."}
    assert sections_for_reading(strict, "No effusion.") == strict


@pytest.mark.parametrize(
    "text,evidence",
    [
        ("Small left pleural effusion.", "Small left pleural effusion"),
        ("There is a large right pneumothorax.", "large right pneumothorax"),
        ("Opacity in the right lower lobe.", "Opacity in the right lower lobe"),
        ("Heart is mildly enlarged.", "Heart is mildly enlarged"),
    ],
)
def test_evidence_is_the_noun_phrase_with_its_attribute_words(text, evidence):
    # downstream (Medical-CXR-VQA's level answers, the review page) reads the report's own words here
    (row,) = extract_sections({"findings": text})
    assert row["evidence"] == evidence
    assert text[row["start"] : row["end"]] == row["evidence"]  # the span indexes the section text


def test_study_status_row_groups_are_those_of_each_group_alone(tmp_path):
    """The counts are looked up for all row groups at once; each written row group is what its group of
    normal statements alone gives, with the statuses of every kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflow.contract import FINDINGS, SECTIONS
    from workflow.keyinfo.studies import NORMAL_STATEMENTS, presence_counts, studies_table
    from workflow.keyinfo.studies import run as run_studies

    ids = list(range(1, 31))
    statements = pa.table(
        {"subject_id": [100 + i for i in ids], "study_id": ids,
         "normal_evidence": ["No acute process" if i % 5 == 0 else None for i in ids]},
        schema=NORMAL_STATEMENTS,
    )  # fmt: skip
    pq.write_table(statements, tmp_path / "n.parquet", row_group_size=8)  # 4 row groups
    rows = [(i, "pleural effusion", ("positive", "uncertain", "negative")[i % 3]) for i in ids if i % 4]
    findings = {name: [None] * len(rows) for name in FINDINGS.names}
    findings.update(study_id=[r[0] for r in rows], subject_id=[100 + r[0] for r in rows],
                    name=[r[1] for r in rows], presence=[r[2] for r in rows], source=["rules"] * len(rows))  # fmt: skip
    pq.write_table(pa.Table.from_pydict(findings, schema=FINDINGS), tmp_path / "f.parquet")
    sections = {name: [None] * len(ids) for name in SECTIONS.names}
    sections.update(subject_id=[100 + i for i in ids], study_id=ids)
    pq.write_table(pa.Table.from_pydict(sections, schema=SECTIONS), tmp_path / "sections.parquet")

    run_studies(
        tmp_path / "sections.parquet", tmp_path / "n.parquet", tmp_path / "f.parquet", tmp_path / "k.parquet"
    )
    written = pq.ParquetFile(tmp_path / "k.parquet")
    source = pq.ParquetFile(tmp_path / "n.parquet")
    counts = presence_counts(tmp_path / "f.parquet")
    assert written.num_row_groups == source.num_row_groups == 4
    for group in range(4):
        assert written.read_row_group(group).equals(studies_table(source.read_row_group(group), counts))
    assert set(pq.read_table(tmp_path / "k.parquet")["status"].to_pylist()) == {
        "normal",
        "abnormal",
        "unknown",
    }
