"""The report's tables: the fast counts are the counts of their definitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from workflow import report


def _findings(n: int = 20_000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    presence = np.array(["positive", "uncertain", "negative", "not stated"])  # the last counts for nothing
    return pa.table(
        {
            "study_id": pa.array(rng.integers(50_000_000, 50_003_000, n), pa.int64()),
            "name": pa.array(rng.choice([f"finding {k}" for k in range(30)], n)),
            "presence": pa.array(rng.choice(presence, n, p=[0.3, 0.1, 0.55, 0.05])),
        }
    )


def _merged_by_group_by(f: pa.Table) -> pd.DataFrame:
    """The definition: per (study, name) the best-ranked mention, then studies per (name, rank)."""
    rank = pc.index_in(f["presence"], value_set=pa.array(list(report.PRESENCE_COLOURS)))
    merged = (
        pa.table({"study_id": f["study_id"], "name": f["name"], "rank": rank})
        .group_by(["study_id", "name"])
        .aggregate([("rank", "min")])
        .group_by(["name", "rank_min"])
        .aggregate([("study_id", "count")])
        .to_pandas()
    )
    merged = merged[merged["rank_min"].notna() & (merged["study_id_count"] > 0)]
    return (
        merged[["name", "rank_min", "study_id_count"]]
        .sort_values(["name", "rank_min"])
        .reset_index(drop=True)
    )


def test_merged_presence_counts_are_the_group_by_of_their_definition():
    f = _findings()
    got = (
        report.merged_presence_counts(f).to_pandas().sort_values(["name", "rank_min"]).reset_index(drop=True)
    )
    want = _merged_by_group_by(f)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert report.merged_presence_counts(f).schema.field("rank_min").type == pa.int32()


def test_label_prevalence_counts_each_study_once_at_its_best_presence(tmp_path):
    f = pa.table(
        {
            "study_id": pa.array([1, 1, 1, 2, 2, 3, 3], pa.int64()),
            "name": ["effusion", "effusion", "edema", "effusion", "edema", "edema", "edema"],
            "presence": [
                "negative",
                "positive",
                "uncertain",
                "negative",
                "not stated",
                "negative",
                "uncertain",
            ],
        }
    )
    pq.write_table(f, tmp_path / "findings.parquet")
    table = report.label_prevalence(tmp_path / "findings.parquet").set_index("name")
    assert table.loc["effusion", ["positive", "uncertain", "negative"]].tolist() == [1, 0, 1]
    assert table.loc["edema", ["positive", "uncertain", "negative"]].tolist() == [0, 2, 0]
    assert table.loc["effusion", "prevalence"] == round(1 / 3, 4)


def test_question_counts_are_the_pandas_counts_of_the_questions(tmp_path):
    rng = np.random.default_rng(1)
    n = 5_000
    q = pa.table(
        {
            "split": rng.choice(["train", "validate", "test"], n, p=[0.8, 0.1, 0.1]),
            "question_type": rng.choice(["presence", "view", "level"], n),
            "answer": rng.choice(["yes", "no", "PA view", "small", "large"], n),
        }
    )
    pq.write_table(q, tmp_path / "questions.parquet")
    per_type, answers = report.question_counts(tmp_path / "questions.parquet")
    frame = q.to_pandas()
    splits = ["train", "validate", "test"]
    want_types = frame.groupby(["question_type", "split"]).size().unstack(fill_value=0)[splits]
    want_answers = frame.groupby(["question_type", "answer", "split"]).size().unstack(fill_value=0)[splits]
    pd.testing.assert_frame_equal(per_type, want_types)
    pd.testing.assert_frame_equal(answers, want_answers)


def _report_inputs(folder) -> list[str]:
    """A small run's tables, as the report rule passes them (stages, findings, questions, statistics, RG4)."""
    rng = np.random.default_rng(2)
    n = 3_000
    studies = pa.table({"study_id": pa.array(np.arange(500), pa.int64())})
    rejects = pa.table({"study_id": pa.array([3, 3, 7], pa.int64()), "reason": ["short", "empty", "short"]})
    questions = pa.table(
        {
            "study_id": pa.array(rng.integers(0, 500, n), pa.int64()),
            "split": rng.choice(["train", "validate", "test"], n, p=[0.8, 0.1, 0.1]),
            "question_type": rng.choice(["presence", "view", "level"], n),
            "answer": rng.choice(["yes", "no", "PA view", "small", "large"], n),
        }
    )
    stats = pa.table(
        {
            "split": ["all", "all", "all"],
            "question_type": ["presence", "view", "level"],
            "n_questions": pa.array([1_000, 1_000, 1_000], pa.int64()),
            "share": [1 / 3, 1 / 3, 1 / 3],
            "released_n": pa.array([500, 300, None], pa.int64()),
            "released_share": [0.625, 0.375, None],
        }
    )
    counts = pa.table(
        {"scenario": ["sn", "sn", "mw"], "split": ["train", "test", "train"], "records": [300, 20, 120]}
    )
    rewrite = pa.table(
        {
            "category": ["comparison", "comparison", "prior"],
            "scenario": ["sn", "mw", "sn"],
            "share_removed": [0.1, 0.2, 0.05],
            "share_rephrased": [0.02, 0.01, 0.0],
        }
    )
    tables = {
        "studies": studies,
        "rejects": rejects,
        "findings": _findings(2_000),
        "questions": questions,
        "stats": stats,
        "counts": counts,
        "rewrite": rewrite,
    }
    paths = {}
    for name, table in tables.items():
        paths[name] = str(folder / f"{name}.parquet")
        pq.write_table(table, paths[name])
    return [
        *("--stage", f"ingest=,{paths['studies']},{paths['rejects']}"),
        *("--stage", f"vqa={paths['studies']},{paths['questions']},{paths['rejects']}"),
        *("--findings", paths["findings"], "--questions", paths["questions"], "--vqa-stats", paths["stats"]),
        *("--rg4-counts", paths["counts"], "--rg4-stats", paths["rewrite"]),
    ]


def test_figures_drawn_in_worker_processes_are_the_bytes_drawn_in_one(tmp_path):
    args = _report_inputs(tmp_path)
    report.main([*args, "--outdir", str(tmp_path / "one")])
    report.main([*args, "--workers", "2", "--outdir", str(tmp_path / "two")])
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two
    assert {"stage_counts.png", "label_prevalence.png", "rg4.png", "answers/presence.png"} <= set(
        map(str, one)
    )
    for path in one:
        assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "two" / path).read_bytes(), path


def test_an_error_in_a_worker_process_fails_the_report(tmp_path):
    args = _report_inputs(tmp_path)
    (tmp_path / "rewrite.parquet").write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid):
        report.main([*args, "--workers", "2", "--outdir", str(tmp_path / "out")])
