"""Figures and tables for `snakemake --report`: what a dataset builder wants to see after a run.

Every function reads finished tables of the data contract and writes PNGs (and, where a table says
more than a plot, the table as CSV to download and as HTML to read in the report). Nothing here
recomputes a stage: counts come from the stages' own outputs and `rejects` tables.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from matplotlib.ticker import MaxNLocator, StrMethodFormatter  # noqa: E402
from pandas.api.types import is_integer_dtype, is_numeric_dtype  # noqa: E402

from workflow.cli import exit_leaving_objects, parser, setup_logging  # noqa: E402
from workflow.tables import atomic_path, read_table  # noqa: E402

log = logging.getLogger(__name__)

SPLIT_ORDER = {"train": 0, "validate": 1, "val": 1, "test": 2}  # legends in this order, not alphabetical
PRESENCE_COLOURS = {"positive": "#c0392b", "uncertain": "#f39c12", "negative": "#2980b9"}


def _save(fig, path: str | Path) -> None:
    # constrained layout makes room for long tick labels (side-by-side panels would overlap otherwise); it
    # already fits everything inside the figure, so no bbox_inches="tight" (a second full draw per figure)
    fig.set_layout_engine("constrained")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _count_axis(axis) -> None:
    """Counts in the hundreds of thousands: fewer ticks with thousands separators (no "100000125000")."""
    axis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    axis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def _save_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _split_order(splits) -> list[str]:
    return sorted(splits, key=lambda s: (SPLIT_ORDER.get(s, len(SPLIT_ORDER)), s))


def _distinct_studies(path: str | Path) -> int:
    return len(read_table(path, ["study_id"]).column("study_id").unique())


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
    studies_in = functools.cache(_distinct_studies)  # stages share tables (sections.parquet: three inputs)

    for stage, source, output, rejects in stages:
        rej = read_table(rejects).to_pandas()
        n_rejected = _rejected_studies(rej)
        n_out = studies_in(output) if output else None
        n_in = studies_in(source) if source else n_out + n_rejected
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
    _count_axis(ax2.xaxis)
    _save(fig, png)


def merged_presence_counts(findings: pa.Table) -> pa.Table:
    """Studies per canonical finding and merged presence: per (study, name) the best-ranked mention
    (positive > uncertain > negative; a presence outside these three counts for nothing), then studies per
    (name, that rank). Columns name, rank_min (0 = positive), study_id_count; only the pairs that occur.

    Dense (study, name) codes and numpy, not a hash group-by over (study_id, name): the group-by of a million
    findings rows was most of the figure job's work besides drawing."""
    studies = pc.dictionary_encode(findings["study_id"].combine_chunks())
    names = pc.dictionary_encode(findings["name"].combine_chunks())
    n_names = len(names.dictionary)
    pair = studies.indices.to_numpy().astype(np.int64) * n_names + names.indices.to_numpy()
    ranks = pa.array(list(PRESENCE_COLOURS))
    unranked = len(ranks)
    rank = pc.fill_null(pc.index_in(findings["presence"], value_set=ranks), unranked).to_numpy()
    best = np.full(len(studies.dictionary) * n_names, unranked, dtype=np.int8)
    for r in reversed(range(unranked)):  # better ranks last: they overwrite
        best[pair[rank == r]] = r
    best = best.reshape(-1, n_names)
    per_rank = [(best == r).sum(axis=0) for r in range(unranked)]  # studies per name, one array per rank
    name_at, rank_at = np.nonzero(np.stack(per_rank, axis=1))  # the (name, rank) pairs that occur
    return pa.table(
        {
            "name": names.dictionary.take(pa.array(name_at)),
            "rank_min": pa.array(rank_at.astype(np.int32)),
            "study_id_count": pa.array(np.stack(per_rank, axis=1)[name_at, rank_at].astype(np.int64)),
        }
    )


def label_prevalence(findings_path: str | Path) -> pd.DataFrame:
    """Studies per canonical finding and merged presence (positive > uncertain > negative)."""
    f = read_table(findings_path, ["study_id", "name", "presence"])
    merged = merged_presence_counts(f).to_pandas()
    merged["presence"] = merged["rank_min"].map(dict(enumerate(PRESENCE_COLOURS)))
    table = merged.pivot_table(index="name", columns="presence", values="study_id_count", aggfunc="sum")
    table = table.reindex(columns=list(PRESENCE_COLOURS)).fillna(0).astype(int)
    table.columns.name = "presence"
    table["studies"] = table.sum(axis=1)
    table["prevalence"] = (table["positive"] / len(pc.unique(f["study_id"]))).round(4)
    return table.sort_values("positive", ascending=False).reset_index()


