"""Question statistics per type and split, next to the released Medical-CXR-VQA's type mix."""

from __future__ import annotations

import pandas as pd

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


def question_stats(questions: pd.DataFrame) -> pd.DataFrame:
    """Counts and answer distribution per question type and split (plus split 'all')."""
    q = questions[["question_type", "split", "answer", "study_id"]]
    q = pd.concat([q, q.assign(split="all")], ignore_index=True)
    g = q.groupby(["question_type", "split"], sort=True)
    out = g.agg(
        n_questions=("answer", "size"),
        n_studies=("study_id", "nunique"),
        n_distinct_answers=("answer", "nunique"),
    ).reset_index()
    yn = q.assign(is_yes=q["answer"] == "yes", is_no=q["answer"] == "no").groupby(["question_type", "split"])
    out["n_yes"] = yn["is_yes"].sum().to_numpy()
    out["n_no"] = yn["is_no"].sum().to_numpy()
    both = out["n_yes"] + out["n_no"]
    out["yes_ratio"] = (out["n_yes"] / both).where(both > 0)
    counts = q.groupby(["question_type", "split", "answer"]).size().rename("n").reset_index()
    counts = counts.sort_values(
        ["question_type", "split", "n", "answer"], ascending=[True, True, False, True]
    )
    top = counts.groupby(["question_type", "split"]).head(5)
    top_text = (
        top.assign(t=top["answer"] + " (" + top["n"].astype(str) + ")")
        .groupby(["question_type", "split"])["t"]
        .agg("; ".join)
    )
    first = counts.groupby(["question_type", "split"]).head(1).set_index(["question_type", "split"])
    idx = pd.MultiIndex.from_frame(out[["question_type", "split"]])
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
    out = out.sort_values(
        ["question_type", "split"], key=lambda c: c.map(order) if c.name == "question_type" else c
    )
    return out.reset_index(drop=True)
