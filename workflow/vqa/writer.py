"""Writing the questions: one shard's (QUESTIONS, rejects), and the merged stage outputs: Parquet
(QUESTIONS), the original's CSV, the statistics, the leak probe and the rejects."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from workflow.contract import QUESTIONS, REJECTS, VQA_LEAK, VQA_STATS
from workflow.tables import TableWriter, atomic_output, atomic_path, read_table, summary, write_table
from workflow.vqa.config import STAGE
from workflow.vqa.leak import leak_report
from workflow.vqa.stats import add_counts, question_counts, question_stats

log = logging.getLogger(__name__)

# The original's CSV, for drop-in use with code that reads the released medical_cxr_vqa_questions.csv.
CSV_COLUMNS = ["study_id", "subject_id", "question_type", "question", "answer"]
# the yes/no types the text-only leak probe tries to answer from the question alone
LEAK_TYPES = ["presence", "abnormality", "view"]


# what the statistics read of the questions (vqa.stats.question_counts), and the leak probe
STATS_COLUMNS = ["question_type", "split", "answer", "study_id"]
LEAK_COLUMNS = ["question_type", "question", "answer"]


def merge_questions(
    shard_questions: list, questions_path, csv_path, yes_no: bool = False
) -> tuple[list, int, pa.Table | None]:
    """Concatenate the shards' questions (Parquet and CSV) one row group at a time; ``qa_id`` becomes
    the row number of the merged table. Returns each shard's :func:`question_counts`, the number of
    studies asked and, with ``yes_no``, the questions of the ``LEAK_TYPES`` (``LEAK_COLUMNS``, in shard
    and row order) for the leak probe: both from the row groups as they pass (no second read)."""
    counts = []
    n_studies = 0
    offset = 0
    leak_types = pa.array(LEAK_TYPES, pa.string())
    probed = []
    csv_schema = pa.schema([QUESTIONS.field(c) for c in CSV_COLUMNS])
    with (
        TableWriter(questions_path, QUESTIONS) as out,
        atomic_output(csv_path) as fh,
        pacsv.CSVWriter(fh, csv_schema) as csv,
    ):
        for path in shard_questions:
            shard = pq.ParquetFile(path)
            asked = []
            for i in range(shard.num_row_groups):
                part = shard.read_row_group(i)
                asked.append(part.select(STATS_COLUMNS))
                if yes_no:
                    probed.append(
                        part.select(LEAK_COLUMNS).filter(pc.is_in(part["question_type"], leak_types))
                    )
                qa_id = pa.array(np.arange(offset, offset + part.num_rows, dtype=np.int64))
                part = part.set_column(part.schema.get_field_index("qa_id"), "qa_id", qa_id)
                out.write(part)
                csv.write_table(part.select(CSV_COLUMNS))
                offset += part.num_rows
            # a study's questions may span row groups: count studies over the whole shard
            asked = pa.concat_tables(asked) if asked else shard.read(columns=STATS_COLUMNS)
            counts.append(question_counts(asked))
            n_studies += pc.count_distinct(asked["study_id"]).as_py()
    if not yes_no:
        return counts, n_studies, None
    return (
        counts,
        n_studies,
        pa.concat_tables(probed) if probed else QUESTIONS.empty_table().select(LEAK_COLUMNS),
    )


def write_stats(counts, stats_path, stats_csv_path) -> pd.DataFrame:
    stats = question_stats(*add_counts(counts))
    write_table(pa.Table.from_pandas(stats, preserve_index=False), stats_path, VQA_STATS)
    with atomic_path(stats_csv_path) as tmp:
        stats.to_csv(tmp, index=False)
    return stats


def write_leak(yes_no: pa.Table, leak_path, seed: int, max_rows: int) -> pd.DataFrame:
    """The text-only leak probe over the yes/no questions of all shards (:func:`merge_questions`)."""
    leak = leak_report(yes_no, seed, max_rows) if max_rows else pd.DataFrame(columns=VQA_LEAK.names)
    with atomic_path(leak_path) as tmp:
        leak.to_csv(tmp, index=False)
    for r in leak.itertuples():
        log.info(
            "text-only probe %s: majority %.3f, best text-only %.3f (gain %+.3f)",
            r.question_type,
            r.majority_accuracy,
            max(r.naive_bayes_accuracy, r.logreg_accuracy, r.lookup_accuracy),
            r.gain,
        )
    return leak


def merge_outputs(
    shard_questions: list, shard_rejects: list, out: dict, seed: int, leak_probe_max: int
) -> None:
    """The stage's outputs from its shards: ``out`` maps questions, csv, stats, stats_csv, leak and
    rejects to paths (leak optional)."""
    probe = bool(out.get("leak") and leak_probe_max)
    counts, n_out, yes_no = merge_questions(shard_questions, out["questions"], out["csv"], yes_no=probe)
    stats = write_stats(counts, out["stats"], out["stats_csv"])
    if out.get("leak"):
        write_leak(yes_no, out["leak"], seed, leak_probe_max)
    rejects = pa.concat_tables(read_table(path) for path in shard_rejects)
    write_table(rejects, out["rejects"], REJECTS)
    n_questions = int(stats.loc[stats["split"] == "all", "n_questions"].sum())
    # every study of the corpus is asked or rejected (once) in exactly one shard
    summary(STAGE, n_out + rejects.num_rows, n_out, rejects.num_rows)
    log.info("vqa: %d questions", n_questions)