def plot_label_prevalence(table: pd.DataFrame, png: str | Path) -> None:
    table = table.iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(table))))
    left = pd.Series(0, index=table.index)
    for presence, colour in PRESENCE_COLOURS.items():
        ax.barh(table["name"], table[presence], left=left, color=colour, label=presence)
        left = left + table[presence]
    ax.set_xlabel("studies")
    _count_axis(ax.xaxis)
    ax.set_title("Findings per study (merged presence)")
    ax.legend(loc="lower right")
    _save(fig, png)


def question_counts(questions_path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Questions per type and split, and answers per type and split (QUESTIONS table)."""
    keys = ["question_type", "answer", "split"]
    q = read_table(questions_path, ["split", "question_type", "answer"])
    # counted in Arrow (a million rows), shaped in pandas (a few hundred rows); pandas' group-by leaves out
    # the rows with a null key, so these sums do too
    counted = q.group_by(keys, use_threads=False).aggregate([([], "count_all")]).to_pandas()
    counted = counted[counted["question_type"].notna() & counted["split"].notna()]
    splits = _split_order(counted["split"].unique())
    per_type = counted.groupby(["question_type", "split"])["count_all"].sum().rename(None)
    answers = counted[counted["answer"].notna()].set_index(keys)["count_all"].sort_index().rename(None)
    return per_type.unstack(fill_value=0)[splits], answers.unstack(fill_value=0)[splits]


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def plot_questions(per_type: pd.DataFrame, png: str | Path) -> None:
    """Questions per type, stacked by split: one panel (the answers have a figure per type)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    per_type.plot.barh(ax=ax, stacked=True)
    ax.invert_yaxis()
    ax.set_xlabel("questions")
    _count_axis(ax.xaxis)
    ax.set_ylabel("")
    ax.set_title("Questions per type and split")
    ax.legend(title="split", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))  # clear of the bars
    _save(fig, png)


