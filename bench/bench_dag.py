"""Whole-DAG benchmark: `snakemake --cores N` (rules backend) from the reports zip to the report figures.

    python -m bench.bench_dag [--studies 227835 50000 1000000] [--repeat 3] [--cores 2] [--set rg4.shards=4] [--no-write]

For each corpus size the synthetic MIMIC-layout corpus is generated once (``bench/cache/dag/<n>``,
gitignored; zip only, no file tree) and the workflow's default target is run on it into a fresh outdir
(``bench/cache/dag/runs/out_<n>``), the way a user runs it: a config overlay naming the corpus and the
outdir, plus any ``--set section.key=value`` (a YAML value) the run asks for. A sampler walks snakemake's process tree every 50 ms
(PSS every 250 ms, so a job shorter than that can show 0 MB; its own CPU is reported, since it shares the cores): each job is the shell that
Snakemake starts, named by the rule's log file (``<outdir>/logs/<rule>.log``), so the timeline shows
which jobs overlapped, and each job's memory is the PSS summed over its process tree (its worker
processes included, shared pages counted once). The growth curve (studies -> wall seconds, peak GB) goes
to ``bench/RESULTS.md`` with a plot, ``bench/dag_growth.png``. Before each run a fresh process measures the
machine (:func:`host_probe`); the table gives it with the run's system CPU, so runs minutes apart compare.
With ``--repeat N`` each size runs N times in a row: the table and the timeline are the run of median wall
time, and the table lists every run's wall time (the same work took 41-72 s within 40 minutes on this kind of machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.bench_spine import process_memory
from bench.results import publish

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "cache" / "dag"
HEADING = "## Whole DAG"
PLOT = REPO / "bench" / "dag_growth.png"
STUDIES_PER_PATIENT = 227_835 / 65_379  # MIMIC-CXR's ratio
SAMPLE_SECONDS = 0.05  # job start/end and CPU
MEMORY_EVERY = 5  # PSS every 5th sample (250 ms): reading it is most of the sampler's cost
LOG_NAME = re.compile(r"/logs/([A-Za-z0-9_]+)(?:[-.][^/'\" ]*)?\.log")


@dataclass
class Job:
    rule: str
    start: float
    end: float
    peak_mb: float = 0.0
    cpu: float = 0.0  # CPU seconds of its process tree (the last 50 ms before it ends are not seen)
    system: float = 0.0  # the part of ``cpu`` spent in the kernel


# What a fresh process pays, measured just before each run: the wall time of a run swings by up to 25 % on
# this kind of machine within minutes. Most of a job's system time is its first touches of memory: in a VM
# that hands freed memory back to its host (free page reporting), such a touch costs 1-2.5 ms per MB instead
# of ~0.1 ms, and the DAG's jobs touch ~9 GB per run at 227,835 studies; the Python loop tracks CPU speed.
_PROBE = """
import time
import numpy as np
t = time.perf_counter(); memory = np.ones(512 << 20, dtype=np.uint8); touch = time.perf_counter() - t
t = time.perf_counter(); x = 0
for i in range(2_000_000):
    x += i % 7
