"""Figures and tables for `snakemake --report`: what a dataset builder wants to see after a run.

Every function reads finished tables of the data contract and writes one PNG (and, where a table says
more than a plot, one CSV). Nothing here recomputes a stage: counts come from the stages' own outputs
and `rejects` tables.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from workflow.cli import parser, setup_logging  # noqa: E402
from workflow.tables import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

PRESENCE_COLOURS = {"positive": "#c0392b", "uncertain": "#f39c12", "negative": "#2980b9"}


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _save_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _distinct_studies(path: str | Path) -> int:
    return len(pq.read_table(path, columns=["study_id"]).column("study_id").unique())


def _rejected_studies(rejects: pd.DataFrame) -> int:
    """Studies a stage rejected: distinct ids (a study can fail several checks), plus id-less rows."""
    return int(rejects["study_id"].nunique() + rejects["study_id"].isna().sum())


def stage_counts(stages: list[tuple[str, str | None, str | None, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per stage: studies in / out / rejected, and the rejects by reason.

    ``stages`` lists (stage, input table, output table, rejects table); the tables have a study_id column.
    Without an input table a stage's input is what it wrote plus what it rejected; without an output
    table (e.g. JSON exports) its output is its input less what it rejected.
    """
    rows, reasons = [], []
    for stage, source, output, rejects in stages:
        rej = pq.read_table(rejects).to_pandas()
        n_rejected = _rejected_studies(rej)
        n_out = _distinct_studies(output) if output else None
        n_in = _distinct_studies(source) if source else n_out + n_rejected
        if n_out is None:
            n_out = n_in - n_rejected
        rows.append({"stage": stage, "in": n_in, "out": n_out, "rejected": n_rejected})
        if len(rej):
            by = rej.groupby("reason")["study_id"].size().reset_index(name="rows")
            by.insert(0, "stage", stage)
            reasons.append(by)
    reasons_frame = (
        pd.concat(reasons, ignore_index=True)
        if reasons
        else pd.DataFrame(columns=["stage", "reason", "rows"])
    )
    return pd.DataFrame(rows), reasons_frame


def plot_stage_counts(counts: pd.DataFrame, reasons: pd.DataFrame, png: str | Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(counts))
    width = 0.27
    for i, (col, colour) in enumerate((("in", "#7f8c8d"), ("out", "#27ae60"), ("rejected", "#c0392b"))):
        ax.bar([p + (i - 1) * width for p in x], counts[col], width, label=col, color=colour)
    ax.set_xticks(list(x), counts["stage"], rotation=30, ha="right")
    ax.set_ylabel("studies")
    ax.set_title("Studies per stage")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    if len(reasons):
        labels = reasons["stage"] + ": " + reasons["reason"]
        ax2.barh(labels, reasons["rows"], color="#c0392b")
        ax2.invert_yaxis()
    ax2.set_title("Rejected studies by reason")
    ax2.set_xlabel("rejects rows")
    _save(fig, png)


def label_prevalence(findings_path: str | Path) -> pd.DataFrame:
    """Studies per canonical finding and merged presence (positive > uncertain > negative)."""
    f = pq.read_table(findings_path, columns=["study_id", "name", "presence"]).to_pandas()
    rank = f["presence"].map({"positive": 0, "uncertain": 1, "negative": 2})
    merged = f.assign(rank=rank).sort_values("rank").drop_duplicates(["study_id", "name"])
    table = merged.pivot_table(index="name", columns="presence", values="study_id", aggfunc="count")
    table = table.reindex(columns=list(PRESENCE_COLOURS)).fillna(0).astype(int)
    table["studies"] = table.sum(axis=1)
    table["prevalence"] = (table["positive"] / f["study_id"].nunique()).round(4)
    return table.sort_values("positive", ascending=False).reset_index()


def plot_label_prevalence(table: pd.DataFrame, png: str | Path) -> None:
    table = table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(table))))
    left = pd.Series(0, index=table.index)
    for presence, colour in PRESENCE_COLOURS.items():
        ax.barh(table["name"], table[presence], left=left, color=colour, label=presence)
        left = left + table[presence]
    ax.set_xlabel("studies")
    ax.set_title("Findings per study (merged presence)")
    ax.legend(loc="lower right")
    _save(fig, png)


