"""Score the clinicians' verdicts: precision per finding, presence, question type and RG4 rewrite category
with 95 % Wilson intervals, and Cohen's kappa between reviewers who judged the same items.

``python -m workflow.review.score verdicts_ab.csv verdicts_cd.csv --precision review/precision.csv
--agreement review/agreement.csv --figure review/precision.png``.

Each item counts once: with several reviewers its verdict is the majority of their correct/wrong
verdicts (a tie, or only "unsure", makes it unsure). Precision is correct / (correct + wrong); unsure
items are reported but not counted, so a reviewer's doubt never counts as the dataset being right.
"""

from __future__ import annotations

import argparse
import logging
import math
from itertools import combinations
from pathlib import Path
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from workflow.cli import parser, setup_logging  # noqa: E402
from workflow.contract import (  # noqa: E402
    REVIEW_AGREEMENT,
    REVIEW_KINDS,
    REVIEW_PRECISION,
    REVIEW_VERDICT_COLUMNS,
    REVIEW_VERDICTS,
)
from workflow.tables import atomic_path  # noqa: E402

log = logging.getLogger(__name__)
REQUIRED = ("item_id", "kind", "study_id", "verdict", "reviewer")
Z95 = NormalDist().inv_cdf(0.975)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (NaN, NaN when n is 0). Unlike the normal
    approximation it stays inside [0, 1] and is sensible at 0/n and n/n, which small review samples hit."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items (NaN when chance agreement is 1)."""
    if len(a) != len(b):
        raise ValueError("cohen_kappa: both raters must label the same items")
    n = len(a)
    if n == 0:
        return math.nan
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    labels = set(a) | set(b)
    expected = sum((a.count(lb) / n) * (b.count(lb) / n) for lb in labels)
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


def read_verdicts(paths: list[str | Path]) -> pd.DataFrame:
    """Every verdict of the given files; a row with an unknown verdict or kind is dropped with a warning.

    A reviewer who exported twice (or whose file is listed twice) counts once per item: the last row wins.
    """
    if not paths:
        raise ValueError("config: `review.verdicts` lists no verdicts.csv file to score")
    frames = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config: `review.verdicts` names {str(path)!r}, which does not exist")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: not a review verdicts file, columns {missing} are missing")
        for column in REVIEW_VERDICT_COLUMNS:
            if column not in frame.columns:
                frame[column] = ""
        frame["source_file"] = str(path)
        frames.append(frame[[*REVIEW_VERDICT_COLUMNS, "source_file"]])
    verdicts = pd.concat(frames, ignore_index=True)
    for column in ("verdict", "kind", "reviewer"):
        verdicts[column] = verdicts[column].str.strip()
    verdicts["verdict"] = verdicts["verdict"].str.lower()
    bad = ~verdicts["verdict"].isin(REVIEW_VERDICTS) | ~verdicts["kind"].isin(REVIEW_KINDS)
    if bad.any():
        for (file, verdict, kind), count in (
            verdicts[bad].groupby(["source_file", "verdict", "kind"]).size().items()
        ):
            log.warning("%s: %d rows with verdict %r / kind %r dropped", file, count, verdict, kind)
        verdicts = verdicts[~bad]
    no_reviewer = verdicts["reviewer"] == ""
    verdicts.loc[no_reviewer, "reviewer"] = "?" + verdicts.loc[no_reviewer, "source_file"]
    builds = sorted(set(verdicts["build"]) - {""})
    if len(builds) > 1:
        log.warning(
            "verdicts come from %d page builds (%s): items are matched by id", len(builds), ", ".join(builds)
        )
    return verdicts.drop_duplicates(["item_id", "reviewer"], keep="last").reset_index(drop=True)