print(touch * 1000 / 512, time.perf_counter() - t)
"""


@dataclass
class HostProbe:
    ms_per_mb: float  # first touch of memory in a new process
    loop_s: float  # a fixed pure-Python loop

    def __str__(self) -> str:
        return f"first touch {self.ms_per_mb:.2f} ms/MB, Python loop {self.loop_s:.2f} s"


def host_probe() -> HostProbe:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return HostProbe(*map(float, out.stdout.split()))


@dataclass
class DagRun:
    studies: int
    wall: float
    cpu: float
    jobs: list[Job] = field(default_factory=list)
    sampler_cpu: float = 0.0  # this process's own CPU while it watched the run
    system_cpu: float = 0.0  # the part of ``cpu`` spent in the kernel (mostly first touches of memory)
    probe: HostProbe | None = None  # the machine's speed just before the run

    @property
    def peak_job(self) -> Job:
        return max(self.jobs, key=lambda j: j.peak_mb)


def corpus(studies: int, seed: int) -> Path:
    """The cached synthetic corpus of ``studies`` studies (generated when absent)."""
    out = WORK / f"corpus_{studies}"
    stamp = out / ".bench_params.json"
    params = {"studies": studies, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return out
    shutil.rmtree(out, ignore_errors=True)
    patients = max(1, round(studies / STUDIES_PER_PATIENT))
    print(f"generating {studies:,} studies (once) ...", flush=True)
    cmd = [sys.executable, "-m", "tools.synth", "--out", str(out), "--studies", str(studies),
           "--patients", str(patients), "--seed", str(seed), "--no-tree"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True)
    stamp.write_text(json.dumps(params))
    return out


def overlay(data: Path, outdir: Path, overrides: dict | None = None) -> Path:
    """The config overlay a user would write: the corpus, the outdir and the ``overrides``."""
    path = outdir.parent / f"{outdir.name}.yaml"
    settings = {
        **(overrides or {}),
        "corpus": {
            "mimic": {
                "reports": str(data / "mimic-cxr-reports.zip"),
                "split": str(data / "mimic-cxr-2.0.0-split.csv.gz"),
                "metadata": str(data / "mimic-cxr-2.0.0-metadata.csv.gz"),
            }
        },
        "outdir": str(outdir),
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid``, from ``/proc/<pid>/task/*/children``: a few small reads, where
    psutil's ``children()`` scans every process on the machine (~1.7 ms a call here, made for every job
    tree 20 times a second, on the cores of the run being measured)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # ended
        return []
    pids = []
    for tid in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            pids += map(int, f.read().split())
    return pids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += child_pids(tree[-1])
    return tree


TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat times (the sampler reads /proc: Linux)


def _job_usage(pid: int, with_memory: bool) -> tuple[int, float, float]:
    """(PSS, CPU seconds, of which system) of a job's process tree: its worker processes included, shared pages counted
    once, and the CPU of workers that already ended (reaped by their parent) counted via its children's
    times (utime, stime, cutime, cstime of ``/proc/<pid>/stat``). PSS (the costly part: the kernel walks
    the process's pages) only ``with_memory``, else 0."""
    import psutil

    memory, cpu, system = 0, 0.0, 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            if with_memory:
                memory += process_memory(psutil.Process(member))[1]
        except (OSError, psutil.Error):  # ended between two reads
            continue
        cpu += sum(int(v) for v in fields[11:15]) / TICKS
        system += (int(fields[12]) + int(fields[14])) / TICKS
    return memory, cpu, system


def parse_overrides(items: list[str]) -> dict:
    """``["rg4.shards=4", "vqa.style=clean"]`` -> ``{"rg4": {"shards": 4}, "vqa": {"style": "clean"}}``."""
    settings: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        *parents, leaf = key.split(".")
        node = settings
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return settings


def run_dag(studies: int, cores: int, seed: int, overrides: dict | None = None) -> DagRun:
    data = corpus(studies, seed)
    outdir = WORK / "runs" / f"out_{studies}"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    config = overlay(data, outdir, overrides)
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake), "-s", str(REPO / "Snakefile"), "--cores", str(cores), "--configfile", str(config),
           "--directory", str(WORK)]  # fmt: skip
    jobs: dict[int, Job] = {}
    log = outdir.parent / f"snakemake_{studies}.log"
    probe = host_probe()
    before = os.times()
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=WORK, stdout=err, stderr=subprocess.STDOUT)
        samples = 0
        while proc.poll() is None:
            now = time.perf_counter() - start
            with_memory = samples % MEMORY_EVERY == 0
            samples += 1
            for child in child_pids(proc.pid):
                job = jobs.get(child)
                if job is None:
                    try:
                        with open(f"/proc/{child}/cmdline", "rb") as f:
                            match = LOG_NAME.search(f.read().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        continue
                    if not match:
                        continue
                    job = jobs[child] = Job(match.group(1), now, now)
                job.end = now
                memory, cpu, system = _job_usage(child, with_memory)
                job.peak_mb = max(job.peak_mb, memory / 2**20)
                if cpu >= job.cpu:
                    job.cpu, job.system = cpu, system
            time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode:
        raise SystemExit(f"snakemake failed ({proc.returncode}); see {log}\n{log.read_text()[-3000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    sampler = (after.user - before.user) + (after.system - before.system)
    system = after.children_system - before.children_system
    return DagRun(studies, wall, cpu, sorted(jobs.values(), key=lambda j: j.start), sampler, system, probe)


def timeline(run: DagRun, width: int = 60) -> list[str]:
    """One text bar per job over the run's wall time, so overlaps are visible in the Markdown."""
    scale = width / max(run.wall, 1e-9)
    lines = []
    for job in run.jobs:
        left = int(job.start * scale)
        bar = max(1, int((job.end - job.start) * scale))
        lines.append(
            f"    {job.rule:<20} {job.start:6.1f}–{job.end:6.1f} s {job.cpu:5.1f} s CPU ({job.system:4.1f} sys) "
            f"{job.peak_mb:6.0f} MB "
            f"|{' ' * left}{'#' * bar}{' ' * max(0, width - left - bar)}|"
        )
    return lines


def plot(runs: list[DagRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r.studies for r in runs]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(sizes, [r.wall for r in runs], "o-", color="tab:blue", label="wall s")
    ax.set_xlabel("studies")
    ax.set_ylabel("wall time (s)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(sizes, [r.peak_job.peak_mb / 1024 for r in runs], "s--", color="tab:red", label="peak GB")
    ax2.set_ylabel("largest job peak (GB)", color="tab:red")
    ax.set_title("Whole DAG, rules backend, --cores 2")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, nargs="+", default=[227_835])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per size (the median one is reported)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override for every run (repeatable)")  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    WORK.mkdir(parents=True, exist_ok=True)

    runs, walls = [], {}
    for studies in sorted(args.studies):
        repeats = []
        for _ in range(max(1, args.repeat)):
            load = os.getloadavg()[0]
            run = run_dag(studies, args.cores, args.seed, overrides)
            repeats.append(run)
            print(f"{studies:,} studies: {run.wall:.1f} s wall, {run.cpu:.1f} s CPU ({run.system_cpu:.1f} s system), "
                  f"largest job {run.peak_job.rule} {run.peak_job.peak_mb:.0f} MB (load before {load:.1f}; sampler "
                  f"{run.sampler_cpu:.1f} s CPU; {run.probe})", flush=True)  # fmt: skip
            print("\n".join(timeline(run)), flush=True)
        walls[studies] = [r.wall for r in repeats]
        runs.append(sorted(repeats, key=lambda r: r.wall)[(len(repeats) - 1) // 2])  # the median (lower)
    if len(runs) > 1:
        plot(runs, PLOT)

    block = [
        HEADING,
        "",
        f"`python -m bench.bench_dag --studies {' '.join(map(str, args.studies))}"
        + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
        + f"`: `snakemake --cores "
        f"{args.cores}` on the default target (rules backend) over the synthetic corpus, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} at the end"
        + (f"; overrides: `{' '.join('--set ' + s for s in args.set)}`" if args.set else "")
        + (f"; {args.repeat} runs per size in a row, the median one shown" if args.repeat > 1 else "")
        + ".",
        "",
        "| studies | wall s | CPU s (system) | largest job (peak PSS of its process tree) | machine before the run |"
        + (" every run's wall s |" if args.repeat > 1 else ""),
        "|---:|---:|---:|---|---|" + ("---|" if args.repeat > 1 else ""),
        *(
            f"| {r.studies:,} | {r.wall:.1f} | {r.cpu:.1f} ({r.system_cpu:.1f}) | {r.peak_job.rule} "
            f"{r.peak_job.peak_mb:.0f} MB | {r.probe} |"
            + (f" {' / '.join(f'{w:.1f}' for w in walls[r.studies])} |" if args.repeat > 1 else "")
            for r in runs
        ),
        "",
    ]
    for r in runs:
        block += [
            f"Timeline at {r.studies:,} studies (job start–end, CPU of its process tree with its system part, peak MB; the "
            f"sampler itself used {r.sampler_cpu:.1f} s CPU):",
            "",
            *timeline(r),
            "",
        ]
    if len(runs) > 1:
        block += [f"![growth curve]({PLOT.name})", ""]
    text = "\n".join(block)
    publish(HEADING, text, write=not args.no_write)


if __name__ == "__main__":
    main()
