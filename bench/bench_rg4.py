"""RG4 + exports benchmark at MIMIC-CXR scale (issue 13: ≤ 40 s wall for both at 227,835 studies on 2 cores
with the token weights computed, peak RSS ≤ 2 GB).

    python -m bench.bench_rg4 [--studies 227835 --patients 65379 --seed 1] [--prepare-only] [--no-write]
    python -m bench.bench_rg4 --inputs bench/cache/dag/out_227835 [--out /tmp/rg4bench] [--no-write]

Inputs are the synthetic corpus at full scale run through the real upstream steps, so the rewriter
sees realistic report text: ``tools.synth`` (zip only) → ``workflow.ingest`` → ``workflow.sections``
→ ``workflow.keyinfo.run_rules`` (the findings table the exports read), cached under
``bench/cache/rg4/`` (gitignored), with the tiny local tokenizer the tests build (for ``new_scores``).
Upstream steps are not timed. ``--inputs DIR`` takes them instead from a whole-DAG run's output folder
(``DIR/ingest/{studies,images}.parquet``, ``DIR/sections/sections.parquet``,
``DIR/keyinfo/rules/findings.parquet``, as ``bench/bench_dag.py`` leaves them), read only; the outputs and
the tokenizer then go to ``--out`` (default ``bench/cache/rg4/``). Then ``python -m workflow.rg4`` (rules rewriter, token weights) and
``python -m workflow.exports`` (the whole stage in one process; the DAG runs its R2Gen and RaDialog parts as
two jobs) run as subprocesses with the flags their rules pass (file names from ``rules/*.smk``), and their wall time, CPU time and peak RSS (``/usr/bin/time -v``) are reported and
written to ``bench/RESULTS.md`` under "## RG4 and exports".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from bench.results import publish
from tests.workflow_run import stage_outputs
from workflow.exports import build as exports_build
from workflow.rg4 import build as rg4_build

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


def dag_inputs(folder: Path) -> dict[str, Path]:
    """The upstream tables of a whole-DAG run's output folder (checked to exist)."""
    inputs = {
        "studies": folder / "ingest" / "studies.parquet",
        "images": folder / "ingest" / "images.parquet",
        "sections": folder / "sections" / "sections.parquet",
        "findings": folder / "keyinfo" / "rules" / "findings.parquet",
    }
    missing = [str(path) for path in inputs.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"--inputs {folder}: missing {', '.join(missing)}")
    return inputs


def tiny_tokenizer(folder: Path) -> Path:
    """The tiny local tokenizer the tests build (byte-level BPE on the demo reports, with BOS/EOS), for the
    token weights (``rg4.scores.tokenizer``); built once."""
    if not (folder / "tokenizer.json").exists():
        from tools.tiny_model import iter_corpus_text, train_tokenizer, vocabulary_text

        folder.mkdir(parents=True, exist_ok=True)
        texts = list(iter_corpus_text([REPO / "data" / "demo" / "mimic-cxr-reports.zip"])) + vocabulary_text(
            0
        )
        train_tokenizer(texts, 2048).save(str(folder / "tokenizer.json"))
    return folder