def consensus(verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per item: its labels and the majority verdict of its reviewers (ties: unsure)."""
    counts = verdicts.pivot_table(
        index="item_id", columns="verdict", values="reviewer", aggfunc="count", fill_value=0
    )
    counts = counts.reindex(columns=list(REVIEW_VERDICTS), fill_value=0)
    verdict = pd.Series("unsure", index=counts.index)
    verdict[counts["correct"] > counts["wrong"]] = "correct"
    verdict[counts["wrong"] > counts["correct"]] = "wrong"
    labels = verdicts.drop_duplicates("item_id", keep="last").set_index("item_id")
    labels = labels[["kind", "study_id", "finding", "presence", "question_type", "rg4_category"]]
    out = labels.join(verdict.rename("verdict"))
    out["reviewers"] = verdicts.groupby("item_id")["reviewer"].nunique()
    return out.reset_index()


def _row(kind: str, group: str, value: str, verdicts: pd.Series) -> dict:
    counts = verdicts.value_counts()
    correct, wrong = int(counts.get("correct", 0)), int(counts.get("wrong", 0))
    low, high = wilson_interval(correct, correct + wrong)
    return {
        "kind": kind,
        "group": group,
        "value": value,
        "items": len(verdicts),
        "correct": correct,
        "wrong": wrong,
        "unsure": int(counts.get("unsure", 0)),
        "precision": correct / (correct + wrong) if correct + wrong else math.nan,
        "ci_low": low,
        "ci_high": high,
    }


GROUPS = {"finding": ("finding", "presence"), "question": ("question_type",), "rg4": ("rg4_category",)}


def precision_table(items: pd.DataFrame) -> pd.DataFrame:
    """Per kind: all items, then per value of each of the kind's groups (rg4 items count in each category
    their rewrite touched)."""
    rows = []
    for kind in REVIEW_KINDS:
        mine = items[items["kind"] == kind]
        if mine.empty:
            continue
        rows.append(_row(kind, "all", "all", mine["verdict"]))
        for group in GROUPS[kind]:
            values = mine[group].str.split(";") if group == "rg4_category" else mine[group].map(lambda v: [v])
            exploded = pd.DataFrame({"value": values, "verdict": mine["verdict"]}).explode("value")
            exploded = exploded[exploded["value"].fillna("") != ""]
            for value, part in sorted(exploded.groupby("value"), key=lambda kv: str(kv[0])):
                rows.append(_row(kind, group, str(value), part["verdict"]))
    return pd.DataFrame(rows, columns=REVIEW_PRECISION.names)


def agreement_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa per pair of reviewers, over all items both judged and per kind."""
    rows = []
    by_reviewer = {r: g.set_index("item_id") for r, g in verdicts.groupby("reviewer")}
    for a, b in combinations(sorted(by_reviewer), 2):
        shared = by_reviewer[a].index.intersection(by_reviewer[b].index)
        if shared.empty:
            continue
        both = pd.DataFrame(
            {
                "kind": by_reviewer[a].loc[shared, "kind"],
                "a": by_reviewer[a].loc[shared, "verdict"],
                "b": by_reviewer[b].loc[shared, "verdict"],
            }
        )
        parts = [("all", both)] + [(k, both[both["kind"] == k]) for k in REVIEW_KINDS]
        for kind, part in parts:
            if part.empty:
                continue
            la, lb = part["a"].tolist(), part["b"].tolist()
            rows.append(
                {
                    "reviewer_a": a,
                    "reviewer_b": b,
                    "kind": kind,
                    "items": len(part),
                    "observed_agreement": sum(x == y for x, y in zip(la, lb, strict=True)) / len(part),
                    "kappa": cohen_kappa(la, lb),
                }
            )
    return pd.DataFrame(rows, columns=REVIEW_AGREEMENT.names)


def figure(precision: pd.DataFrame, path: str | Path, max_findings: int = 15) -> None:
    """Precision with its Wilson interval per group: one panel per kind (findings: the most judged)."""
    panels = []
    for kind, title in (("finding", "Key information"), ("question", "Questions"), ("rg4", "RG4 rewrites")):
        part = precision[(precision["kind"] == kind) & precision["precision"].notna()]
        if part.empty:
            continue
        if kind == "finding":
            names = part[part["group"] == "finding"].nlargest(max_findings, "items")
            part = pd.concat([part[part["group"] != "finding"], names])
        panels.append((title, part))
    fig_height = 1.2 + sum(0.22 * len(p) + 0.6 for _, p in panels) if panels else 2
    ratios = [len(part) + 1 for _, part in panels] or [1]
    fig, axes = plt.subplots(
        len(ratios), 1, figsize=(7, fig_height), squeeze=False, gridspec_kw={"height_ratios": ratios}
    )
    for ax, (title, part) in zip(axes[:, 0], panels, strict=False):
        labels = [
            f"{v} (n={n})" if g == "all" else f"{g}: {v} (n={n})"
            for g, v, n in zip(part["group"], part["value"], part["correct"] + part["wrong"], strict=True)
        ]
        y = range(len(part))[::-1]
        below = (part["precision"] - part["ci_low"]).clip(lower=0)  # rounding at 0/n and n/n
        above = (part["ci_high"] - part["precision"]).clip(lower=0)
        ax.errorbar(part["precision"], list(y), xerr=[below, above], fmt="o", color="#1b2631", capsize=2)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_xlim(0, 1.02)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no correct/wrong verdicts yet", ha="center", va="center")
        axes[0, 0].set_axis_off()
    axes[-1, 0].set_xlabel("precision (95 % Wilson interval)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def score(paths: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(precision table, agreement table) of the verdicts in ``paths``."""
    verdicts = read_verdicts(paths)
    return precision_table(consensus(verdicts)), agreement_table(verdicts)


def _write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")


def main(argv=None) -> None:
    p: argparse.ArgumentParser = parser("Precision and reviewer agreement from review verdicts.csv files")
    p.add_argument("verdicts", nargs="+", help="verdicts.csv files exported from the review page")
    p.add_argument("--precision", required=True)
    p.add_argument("--agreement", required=True)
    p.add_argument("--figure", required=True)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    precision, agreement = score(args.verdicts)
    _write_csv(precision, args.precision)
    _write_csv(agreement, args.agreement)
    figure(precision, args.figure)
    overall = precision[precision["group"] == "all"]
    for row in overall.itertuples():
        log.info(
            "review %s: precision %.3f [%.3f, %.3f] on %d items",
            row.kind,
            row.precision,
            row.ci_low,
            row.ci_high,
            row.correct + row.wrong,
        )


if __name__ == "__main__":
    main()
