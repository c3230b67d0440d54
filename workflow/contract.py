"""The data contract: every table the workflow writes, declared once as a pyarrow schema.

Ids are MIMIC's everywhere: ``subject_id`` and ``study_id`` are int64, ``dicom_id`` is a string.
IU X-Ray maps its ``uid`` to ``study_id`` (and to ``subject_id``: IU has one study per patient).
Stages import the schema they write from here; nobody re-declares a column elsewhere.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "validate", "test")
PRESENCE = ("positive", "negative", "uncertain")

STUDIES = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("split", pa.string()),  # train / validate / test (official, patient-disjoint)
        pa.field("study_datetime", pa.timestamp("ms")),  # StudyDate + StudyTime; null when unknown (IU)
        pa.field("report", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),  # files/pXX/pSUBJECT/sSTUDY.txt or csv row
    ]
)

IMAGES = pa.schema(
    [
        pa.field("dicom_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("view_position", pa.string()),  # PA, AP, LATERAL, LL, ... ('' when blank)
        pa.field("view_code_meaning", pa.string()),  # postero-anterior, antero-posterior, lateral, ...
        pa.field("image_path", pa.string(), nullable=False),  # relative to the image root: files/pXX/...
    ]
)

SECTION_NAMES = (
    "indication",
    "history",
    "comparison",
    "technique",
    "findings",
    "impression",
    "last_paragraph",
)

SECTIONS = pa.schema(
    [pa.field("subject_id", pa.int64(), nullable=False), pa.field("study_id", pa.int64(), nullable=False)]
    + [pa.field(name, pa.string()) for name in SECTION_NAMES]
)

# One row per (study, finding instance): the KeyInfo in long form.
FINDINGS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),  # canonical name from libs/, or 'unknown'
        pa.field("raw_name", pa.string()),  # surface form as found / as the LLM wrote it
        pa.field("presence", pa.string(), nullable=False),  # positive / negative / uncertain
        pa.field("location", pa.string()),
        pa.field("level", pa.string()),
        pa.field("type", pa.string()),
        pa.field("change", pa.string()),
        pa.field("section", pa.string()),  # which section the evidence is in (findings / impression)
        pa.field("start", pa.int32()),  # evidence span in that section's text
        pa.field("end", pa.int32()),
        pa.field("source", pa.string(), nullable=False),  # rules / llm / followup
        pa.field("round", pa.int16()),
        pa.field("request_hash", pa.string()),  # sha256 of the LLM request; null for rules
    ]
)

QUESTIONS = pa.schema(
    [
        pa.field("qa_id", pa.int64(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("dicom_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("template_id", pa.string(), nullable=False),
    ]
)

# Every input study ends in an output table or here, never nowhere.
REJECTS = pa.schema(
    [
        pa.field("study_id", pa.int64()),  # null when the id itself could not be read
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # short machine-readable code
        pa.field("detail", pa.string()),  # path, member name, message (never report text)
    ]
)