def measure(cmd: list[str], log: Path) -> dict:
    """Wall time, CPU time (user + sys of the process and its forked workers) and peak RSS (the largest
    single process) of one subprocess, as ``/usr/bin/time -v`` reports them; the load average before."""
    timing = log.with_suffix(".time")
    load = os.getloadavg()[0]
    with open(log, "w") as fh:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(timing), *cmd], cwd=REPO, stderr=fh, stdout=subprocess.DEVNULL
        )
    if proc.returncode:
        raise SystemExit(f"{cmd[2]} failed; see {log}")
    fields = dict(line.strip().rsplit(": ", 1) for line in timing.read_text().splitlines() if ": " in line)
    h_m_s = [float(x) for x in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
    wall = sum(x * 60**k for k, x in enumerate(reversed(h_m_s)))
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return {
        "wall": wall,
        "cpu": cpu,
        "peak_rss_mb": int(fields["Maximum resident set size (kbytes)"]) / 1024,
        "load": load,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=227_835)
    p.add_argument("--patients", type=int, default=65_379)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    p.add_argument(
        "--inputs",
        type=Path,
        help="a whole-DAG output folder to read the upstream tables from (instead of generating the corpus)",
    )
    p.add_argument("--out", type=Path, default=WORK, help="folder for the outputs and the tokenizer")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.inputs is not None:
        inputs = dag_inputs(args.inputs)
        source = f"the whole-DAG run's tables in `{args.inputs}`"
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        prepare(args.studies, args.patients, args.seed)
        inputs = {name: WORK / f"{name}.parquet" for name in ("studies", "images", "sections", "findings")}
        source = "`tools.synth` → ingest → sections → keyinfo rules, cached under `bench/cache/rg4/`"
    work = args.out
    if args.prepare_only:
        return
    tokenizer = tiny_tokenizer(work / "tokenizer")
    out = {
        # the outputs of each stage's rules: each stage runs in one process here
        stage: stage_outputs(stage, work / "out")
        for stage in ("rg4", "exports")
    }
    # the stage as its rule runs it: the rule's path flags, 2 threads, token weights with a tokenizer
    rg4 = measure(
        [PY, "-m", "workflow.rg4", *rg4_build.rule_args({**inputs, **out["rg4"]})]
        + ["--workers", "2", "--scores-tokenizer", str(tokenizer)],
        work / "rg4.log",
    )
    exports = measure(
        [PY, "-m", "workflow.exports", *exports_build.rule_args({**inputs, **out["exports"]})],
        work / "exports.log",
    )
    n_studies = pq.ParquetFile(inputs["studies"]).metadata.num_rows
    n_images = pq.ParquetFile(inputs["images"]).metadata.num_rows
    counts = pq.read_table(out["rg4"]["counts"]).to_pylist()
    stats = pq.read_table(out["rg4"]["stats"]).to_pylist()
    summary = json.loads(out["exports"]["summary"].read_text())
    report = render(n_studies, n_images, rg4, exports, counts, stats, summary, source)
    publish(HEADING, report, write=not args.no_write)


def render(n_studies, n_images, rg4, exports, counts, stats, summary, source: str) -> str:
    total = rg4["wall"] + exports["wall"]
    load = os.getloadavg()[0]
    lines = [
        HEADING,
        "",
        "`bench/bench_rg4.py` (issues 5, 13) times `python -m workflow.rg4` (rules rewriter, token weights with the tiny",
        "local tokenizer the tests build) and `python -m workflow.exports` with the flags their rules pass",
        "(subprocesses reading and writing Parquet/JSON; wall, user + sys CPU and the largest process's peak RSS",
        "from `/usr/bin/time -v`). **Inputs**: the synthetic corpus at",
        f"full scale ({n_studies:,} studies, {n_images:,} images; {source}, not timed).",
        "",
        f"**Speed** ({platform.machine()}, {os.cpu_count()} cores shared with other jobs; load average before each step,",
        f"{load:.1f} at the end):",
        "",
        "| step | wall s | CPU s | peak RSS MiB | load before |",
        "|---|---:|---:|---:|---:|",
        f"| rg4 (rules rewriter, 4 scenarios, 4 JSON files with new_scores) | {rg4['wall']:.1f} | {rg4['cpu']:.1f} | {rg4['peak_rss_mb']:.0f} | {rg4['load']:.1f} |",
        f"| exports (R2Gen annotation, RaDialog RG + INS) | {exports['wall']:.1f} | {exports['cpu']:.1f} | {exports['peak_rss_mb']:.0f} | {exports['load']:.1f} |",
        f"| **total** (target ≤ 40 s, ≤ 2 GB) | **{total:.1f}** | {rg4['cpu'] + exports['cpu']:.1f} | | |",
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
