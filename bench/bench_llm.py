"""LLM layer throughput: the client against the loopback OpenAI-compatible server with 5 ms latency.

Measures (figures under "## LLM layer" in bench/RESULTS.md):
* requests/s sustained by the ``openai`` executor (AsyncOpenAI over aiohttp, bounded concurrency, every
  request leased in the cache before it is sent, every answer committed to the SQLite cache as it arrives) and peak RSS of runs of two sizes (each in its own
  process), to show memory stays bounded by what is held per request, not by what is in flight;
* a re-run of the same requests (all answered from the cache, zero sent);
* the per-request overhead of cache writes (one transaction each), of lease claims (one transaction per
  worker pool's worth of keys) and of reading + parsing answers;
* the cost of rendering requests and prompt tokens per report (and the share of the prompt that is the
  shared prefix, which servers with prefix caching compute once).

    python -m bench.bench_llm [--requests 10000] [--concurrency 64] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import publish

REPO = Path(__file__).resolve().parents[1]
HEADING = "## LLM layer"
sys.path.insert(0, str(REPO / "tests"))

SENTENCES = [
    "There is a small left pleural effusion with adjacent atelectasis.",
    "No pneumothorax is seen.",
    "The cardiac silhouette is moderately enlarged.",
    "Mild pulmonary vascular congestion.",
    "Patchy opacity in the right lower lobe may reflect pneumonia.",
    "The lungs are otherwise clear.",
    "Right internal jugular catheter terminates in the mid SVC.",
    "No focal consolidation.",
    "Degenerative changes of the thoracic spine.",
    "Stable mild cardiomegaly.",
    "Interval improvement of bilateral layering effusions.",
    "Healed left rib fractures.",
]


def report(i: int) -> str:
    k = 3 + i % 5
    body = " ".join(SENTENCES[(i * 7 + j * 3) % len(SENTENCES)] for j in range(k))
    return f"FINDINGS: {body} Exam {i}.\nIMPRESSION: {SENTENCES[i % len(SENTENCES)]}"


def requests_for(n: int):
    from workflow.llm import build_request
    from workflow.llm.answers import FINDINGS_SCHEMA

    return [
        build_request(
            "keyinfo.j2",
            "student",
            {"temperature": 0, "max_tokens": 800},
            FINDINGS_SCHEMA,
            meta={"study_id": i},
            report=report(i),
        )
        for i in range(n)
    ]


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    tmp = Path(tempfile.mkdtemp())
    port_file = tmp / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "openai_server.py"),
            "--port-file",
            str(port_file),
            "--latency",
            str(latency),
            "--lifetime",
            "900",
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("loopback server did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}/v1"


def executor(base_url: str, concurrency: int) -> dict:
    from workflow.llm.run import load_executor_config

    return load_executor_config(
        {
            "corpus": {"credentialed": True},
            "llm": {
                "endpoints": {
                    "s": {"kind": "openai", "base_url": base_url, "model": "student", "executor": "openai"}
                },
                "client": {"concurrency": concurrency, "max_retries": 3, "timeout_s": 30},
                "prices": {"student": {"input": 0.1, "output": 0.4}},
                "keyinfo": {"endpoint": "s"},
            },
        },
        "keyinfo",
    )


def child(n: int, base_url: str, concurrency: int) -> dict:
    """One online run in this process: throughput and peak RSS."""
    import logging

    from workflow.llm import run_requests

    logging.disable(logging.INFO)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    reqs = requests_for(n)
    build_s = time.perf_counter() - t
    cache = Path(tempfile.mkdtemp()) / "cache.sqlite"
    cfg = executor(base_url, concurrency)
    # Once per process, not per request: reported on its own so the small run's rate is not diluted.
    cpu = time.process_time()
    import openai  # noqa: F401
    from openai._vendor import httpx_aiohttp  # noqa: F401

    import_cpu_s = time.process_time() - cpu
    t, cpu = time.perf_counter(), time.process_time()
    results = run_requests(reqs, cfg, cache, return_results=False)
    online_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    stats = run_requests.last_stats
    t = time.perf_counter()
    run_requests(reqs, cfg, cache, return_results=False)
    cached_s = time.perf_counter() - t
    del results
    return {
        "n": n,
        "build_us": build_s / n * 1e6,
        "online_s": online_s,
        "rps": n / online_s,
        "cpu_ms": cpu_s / n * 1e3,
        "completed": stats.completed,
        "failed": stats.failed,
        "cached_s": cached_s,
        "import_cpu_s": import_cpu_s,
        "rss_start_mb": rss0 / 1024,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "prompt_tokens": stats.prompt_tokens / max(1, stats.completed),
        "cache": str(cache),
    }


def overheads(n: int, cache_path: str) -> dict:
    """Per-request cost of the cache (one transaction per answer) and of reading + parsing answers."""
    from workflow.llm.answers import extract_json, findings_of
    from workflow.llm.cache import Cache

    with Cache(cache_path) as src:
        results = list(src.iter_all())[:n]
    fresh = Path(tempfile.mkdtemp()) / "c.sqlite"
    with Cache(fresh) as cache:
        keys = [r.key for r in results]
        t = time.perf_counter()
        for i in range(0, len(keys), 64):  # as the executor claims: one worker pool's worth at a time
            cache.claim(keys[i : i + 64], "bench", 60.0)
        claim_us = (time.perf_counter() - t) / len(keys) * 1e6
        cache.release("bench")
        t = time.perf_counter()
        for r in results:
            cache.put(r)
        put_us = (time.perf_counter() - t) / len(results) * 1e6
        t = time.perf_counter()
        got = cache.get_many(r.key for r in results)
        get_us = (time.perf_counter() - t) / len(results) * 1e6
    t = time.perf_counter()
    for r in got.values():
        parsed, _ = extract_json(r.content)
        findings_of(parsed)
    parse_us = (time.perf_counter() - t) / len(got) * 1e6
    return {"put_us": put_us, "get_us": get_us, "parse_us": parse_us, "claim_us": claim_us}


def prompt_shape() -> dict:
    from workflow.llm import accounting

    reqs = requests_for(200)
    prefix = sum(len(m["content"]) for m in reqs[0].messages[:-1])
    total = sum(r.prompt_chars() for r in reqs) / len(reqs)
    est = sum(accounting.estimate_tokens(r.prompt_chars() + 16 * len(r.messages)) for r in reqs) / len(reqs)
    return {"prefix_chars": prefix, "prompt_chars": total, "prefix_share": prefix / total, "est_tokens": est}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.005)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.base_url, args.concurrency)))
        return
    load_before = os.getloadavg()[0]
    server, base_url = start_server(args.latency)
    try:
        runs = []
        for n in (args.small, args.requests):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_llm",
                    "--child",
                    str(n),
                    "--base-url",
                    base_url,
                    "--concurrency",
                    str(args.concurrency),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    finally:
        server.kill()
        server.wait()
    over = overheads(5000, runs[-1]["cache"])
    shape = prompt_shape()
    big, small = runs[-1], runs[0]
    rss_per_req_kb = (big["rss_peak_mb"] - small["rss_peak_mb"]) * 1024 / (big["n"] - small["n"])
    block = "\n".join(
        [
            HEADING,
            "",
            f"`python -m bench.bench_llm` on {platform.node() or 'this machine'} (2 cores, shared with the loopback server "
            f"process; load average {load_before:.1f} when it started): AsyncOpenAI client over aiohttp, concurrency {args.concurrency}, server latency {args.latency * 1000:.0f} ms, "
            "keyinfo prompts (system + 2 few-shot turns + report), every request leased in the cache before it is sent "
            "and every answer committed to the SQLite cache as it arrives.",
            "",
            "| run | requests | wall | requests/s | client CPU / request | failed | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| online | {r['n']:,} | {r['online_s']:.1f} s | **{r['rps']:.0f}** | {r['cpu_ms']:.2f} ms | {r['failed']} | "
                f"{r['rss_peak_mb']:.0f} MB |"
                for r in runs
            ),
            *(
                f"| re-run (all cached, 0 sent) | {r['n']:,} | {r['cached_s']:.2f} s | {r['n'] / r['cached_s']:,.0f} | | 0 | |"
                for r in runs[-1:]
            ),
            "",
            f"Client CPU per request (SDK + HTTP + lease + cache commit + accounting) bounds one core at "
            f"~{1000 / big['cpu_ms']:.0f} requests/s; the wall-clock rate also depends on what else the 2 cores run. "
            f"Importing the SDK and aiohttp costs {big['import_cpu_s']:.2f} s CPU once per process (not counted above).",
            "",
            f"- Memory: peak RSS grows {rss_per_req_kb:.1f} KB per request between the {small['n']:,} and "
            f"{big['n']:,} runs (requests and results held by the caller; the fixed prompt prefix is one shared string; "
            f"in-flight work is bounded by the worker pool and a queue of 4 x concurrency). Stages run in shards, which "
            "bounds it per process.",
            f"- Per-request overhead: cache write {over['put_us']:.0f} µs (one WAL transaction, which also ends the "
            f"lease), lease claim {over['claim_us']:.0f} µs (64 keys a transaction), cache read "
            f"{over['get_us']:.0f} µs, JSON parse + validation {over['parse_us']:.0f} µs; rendering a request "
            f"(jinja2 + sha256 key) {big['build_us']:.0f} µs.",
            f"- Prompt size per report: {shape['prompt_chars']:,.0f} characters, ~{shape['est_tokens']:,.0f} tokens "
            f"(estimate; the server counted {big['prompt_tokens']:,.0f}); the shared prefix is "
            f"{shape['prefix_chars']:,} characters = {shape['prefix_share']:.0%} of the prompt, so prefix caching "
            "(vLLM `enable_prefix_caching`, Azure/OpenAI prompt caching) computes most of every prompt once.",
            "",
        ]
    )
    publish(HEADING, block, write=not args.no_write)


if __name__ == "__main__":
    main()
