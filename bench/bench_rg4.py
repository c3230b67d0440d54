"""RG4 + exports benchmark at MIMIC-CXR scale (issue 5: ≤ 60 s wall for both at 227,835 studies).

    python -m bench.bench_rg4 [--studies 227835 --patients 65379 --seed 1] [--prepare-only] [--no-write]

Inputs are the synthetic corpus at full scale run through the real upstream steps, so the rewriter
sees realistic report text: ``tools.synth`` (zip only) → ``workflow.ingest`` → ``workflow.sections``
→ ``workflow.keyinfo.run_rules`` (the findings table the exports read), cached under
``bench/cache/rg4/`` (gitignored). Upstream steps are not timed. Then ``python -m workflow.rg4`` (rules
rewriter) and ``python -m workflow.exports`` run as subprocesses, the way the rules run them, and their
wall time, CPU time and peak RSS are reported and written to ``bench/RESULTS.md`` under
"## RG4 and exports".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.results import write_section

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "cache" / "rg4"
HEADING = "## RG4 and exports"
PY = sys.executable


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=REPO, stderr=fh, stdout=subprocess.DEVNULL, check=True)


def prepare(studies: int, patients: int, seed: int) -> Path:
    """The full-scale inputs (generated once, then reused)."""
    corpus = WORK / "mimic"
    if not (corpus / "mimic-cxr-reports.zip").exists():
        print(f"generating {studies} studies ...", flush=True)
        _run(
            [
                PY,
                "-m",
                "tools.synth",
                "--out",
                str(corpus),
                "--studies",
                str(studies),
                "--patients",
                str(patients),
                "--seed",
                str(seed),
                "--no-tree",
            ],
            WORK / "synth.log",
        )
    steps = [
        (
            "studies.parquet",
            [
                PY,
                "-m",
                "workflow.ingest",
                "mimic",
                "--reports",
                str(corpus / "mimic-cxr-reports.zip"),
                "--split",
                str(corpus / "mimic-cxr-2.0.0-split.csv.gz"),
                "--metadata",
                str(corpus / "mimic-cxr-2.0.0-metadata.csv.gz"),
                "--studies",
                str(WORK / "studies.parquet"),
                "--images",
                str(WORK / "images.parquet"),
                "--rejects",
                str(WORK / "ingest_rejects.parquet"),
            ],
        ),
        (
            "sections.parquet",
            [
                PY,
                "-m",
                "workflow.sections",
                "--studies",
                str(WORK / "studies.parquet"),
                "--sections",
                str(WORK / "sections.parquet"),
                "--mit-csv",
                str(WORK / "mit.csv"),
                "--rejects",
                str(WORK / "sections_rejects.parquet"),
            ],
        ),
        (
            "findings.parquet",
            [
                PY,
                "-m",
                "workflow.keyinfo.run_rules",
                "--sections",
                str(WORK / "sections.parquet"),
                "--findings",
                str(WORK / "findings.parquet"),
                "--stats",
                str(WORK / "kstats.parquet"),
                "--rejects",
                str(WORK / "keyinfo_rejects.parquet"),
                "--workers",
                "2",
                "--alternatives",
                "uncertain",
                "--hedges",
                "uncertain",
            ],
        ),
    ]
    for output, cmd in steps:
        if not (WORK / output).exists():
            print(f"preparing {output} ...", flush=True)
            _run(cmd, WORK / f"{output}.log")
    return WORK


def measure(cmd: list[str], log: Path) -> dict:
    """Wall time, CPU time (user + sys of the child) and peak RSS of one subprocess."""
    import psutil

    before = os.times()
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = psutil.Popen(cmd, cwd=REPO, stderr=fh, stdout=subprocess.DEVNULL)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode:
        raise SystemExit(f"{cmd[2]} failed; see {log}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall": wall, "cpu": cpu, "peak_rss_mb": peak / 2**20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=227_835)
    p.add_argument("--patients", type=int, default=65_379)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    work = prepare(args.studies, args.patients, args.seed)
    if args.prepare_only:
        return
    out = work / "out"
    inputs = [
        "--studies",
        str(work / "studies.parquet"),
        "--images",
        str(work / "images.parquet"),
        "--sections",
        str(work / "sections.parquet"),
    ]
    rg4 = measure(
        [PY, "-m", "workflow.rg4", *inputs, "--outdir", str(out / "rg4"), "--workers", "2"], work / "rg4.log"
    )
    exports = measure(
        [
            PY,
            "-m",
            "workflow.exports",
            *inputs,
            "--findings",
            str(work / "findings.parquet"),
            "--outdir",
            str(out / "exports"),
            "--workers",
            "2",
        ],
        work / "exports.log",
    )
    n_studies = pq.ParquetFile(work / "studies.parquet").metadata.num_rows
    n_images = pq.ParquetFile(work / "images.parquet").metadata.num_rows
    counts = pq.read_table(out / "rg4" / "counts.parquet").to_pylist()
    stats = pq.read_table(out / "rg4" / "rewrite_stats.parquet").to_pylist()
    summary = json.loads((out / "exports" / "summary.json").read_text())
    report = render(n_studies, n_images, rg4, exports, counts, stats, summary)
    print(report)
    if not args.no_write:
        write_section(HEADING, report)


def render(n_studies, n_images, rg4, exports, counts, stats, summary) -> str:
    total = rg4["wall"] + exports["wall"]
    load = os.getloadavg()[0]
    lines = [
        HEADING,
        "",
        "`bench/bench_rg4.py` (issue 5) times `python -m workflow.rg4` (rules rewriter) and `python -m workflow.exports`",
        "as the rules run them (subprocesses reading and writing Parquet/JSON). **Inputs**: the synthetic corpus at",
        f"full scale ({n_studies:,} studies, {n_images:,} images; `tools.synth` → ingest → sections → keyinfo rules,",
        "cached under `bench/cache/rg4/`, not timed).",
        "",
        f"**Speed** ({platform.machine()}, {os.cpu_count()} cores shared with other jobs, load average {load:.1f} at the end):",
        "",
        "| step | wall s | CPU s | peak RSS MB |",
        "|---|---:|---:|---:|",
        f"| rg4 (rules rewriter, 4 scenarios, 4 JSON files) | {rg4['wall']:.1f} | {rg4['cpu']:.1f} | {rg4['peak_rss_mb']:.0f} |",
        f"| exports (R2Gen annotation, RaDialog RG + INS) | {exports['wall']:.1f} | {exports['cpu']:.1f} | {exports['peak_rss_mb']:.0f} |",
        f"| **total** (target ≤ 60 s) | **{total:.1f}** | {rg4['cpu'] + exports['cpu']:.1f} | |",
        "",
        "**Records** per scenario × split (dropped = failed the check: residue or changed label vector):",
        "",
        "| scenario | train | val | test | dropped |",
        "|---|---:|---:|---:|---:|",
    ]
    by = {}
    for row in counts:
        by.setdefault(row["scenario"], {})[row["split"]] = row
    for s, splits in by.items():
        dropped = sum(r["rejected"] for r in splits.values())
        lines.append(
            f"| {s} | {splits['train']['records']:,} | {splits['val']['records']:,} | "
            f"{splits['test']['records']:,} | {dropped:,} |"
        )
    lines += [
        "",
        "**Share of target sentences removed / rephrased** per category (pc prior comparison, pp prior",
        "procedure, comm communication, view views not provided):",
        "",
        "| scenario | category | removed % | rephrased % |",
        "|---|---|---:|---:|",
    ]
    for row in stats:
        if row["removed"] or row["rephrased"]:
            lines.append(
                f"| {row['scenario']} | {row['category']} | {100 * row['share_removed']:.2f} | "
                f"{100 * row['share_rephrased']:.2f} |"
            )
    lines += [
        "",
        f"**Exports**: R2Gen annotation {summary['r2gen']}; RaDialog RG {summary['radialog_rg']:,} records, "
        f"INS {summary['radialog_ins']:,} records (tasks {summary['radialog_tasks']}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
