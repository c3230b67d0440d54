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
        pa.field("evidence", pa.string()),  # the supporting text (rules: the matched words; llm: its quote)
        pa.field(
            "flags", pa.string()
        ),  # ';'-joined: unknown_name, unsupported, presence_disagrees, missed_by_llm
    ]
)

FINDING_FIELDS = tuple(FINDINGS.names)
_FINDING_REQUIRED = tuple(f.name for f in FINDINGS if not f.nullable)


def finding_row(**fields) -> dict:
    """One finding record, the row of ``FINDINGS``: what both extractors (rules and LLM) emit and every
    consumer reads, by these field names. Optional fields left out are null; a field the contract does not
    have, a missing required one or a presence outside ``PRESENCE`` is an error, not a silent column."""
    extra = fields.keys() - FINDINGS.names
    if extra:
        raise ValueError(f"not FINDINGS fields: {sorted(extra)}")
    missing = [name for name in _FINDING_REQUIRED if fields.get(name) is None]
    if missing:
        raise ValueError(f"a finding needs {missing}")
    if fields["presence"] not in PRESENCE:
        raise ValueError(f"presence {fields['presence']!r} is not one of {PRESENCE}")
    return {name: fields.get(name) for name in FINDING_FIELDS}


def findings_table(rows: list[dict]) -> pa.Table:
    """The ``FINDINGS`` table of finding records (dicts keyed by ``FINDING_FIELDS``)."""
    return pa.Table.from_pylist(rows, schema=FINDINGS)


# Standardisation audit (keyinfo stage): every change made to an LLM/KeyInfo value, one row per change.
AUDIT = pa.schema(
    [
        pa.field("subject_id", pa.int64()),
        pa.field("study_id", pa.int64()),
        pa.field(
            "field", pa.string(), nullable=False
        ),  # name / presence / location / level / type / change / shape
        pa.field("before", pa.string()),
        pa.field("after", pa.string()),
        pa.field(
            "rule", pa.string(), nullable=False
        ),  # exact / synonym / contained / fuzzy:<score> / moved / ...
    ]
)

# Terms standardisation could not map onto libs/, most frequent first: what to add to libs/.
UNKNOWN_TERMS = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # name / location / level / type / change
        pa.field("term", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("n_studies", pa.int64(), nullable=False),
        pa.field("closest", pa.string()),  # nearest library value (rapidfuzz) and its score, a hint only
        pa.field("closest_score", pa.float64()),
    ]
)

# Per finding counts of a keyinfo run (keyinfo/<backend>/stats.parquet).
KEYINFO_STATS = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("n_positive", pa.int64(), nullable=False),
        pa.field("n_uncertain", pa.int64(), nullable=False),
        pa.field("n_negative", pa.int64(), nullable=False),
        pa.field("n_studies", pa.int64(), nullable=False),
    ]
)

# One row per study the key-information stage read (keyinfo/studies.parquet): whether the study is normal.
# `status`: `abnormal` (a positive or uncertain finding, devices aside), `normal` (none, and the report
# says so: a normal statement such as "No acute cardiopulmonary process" or at least one negative finding),
# `unknown` (the report names no finding and makes no normal statement: read, but silent). Downstream
# stages tell "read and normal" from "not read" with it (a study without a row was not read).
STUDY_STATUS = ("normal", "abnormal", "unknown")
KEYINFO_STUDIES = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # STUDY_STATUS
        pa.field("normal_evidence", pa.string()),  # the normal statement as written, if any
        pa.field("n_positive", pa.int32(), nullable=False),  # finding rows by presence (devices aside)
        pa.field("n_uncertain", pa.int32(), nullable=False),
        pa.field("n_negative", pa.int32(), nullable=False),
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

# Statistics of the questions per question type and split ('all' = every split together).
VQA_STATS = pa.schema(
    [
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n_questions", pa.int64(), nullable=False),
        pa.field("n_studies", pa.int64(), nullable=False),
        pa.field("n_distinct_answers", pa.int64(), nullable=False),
        pa.field("n_yes", pa.int64(), nullable=False),
        pa.field("n_no", pa.int64(), nullable=False),
        pa.field("yes_ratio", pa.float64()),  # yes / (yes + no); null when the type has no yes/no answers
        pa.field("top_answer", pa.string()),
        pa.field("top_answer_share", pa.float64()),
        pa.field("top_answers", pa.string()),  # the five most frequent answers: "answer (count); ..."
        pa.field("share", pa.float64()),  # this type's share of the split's questions
        # the released Medical-CXR-VQA 1.0.0 (780,014 pairs): count and share of the type (split 'all' only)
        pa.field("released_n", pa.int64()),
        pa.field("released_share", pa.float64()),
    ]
)

