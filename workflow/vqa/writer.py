"""Writing the questions: Parquet (QUESTIONS), the original's CSV, and the statistics."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from workflow.contract import QUESTIONS, VQA_STATS
from workflow.tables import atomic_path, write_table
from workflow.vqa.stats import question_stats

# The original's CSV, for drop-in use with code that reads the released medical_cxr_vqa_questions.csv.
CSV_COLUMNS = ["study_id", "subject_id", "question_type", "question", "answer"]


def write_outputs(table: pa.Table, questions_path, csv_path, stats_path, stats_csv_path) -> pd.DataFrame:
    write_table(table, questions_path, QUESTIONS)
    with atomic_path(csv_path) as tmp:
        pacsv.write_csv(table.select(CSV_COLUMNS), tmp)
    stats = question_stats(table.select(["question_type", "split", "answer", "study_id"]).to_pandas())
    write_table(pa.Table.from_pandas(stats, preserve_index=False), stats_path, VQA_STATS)
    with atomic_path(stats_csv_path) as tmp:
        stats.to_csv(tmp, index=False)
    return stats