def plot_questions(questions_path: str | Path, png: str | Path, top: int = 8) -> pd.DataFrame:
    """Question types per split, and each type's most frequent answers."""
    q = pq.read_table(questions_path, columns=["split", "question_type", "answer"]).to_pandas()
    per_split = q.groupby(["question_type", "split"]).size().unstack(fill_value=0)
    types = list(per_split.index)
    fig, axes = plt.subplots(1, 1 + len(types), figsize=(4 * (1 + len(types)), 4))
    per_split.plot.bar(ax=axes[0], stacked=True, rot=30)
    axes[0].set_title("Questions per type and split")
    axes[0].set_xlabel("")
    for ax, qtype in zip(axes[1:], types, strict=True):
        answers = q.loc[q["question_type"] == qtype, "answer"].value_counts().head(top)
        ax.barh([a[:28] for a in answers.index[::-1]], answers.values[::-1], color="#8e44ad")
        ax.set_title(f"{qtype}: top answers")
    _save(fig, png)
    return per_split.reset_index()


def type_mix(stats_path: str | Path) -> pd.DataFrame:
    """Per question type: our count and share next to the released Medical-CXR-VQA's (vqa/stats.parquet)."""
    stats = pq.read_table(stats_path).to_pandas()
    mix = stats.loc[
        stats["split"] == "all", ["question_type", "n_questions", "share", "released_n", "released_share"]
    ]
    mix = mix.rename(columns={"n_questions": "ours_n", "share": "ours_share"}).reset_index(drop=True)
    mix["released_n"] = mix["released_n"].astype("Int64")
    mix["ours_vs_released"] = mix["ours_n"] / mix["released_n"]
    return mix


def plot_type_mix(mix: pd.DataFrame, png: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(mix))
    ax.bar([i - 0.2 for i in x], mix["ours_share"] * 100, width=0.4, label="this build", color="#2c7fb8")
    ax.bar([i + 0.2 for i in x], mix["released_share"] * 100, width=0.4, label="released (780,014 pairs)",
           color="#bdbdbd")  # fmt: skip
    ax.set_xticks(list(x), mix["question_type"], rotation=20)
    ax.set_ylabel("share of questions (%)")
    ax.set_title("Question-type mix against the released Medical-CXR-VQA")
    ax.legend(frameon=False)
    _save(fig, png)


def plot_rg4(counts_path: str | Path, stats_path: str | Path, png: str | Path) -> None:
    """Scenario sizes per split (RG4_COUNTS), and the share of sentences each rewrite category touched."""
    counts = pq.read_table(counts_path).to_pandas()
    stats = pq.read_table(stats_path).to_pandas()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    counts.pivot_table(index="scenario", columns="split", values="records", aggfunc="sum").plot.bar(
        ax=ax, stacked=True, rot=0
    )
    ax.set_title("MIMIC-RG4 records per scenario and split")
    ax.set_ylabel("records")
    touched = stats.assign(share=stats["share_removed"] + stats["share_rephrased"])
    touched.pivot_table(index="category", columns="scenario", values="share").plot.bar(ax=ax2, rot=0)
    ax2.set_title("Share of target sentences removed or rephrased")
    ax2.set_ylabel("share of sentences")
    _save(fig, png)


def llm_usage(requests_paths: list[str | Path]) -> pd.DataFrame:
    """Requests, tokens, cost and failures per LLM stage (LLM_REQUESTS tables, in run order).

    One row per distinct request: a request key that several studies share (identical reports) or that
    an earlier stage already asked (same model, same prompt) was sent once and is counted once, at the
    first stage that asked it. Requests never sent (``not_sent``) are counted but cost nothing.
    """
    frame = pd.concat([pq.read_table(p).to_pandas() for p in requests_paths], ignore_index=True)
    frame = frame.drop_duplicates("request_key", keep="first")
    frame["stage"] = frame["stage"] + frame["round"].map(lambda r: "" if pd.isna(r) else f" r{int(r)}")
    grouped = frame.groupby("stage", sort=False)
    return pd.DataFrame(
        {
            "requests": grouped.size(),
            "completed": grouped["status"].apply(lambda s: int((s == "completed").sum())),
            "failed_or_refused": grouped["status"].apply(lambda s: int(s.isin(["failed", "refused"]).sum())),
            "unusable_answers": grouped["parse_error"].apply(lambda s: int(s.notna().sum())),
            "prompt_tokens": grouped["prompt_tokens"].sum(),
            "completion_tokens": grouped["completion_tokens"].sum(),
            "cost_usd": grouped["cost_usd"].sum().round(6),
        }
    ).reset_index()


