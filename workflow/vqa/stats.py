"""Question statistics per type and split, next to the released Medical-CXR-VQA's type mix."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from workflow.vqa.config import QUESTION_TYPES

# The released Medical-CXR-VQA 1.0.0 per type (PhysioNet abstract; 780,014 pairs), for the type mix.
RELEASED_COUNTS = {
    "abnormality": 190_525,
    "presence": 211_560,
    "view": 92_048,
    "location": 104_680,
    "level": 111_715,
    "type": 69_486,
}


KEY = ["question_type", "split"]


def question_counts(questions: pa.Table) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the statistics need of a set of questions (question_type, split, answer, study_id), in
    parts that add up over sets of disjoint studies (shards): questions per (type, split, answer) and
    studies per (type, split), split "all" included."""
    # single-threaded: Arrow's threaded hash grouping costs twice the CPU here; the group order it would
    # change is sorted away by add_counts / question_stats
    answers = (
        questions.group_by([*KEY, "answer"], use_threads=False).aggregate([([], "count_all")]).to_pandas()
    )
    answers = answers.rename(columns={"count_all": "n"})
    everything = answers.groupby(["question_type", "answer"], as_index=False)["n"].sum().assign(split="all")
    studies = (
        questions.group_by(KEY, use_threads=False).aggregate([("study_id", "count_distinct")]).to_pandas()
    )
    studies_all = (
        questions.group_by(["question_type"], use_threads=False)
        .aggregate([("study_id", "count_distinct")])
        .to_pandas()
    )
    studies = pd.concat([studies, studies_all.assign(split="all")], ignore_index=True)
    studies = studies.rename(columns={"study_id_count_distinct": "n_studies"})
    return pd.concat([answers, everything], ignore_index=True), studies


def add_counts(parts: list[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The counts of the union of disjoint sets of studies (one :func:`question_counts` each)."""
    answers = pd.concat([a for a, _ in parts], ignore_index=True)
    studies = pd.concat([s for _, s in parts], ignore_index=True)
    return (
        answers.groupby([*KEY, "answer"], as_index=False)["n"].sum(),
        studies.groupby(KEY, as_index=False)["n_studies"].sum(),
    )


def question_stats(answers: pd.DataFrame, studies: pd.DataFrame) -> pd.DataFrame:
    """Counts and answer distribution per question type and split (plus split 'all'), from
    :func:`question_counts` (or :func:`add_counts` of several)."""
    answers = answers[answers["n"] > 0]
    g = answers.groupby(KEY, sort=True)
    out = g.agg(n_questions=("n", "sum"), n_distinct_answers=("answer", "nunique")).reset_index()
    n_studies = studies.set_index(KEY)["n_studies"]
    idx = pd.MultiIndex.from_frame(out[KEY])
    out.insert(3, "n_studies", n_studies.reindex(idx).to_numpy().astype("int64"))
    for col, answer in (("n_yes", "yes"), ("n_no", "no")):
        n = answers[answers["answer"] == answer].set_index(KEY)["n"]
        out[col] = n.reindex(idx).fillna(0).to_numpy().astype("int64")
    both = out["n_yes"] + out["n_no"]
    out["yes_ratio"] = (out["n_yes"] / both).where(both > 0)
    counts = answers.sort_values([*KEY, "n", "answer"], ascending=[True, True, False, True])
    top = counts.groupby(KEY).head(5)
    top_text = (
        top.assign(t=top["answer"] + " (" + top["n"].astype(str) + ")").groupby(KEY)["t"].agg("; ".join)
    )
    first = counts.groupby(KEY).head(1).set_index(KEY)
    out["top_answer"] = first["answer"].reindex(idx).to_numpy()
    out["top_answer_share"] = (first["n"].reindex(idx).to_numpy() / out["n_questions"]).astype(float)
    out["top_answers"] = top_text.reindex(idx).to_numpy()
    out["share"] = out["n_questions"] / out.groupby("split")["n_questions"].transform("sum")
    released_total = sum(RELEASED_COUNTS.values())
    is_all = out["split"] == "all"
    released = out["question_type"].map(RELEASED_COUNTS)
    out["released_n"] = released.where(is_all).astype("Int64")
    out["released_share"] = (released / released_total).where(is_all)
    order = {t: i for i, t in enumerate(QUESTION_TYPES)}
    out = out.sort_values(KEY, key=lambda c: c.map(order) if c.name == "question_type" else c)
    return out.reset_index(drop=True)
