"""The one finding record (contract.finding_row): what the LLM layer and the rules extractor emit."""

from __future__ import annotations

import pytest

from workflow.contract import FINDING_FIELDS, FINDINGS, finding_row, findings_table
from workflow.keyinfo.extract import extract_sections
from workflow.llm.findings import standardise_answer

SECTIONS = {
    "subject_id": 10000032,
    "study_id": 50414267,
    "findings": "Small left pleural effusion. No pneumothorax.",
    "impression": "Mild cardiomegaly.",
}


def test_llm_rows_are_finding_records_with_the_evidence_located():
    items = [
        {"name": "pleural effusion", "presence": "positive", "location": "left", "level": "small",
         "evidence": "small left pleural effusion"},
        {"name": "pneumothorax", "presence": "negative", "evidence": "No pneumothorax"},
    ]  # fmt: skip
    rows = standardise_answer(items, SECTIONS, source="llm", round_=0, request_key="abc", fuzzy_cutoff=90)
    assert [tuple(r) for r in rows] == [FINDING_FIELDS, FINDING_FIELDS]
    effusion = rows[0]
    assert (effusion["name"], effusion["presence"], effusion["location"]) == (
        "pleural effusion",
        "positive",
        "left",
    )
    assert SECTIONS["findings"][effusion["start"] : effusion["end"]].lower() == "small left pleural effusion"
    assert findings_table(rows).schema.equals(FINDINGS)


def test_rules_rows_fill_the_same_record():
    rows = extract_sections({"findings": SECTIONS["findings"], "impression": SECTIONS["impression"]})
    ids = {"subject_id": SECTIONS["subject_id"], "study_id": SECTIONS["study_id"]}
    table = findings_table([finding_row(**r, **ids, source="rules") for r in rows])
    assert set(table.column("name").to_pylist()) == {"pleural effusion", "pneumothorax", "cardiomegaly"}


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"name": "edema", "presence": "positive", "source": "llm", "severity": "mild"},
            "not FINDINGS fields",
        ),
        ({"name": "edema", "presence": "present", "source": "llm"}, "presence 'present'"),
        ({"name": "edema", "presence": "positive"}, "needs ['source']"),
    ],
)
def test_a_record_the_contract_does_not_have_fails_loudly(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        finding_row(subject_id=1, study_id=2, **fields)