def llm_usage_html(usage: pd.DataFrame, path: str | Path) -> None:
    """The usage table as a small self-contained HTML page (the report viewer shows HTML, not CSV),
    with a total row: what the run sent and what it cost."""
    total = usage.drop(columns="stage").sum(numeric_only=True)
    table = pd.concat([usage, pd.DataFrame([{"stage": "total", **total.to_dict()}])], ignore_index=True)
    counts = [c for c in table.columns if c not in ("stage", "cost_usd")]
    table[counts] = table[counts].astype(int)
    formatters = {c: "{:,}".format for c in counts} | {"cost_usd": "${:,.4f}".format}
    body = table.to_html(index=False, formatters=formatters, border=0, classes="usage")
    style = (
        "body{font-family:sans-serif;font-size:14px} table.usage{border-collapse:collapse}"
        " .usage th,.usage td{padding:4px 10px;text-align:right;border-bottom:1px solid #ddd}"
        " .usage td:first-child,.usage th:first-child{text-align:left}"
        " .usage tr:last-child td{font-weight:bold}"
    )
    html = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>LLM usage</title><style>{style}</style>"
        f"</head><body><h3>LLM requests, tokens and cost per stage</h3>{body}"
        "<p>One row per request sent, at the first stage that sent it; tokens as the endpoint's "
        "<code>usage</code> returned them; cost from <code>llm.prices</code>.</p></body></html>"
    )
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")


def plot_llm(usage: pd.DataFrame, followup_stats: str | Path, png: str | Path) -> None:
    stats = pq.read_table(followup_stats).to_pandas()
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    usage.set_index("stage")[["prompt_tokens", "completion_tokens"]].plot.bar(ax=ax, stacked=True, rot=30)
    ax.set_title("Tokens per LLM stage")
    usage.set_index("stage")[["completed", "failed_or_refused", "unusable_answers"]].plot.bar(ax=ax2, rot=30)
    ax2.set_title("Requests per LLM stage")
    stats.set_index("round")[["missed", "disagreements", "asked", "changed"]].plot(ax=ax3, marker="o")
    ax3.set_title("Follow-up convergence")
    ax3.set_xlabel("round")
    ax3.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    _save(fig, png)


def main(argv=None) -> None:
    p = parser("Figures and tables for the Snakemake report")
    p.add_argument(
        "--stage", action="append", default=[], metavar="NAME=INPUT,OUTPUT,REJECTS", help="empty = derived"
    )
    p.add_argument("--findings")
    p.add_argument("--questions")
    p.add_argument("--vqa-stats", help="vqa/stats.parquet: the type mix next to the released dataset's")
    p.add_argument("--rg4-counts")
    p.add_argument("--rg4-stats")
    p.add_argument("--llm-requests", nargs="*", default=[])
    p.add_argument("--followup-stats")
    p.add_argument("--outdir", required=True)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    out = Path(args.outdir)
    stages = []
    for item in args.stage:
        name, paths = item.split("=", 1)
        source, output, rejects = paths.split(",")
        stages.append((name, source or None, output or None, rejects))
    if stages:
        counts, reasons = stage_counts(stages)
        _save_csv(counts, out / "stage_counts.csv")
        _save_csv(reasons, out / "rejects_by_reason.csv")
        plot_stage_counts(counts, reasons, out / "stage_counts.png")
    if args.findings:
        prevalence = label_prevalence(args.findings)
        _save_csv(prevalence, out / "label_prevalence.csv")
        plot_label_prevalence(prevalence, out / "label_prevalence.png")
    if args.questions:
        plot_questions(args.questions, out / "questions.png")
    if args.vqa_stats:
        mix = type_mix(args.vqa_stats)
        _save_csv(mix, out / "vqa_type_mix.csv")
        plot_type_mix(mix, out / "vqa_type_mix.png")
    if args.rg4_counts:
        plot_rg4(args.rg4_counts, args.rg4_stats, out / "rg4.png")
    if args.llm_requests:
        usage = llm_usage(args.llm_requests)
        _save_csv(usage, out / "llm_usage.csv")
        llm_usage_html(usage, out / "llm_usage.html")
        plot_llm(usage, args.followup_stats, out / "llm.png")
    log.info("report figures in %s", out)


if __name__ == "__main__":
    main()