# Text-only leak probe of the yes/no questions (results/vqa/leak.csv): accuracy of classifiers that see
# only the question text, against always answering the majority answer.
VQA_LEAK = pa.schema(
    [
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("n", pa.int64()),
        pa.field("n_distinct_questions", pa.int64()),
        pa.field("yes_ratio", pa.float64()),
        pa.field("majority_accuracy", pa.float64()),
        pa.field("naive_bayes_accuracy", pa.float64()),
        pa.field("logreg_accuracy", pa.float64()),
        pa.field("lookup_accuracy", pa.float64()),
        pa.field("gain", pa.float64()),  # best text-only accuracy - majority accuracy
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

# --- MIMIC-RG4 (rg4 stage) -------------------------------------------------------------------------------
RG4_SCENARIOS = ("sn", "sw", "mn", "mw")
RG4_SPLITS = ("train", "val", "test")  # the LLM-RG4 loader's keys (official `validate` -> `val`)

# One table per scenario (rg4_sn ... rg4_mw): the LLM-RG4 record fields, nulls where the JSON writes its
# sentinels ("s" for finding/impression/last_*, integer 0 for indication/history). lateral_imagepath is
# null outside mn/mw, the last_* fields are null outside sw/mw. Image paths are relative to `files/`.
RG4_RECORDS = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),  # train / val / test
        pa.field("id", pa.string(), nullable=False),  # dicom_id of the frontal image
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("finding", pa.string()),  # rewritten for the scenario
        pa.field("impression", pa.string()),
        pa.field("APPA_flag", pa.string(), nullable=False),  # PA / AP
        pa.field("APPA_imagepath", pa.string(), nullable=False),
        pa.field("lateral_imagepath", pa.string()),
        pa.field("last_study_id", pa.int64()),
        pa.field("last_finding", pa.string()),
        pa.field("last_impression", pa.string()),
        pa.field("last_APPA_imagepath", pa.string()),
        pa.field("indication", pa.string()),
        pa.field("history", pa.string()),
        pa.field("original_finding", pa.string()),  # the report's text before rewriting (audit)
        pa.field("original_impression", pa.string()),
        pa.field("rewriter", pa.string(), nullable=False),  # rules / llm
        pa.field("request_hash", pa.string()),  # sha256 of the accepted LLM request; null for rules
    ]
)

RG4_COUNTS = pa.schema(
    [
        pa.field("scenario", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("records", pa.int64(), nullable=False),
        pa.field("rejected", pa.int64(), nullable=False),  # eligible for the scenario, dropped by the check
    ]
)

# Share of target sentences touched by the rewriter, per scenario x input-agnostic category
# (pc prior comparison, pp prior procedure, comm communication, view views not provided).
RG4_REWRITE_STATS = pa.schema(
    [
        pa.field("scenario", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("sentences", pa.int64(), nullable=False),  # all target sentences of the scenario
        pa.field("flagged", pa.int64(), nullable=False),
        pa.field("removed", pa.int64(), nullable=False),
        pa.field("rephrased", pa.int64(), nullable=False),
        pa.field("share_removed", pa.float64(), nullable=False),
        pa.field("share_rephrased", pa.float64(), nullable=False),
    ]
)

# --- fine-tuning the student (finetune stage) -------------------------------------------------------------
# Which gold studies trained the student and which were held out for its evaluation (patient-disjoint).
FINETUNE_SPLIT = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("part", pa.string(), nullable=False),  # train / heldout
    ]
)

# Student (and any other model) vs the teacher's gold on the held-out studies: one row per model.
FINETUNE_EVAL = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),  # e.g. student, rules
        pa.field("studies", pa.int64(), nullable=False),  # held-out studies evaluated
        pa.field("answered", pa.int64(), nullable=False),  # studies with an answer (LLM call completed)
        pa.field("json_valid", pa.int64(), nullable=False),  # answers that parsed into findings
        pa.field("json_valid_rate", pa.float64(), nullable=False),  # json_valid / studies
        pa.field("precision", pa.float64(), nullable=False),  # on (study, name, presence) triples
        pa.field("recall", pa.float64(), nullable=False),
        pa.field("f1", pa.float64(), nullable=False),
        pa.field("positive_f1", pa.float64(), nullable=False),  # (study, name) of positive findings only
        pa.field("name_f1", pa.float64(), nullable=False),  # (study, name), presence ignored
    ]
)

# --- LLM layer (workflow/llm) -------------------------------------------------------------------------
# One row per LLM request of a stage: accounting and provenance. Every LLM-derived findings row links
# here through its request_hash (= request_key).
LLM_REQUESTS = pa.schema(
    [
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # gold / keyinfo / followup / rg4
        pa.field("round", pa.int16()),
        pa.field("finding", pa.string()),  # the finding a follow-up asked about
        pa.field("request_key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # completed / refused / failed / not_sent
        pa.field("model", pa.string()),
        pa.field("adapter", pa.string()),
        pa.field("executor", pa.string()),
        pa.field("template", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("error", pa.string()),  # why it failed (never report text)
        pa.field("parse_error", pa.string()),  # why a completed answer could not be used
        pa.field("n_findings", pa.int32()),
    ]
)

# Per follow-up round: what was asked and how much changed (convergence).
LLM_FOLLOWUP_STATS = pa.schema(
    [
        pa.field("round", pa.int16(), nullable=False),
        pa.field("studies", pa.int64(), nullable=False),
        pa.field("missed", pa.int64(), nullable=False),  # rules findings the LLM did not mention
        pa.field("disagreements", pa.int64(), nullable=False),  # same finding, different presence
        pa.field("asked", pa.int64(), nullable=False),  # follow-up requests this round (new targets)
        pa.field("answered", pa.int64(), nullable=False),
        pa.field("changed", pa.int64(), nullable=False),  # targets whose rows changed after merging
        pa.field("findings", pa.int64(), nullable=False),  # rows after merging
        pa.field("converged", pa.bool_(), nullable=False),  # nothing new to ask: a fixpoint
    ]
)

# The gold sample sent to the teacher (seeded, stratified by split x rules-finding count).
LLM_GOLD_SAMPLE = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("stratum", pa.string(), nullable=False),
    ]
)