def plot_answers(answers: pd.DataFrame, qtype: str, png: str | Path, top: int = 12) -> None:
    """One question type's most frequent answers, as shares of each split's questions of that type: the
    train split dwarfs the others in counts, so shares are what makes the splits comparable."""
    table = answers.loc[qtype]
    shares = table / table.sum() * 100
    shares = shares.loc[table.sum(axis=1).sort_values(ascending=False).index[:top]]
    shares.index = [_short(str(a)) for a in shares.index]
    shares.columns = [f"{split} (n={n:,})" for split, n in table.sum().items()]  # small splits say so
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(shares)))
    shares.plot.barh(ax=ax, width=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of the split's {qtype} questions (%)")
    ax.set_ylabel("")
    ax.set_title(f"{qtype}: the {len(shares)} most frequent answers per split")
    ax.legend(title="split", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    _save(fig, png)


def type_mix(stats_path: str | Path) -> pd.DataFrame:
    """Per question type: our count and share next to the released Medical-CXR-VQA's (vqa/stats.parquet)."""
    stats = read_table(stats_path).to_pandas()
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
    counts = read_table(counts_path).to_pandas()
    stats = read_table(stats_path).to_pandas()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    per_split = counts.pivot_table(index="scenario", columns="split", values="records", aggfunc="sum")
    per_split[_split_order(per_split.columns)].plot.bar(ax=ax, stacked=True, rot=0)
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
    frame = pd.concat([read_table(p).to_pandas() for p in requests_paths], ignore_index=True)
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


TABLE_STYLE = (
    "body{font-family:sans-serif;font-size:14px} table.report{border-collapse:collapse}"
    " .report th,.report td{padding:4px 10px;text-align:right;border-bottom:1px solid #ddd}"
    " .report tr.total td{font-weight:bold}"
)


def html_table(
    frame: pd.DataFrame, path: str | Path, title: str, note: str = "", total: bool = False
) -> None:
    """A table as a small self-contained HTML page: the report viewer shows HTML, but a CSV only as a
    download link. Numbers right-aligned with thousands separators, ``*_usd`` columns in dollars, the
    leading text columns left-aligned; ``total`` adds a bold row of the numeric columns' sums."""
    table = frame.reset_index(drop=True)
    text_columns = 0
    while text_columns < len(table.columns) and not is_numeric_dtype(table.dtypes.iloc[text_columns]):
        text_columns += 1
    if total:
        # per column: one Series of the sums would turn the integer counts into floats
        sums = {c: table[c].sum() for c in table.columns[text_columns:] if is_numeric_dtype(table[c])}
        labels = dict.fromkeys(table.columns[:text_columns], "")
        if text_columns:
            labels[table.columns[0]] = "total"
        table = pd.concat([table, pd.DataFrame([{**labels, **sums}])], ignore_index=True)

    def formatter(column: str):
        dtype = table[column].dtype
        if column.endswith("_usd"):
            fmt = "${:,.4f}".format
        elif is_integer_dtype(dtype):
            fmt = "{:,}".format
        elif is_numeric_dtype(dtype):
            fmt = "{:,.4f}".format
        else:
            return str
        return lambda v: "" if pd.isna(v) else fmt(v)

    body = table.to_html(
        index=False, formatters={c: formatter(c) for c in table.columns}, border=0, classes="report"
    )
    if total:  # pandas writes no row classes; the total is the last body row
        head, sep, tail = body.rpartition("<tr>")
        body = f'{head}<tr class="total">{tail}'
    left = "".join(
        f" .report td:nth-child({i}),.report th:nth-child({i}){{text-align:left}}"
        for i in range(1, text_columns + 1)
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{TABLE_STYLE}{left}</style></head><body><h3>{escape(title)}</h3>{body}"
        f"{f'<p>{note}</p>' if note else ''}</body></html>"
    )
    with atomic_path(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def _save_table(frame: pd.DataFrame, stem: Path, title: str, note: str = "", total: bool = False) -> None:
    """The table as CSV (to download) and as HTML (to read in the report), side by side."""
    _save_csv(frame, stem.with_suffix(".csv"))
    html_table(frame, stem.with_suffix(".html"), title, note, total)


def plot_llm(usage: pd.DataFrame, followup_stats: str | Path, png: str | Path) -> None:
    stats = read_table(followup_stats).to_pandas()
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


def _stage_outputs(stages: list[tuple[str, str | None, str | None, str]], out: Path) -> None:
    counts, reasons = stage_counts(stages)
    _save_table(counts, out / "stage_counts", "Studies in, out and rejected per stage")
    _save_table(reasons, out / "rejects_by_reason", "Rejects rows per stage and reason")
    plot_stage_counts(counts, reasons, out / "stage_counts.png")


def _prevalence_outputs(findings: str, out: Path) -> None:
    prevalence = label_prevalence(findings)
    _save_table(
        prevalence,
        out / "label_prevalence",
        "Studies per finding and merged presence",
        "<code>prevalence</code>: share of all studies with the finding positive.",
    )
    plot_label_prevalence(prevalence, out / "label_prevalence.png")


def _question_outputs(questions: str, out: Path) -> None:
    per_type, answers = question_counts(questions)
    plot_questions(per_type, out / "questions.png")
    answers_dir = out / "answers"
    answers_dir.mkdir(parents=True, exist_ok=True)
    for qtype in per_type.index:
        plot_answers(answers, qtype, answers_dir / f"{qtype}.png")


def _type_mix_outputs(vqa_stats: str, out: Path) -> None:
    mix = type_mix(vqa_stats)
    _save_table(mix, out / "vqa_type_mix", "Question-type mix: this build and the released Medical-CXR-VQA")
    plot_type_mix(mix, out / "vqa_type_mix.png")


def _llm_outputs(requests: list[str], followup_stats: str, out: Path) -> None:
    usage = llm_usage(requests)
    _save_table(
        usage,
        out / "llm_usage",
        "LLM requests, tokens and cost per stage",
        "One row per request sent, at the first stage that sent it; tokens as the endpoint's "
        "<code>usage</code> returned them; cost from <code>llm.prices</code>.",
        total=True,
    )
    plot_llm(usage, followup_stats, out / "llm.png")


def run_all(parts: list[tuple], workers: int = 1) -> None:
    """Call each ``(function, *args)`` of ``parts``: in this process, or in ``workers`` forked processes.

    The parts write disjoint files and share nothing, so their order does not matter; each figure's
    bytes are the same whichever process draws it (same code, same matplotlib settings)."""
    if workers <= 1 or len(parts) <= 1:
        for fn, *fn_args in parts:
            fn(*fn_args)
        return
    # forked: the children start with matplotlib, pandas and pyarrow already imported
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(parts)), mp_context=context) as pool:
        for future in [pool.submit(fn, *fn_args) for fn, *fn_args in parts]:
            future.result()  # re-raises a part's error here


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
    p.add_argument("--workers", type=int, default=1, help="processes drawing the figures")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    out = Path(args.outdir)
    stages = []
    for item in args.stage:
        name, paths = item.split("=", 1)
        source, output, rejects = paths.split(",")
        stages.append((name, source or None, output or None, rejects))
    # the biggest part first: the questions' figures (one per question type) take longest
    parts = []
    if args.questions:
        parts.append((_question_outputs, args.questions, out))
    if args.findings:
        parts.append((_prevalence_outputs, args.findings, out))
    if stages:
        parts.append((_stage_outputs, stages, out))
    if args.rg4_counts:
        parts.append((plot_rg4, args.rg4_counts, args.rg4_stats, out / "rg4.png"))
    if args.vqa_stats:
        parts.append((_type_mix_outputs, args.vqa_stats, out))
    if args.llm_requests:
        parts.append((_llm_outputs, args.llm_requests, args.followup_stats, out))
    run_all(parts, args.workers)
    log.info("report figures in %s", out)


if __name__ == "__main__":
    main()
    exit_leaving_objects()