# --- Clinicians' review (workflow/review) -------------------------------------------------------------------
REVIEW_VERDICTS = ("correct", "wrong", "unsure")
REVIEW_KINDS = ("finding", "question", "rg4")
# verdicts.csv, as the review page exports it (one row per judged item) and the scorer reads it. The
# item's own labels travel with the verdict, so the file is scored without the tables it came from.
REVIEW_VERDICT_COLUMNS = (
    "item_id",  # f:<study>:<name>:<section>:<start> | q:<qa_id> | rg4:<study>:<scenarios>
    "kind",  # finding / question / rg4
    "study_id",
    "verdict",  # correct / wrong / unsure
    "comment",
    "reviewer",  # initials
    "build",  # content hash of the page the verdict was given on
    "corpus",
    "finding",  # finding items: canonical name
    "presence",  # finding items
    "question_type",  # question items
    "rg4_category",  # rg4 items: ';'-joined pc / pp / comm / view; none (target unchanged); other
    "scenarios",  # rg4 items: '+'-joined scenarios sharing the rewrite
)

# The sampled studies of a review page (review/sample.csv): what to exclude from the next round.
REVIEW_SAMPLE = pa.schema(
    [
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field(
            "strata", pa.string(), nullable=False
        ),  # ';'-joined presence:<p> / question:<type> / rg4:<s>
        pa.field("items", pa.int64(), nullable=False),
    ]
)

# review/precision.csv: precision of the items (consensus over reviewers) per group, 95 % Wilson interval.
REVIEW_PRECISION = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # finding / question / rg4
        pa.field(
            "group", pa.string(), nullable=False
        ),  # all / finding / presence / question_type / rg4_category
        pa.field("value", pa.string(), nullable=False),  # the group's value (all: 'all')
        pa.field("items", pa.int64(), nullable=False),  # distinct items judged
        pa.field("correct", pa.int64(), nullable=False),
        pa.field("wrong", pa.int64(), nullable=False),
        pa.field("unsure", pa.int64(), nullable=False),  # unsure, or reviewers split evenly: not counted
        pa.field("precision", pa.float64()),  # correct / (correct + wrong); null when both are 0
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
    ]
)

# review/agreement.csv: Cohen's kappa per pair of reviewers over the items both judged.
REVIEW_AGREEMENT = pa.schema(
    [
        pa.field("reviewer_a", pa.string(), nullable=False),
        pa.field("reviewer_b", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # finding / question / rg4 / all
        pa.field("items", pa.int64(), nullable=False),
        pa.field("observed_agreement", pa.float64()),
        pa.field("kappa", pa.float64()),  # null when chance agreement is 1 (both always said the same)
    ]
)

# --- Synthetic corpus truth (tools.synth) ---------------------------------------------------------------
# One row per finding mention a careful reader extracts from the findings / impression / last_paragraph
# section (MIT parser semantics, LAST section of that name) of a synthetic report; canonical values only.
SYNTH_TRUTH = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("section", pa.string(), nullable=False),  # findings / impression / last_paragraph
        pa.field("name", pa.string(), nullable=False),
        pa.field("presence", pa.string(), nullable=False),  # positive / negative / uncertain
        pa.field("location", pa.string()),
        pa.field("level", pa.string()),
        pa.field("type", pa.string()),
        pa.field("change", pa.string()),
        pa.field("raw_name", pa.string()),  # device kind for support devices, else null
        pa.field("sentence", pa.string(), nullable=False),  # the sentence as written (before wrapping)
    ]
)

# One row per synthetic study: report type (A-G), parser branches exercised, deliberate bad inputs.
SYNTH_STUDIES = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("report_type", pa.string(), nullable=False),
        pa.field("features", pa.list_(pa.string())),  # structural features (wet_read, swallow, ...)
        pa.field("headers", pa.list_(pa.string())),  # raw headers the MIT regex matches in the report
        pa.field("conclusion_section", pa.string()),  # impression / findings / last_paragraph / comparison
        pa.field("bad", pa.string()),  # empty_report / no_report / no_metadata; null for good studies
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("study_date", pa.string()),  # StudyDate as in the metadata (YYYYMMDD)
    ]
)
