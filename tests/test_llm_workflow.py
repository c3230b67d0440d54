"""The LLM test configuration (`.test/llm-loopback/`) end to end through the repository's Snakefile: gold ->
keyinfo shards -> follow-up rounds -> every downstream stage and the report, on the demo corpus, with the
teacher on the Azure URL shape and the student on an OpenAI-compatible URL, both the loopback server
(tests/openai_server.py). What the report tells a paying user is checked against what the server received.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workflow.tables import read_table

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI  # noqa: E402
from workflow_run import (  # noqa: E402
    LOCAL_OVERLAY,
    REPO,
    embedded_file,
    landing_text,
    named_config,
    run_named_config,
    run_with_configfiles,
)

pytestmark = pytest.mark.slow

CONFIG = "llm-loopback"
KEY_ENV = "CXR_TEST_AZURE_KEY"  # the teacher's api_key_env in .test/llm-loopback/config.yaml
# The LLM layer's own outputs (gold, the last round, the report's usage table): the first run builds these
# alone, so the server's count then is the LLM stages' requests and nothing else.
LLM_TARGETS = (
    "results/llm/gold/findings.parquet",
    "results/llm/gold/sft.jsonl",
    "results/llm/followup/round2/findings.parquet",
    "results/llm/followup/round2/stats.parquet",
    "results/report/llm/llm_usage.csv",
)
# Refusals are sticky (answered once, never re-sent); no transient faults, so every request the server
# counts is one request of the run. Retries under faults are tested in tests/test_llm.py.
FAULTS = {"content_filter": 0.03}


def loopback_urls(server: LoopbackOpenAI) -> dict:
    """The only thing the named config cannot know: the port the server listens on."""
    return {
        "llm": {
            "endpoints": {
                "teacher": {"azure_endpoint": server.root_url},
                "student": {"base_url": server.base_url},
            }
        }
    }


@pytest.fixture(scope="module")
def env():
    return {**os.environ, KEY_ENV: "test-key"}


@pytest.fixture(scope="module")
def server():
    with LoopbackOpenAI(faults=FAULTS, seed=5, lifetime_s=1500) as srv:
        yield srv


@pytest.fixture(scope="module")
def loopback_run(tmp_path_factory, server, env):
    """The LLM stages first (the server's count then is theirs), then the whole workflow, then the report."""
    workdir = tmp_path_factory.mktemp("llm_loopback")
    llm = run_named_config(
        CONFIG, workdir, "--cores", "2", *LLM_TARGETS, local=loopback_urls(server), env=env
    )
    assert llm.returncode == 0, llm.stderr[-4000:]
    llm_stages = {
        "requests": server.count(),
        "refused": server.count("content_filter"),
        "usage": {model: dict(u) for model, u in server.usage.items()},
        "azure_calls": len(server.azure_calls),
        "terminal": llm.stdout + llm.stderr,
    }
    whole = run_named_config(CONFIG, workdir, "--cores", "2", env=env)
    assert whole.returncode == 0, whole.stderr[-4000:]
    report = run_named_config(CONFIG, workdir, "--report", "report.html", env=env)
    assert report.returncode == 0, report.stderr[-4000:]
    return {"workdir": workdir, "llm_stages": llm_stages, "sent": server.count()}


def _usage_total_row(html: str) -> list[str]:
    page = embedded_file(html, "llm_usage.html")
    return re.findall(r"<td>(.*?)</td>", page[page.index("<td>total</td>") :])


def test_progress_shows_on_the_terminal(loopback_run):
    terminal = loopback_run["llm_stages"]["terminal"]
    for stage in ("gold", "keyinfo", "followup"):
        assert re.search(rf"llm {stage}: \d+/\d+ \(100%\), \d+ failed", terminal), (stage, terminal[-3000:])


def test_report_landing_names_the_backend_and_its_endpoints(loopback_run):
    landing = landing_text((loopback_run["workdir"] / "report.html").read_text())
    config = yaml.safe_load(named_config(CONFIG).read_text())["llm"]
    teacher, student = config["endpoints"]["teacher"]["model"], config["endpoints"]["student"]["model"]
    assert (
        f"Key information: llm backend (llm.backend): gold by teacher ({teacher}), key information by "
        f"student ({student}), {config['followup']['rounds']} follow-up rounds; requests, tokens and cost "
        "are under 5. LLM usage." in landing
    ), landing
    assert "the embedded synthetic demo" in landing and "no tokens spent" not in landing


def test_report_counts_what_the_server_received_from_the_llm_stages(loopback_run):
    workdir, sent = loopback_run["workdir"], loopback_run["llm_stages"]
    usage = pd.read_csv(workdir / "results/report/llm/llm_usage.csv").set_index("stage")
    assert usage["requests"].sum() == sent["requests"] > 300
    assert usage["failed_or_refused"].sum() == sent["refused"] > 0
    returned = sent["usage"].values()
    assert usage["prompt_tokens"].sum() == sum(u["prompt_tokens"] for u in returned)
    assert usage["completion_tokens"].sum() == sum(u["completion_tokens"] for u in returned)
    # the teacher's gold, sent to Azure's URL shape
    assert usage.loc["gold r0", "requests"] == 12 and sent["azure_calls"] >= 12
    prices = {
        **yaml.safe_load((REPO / "config.yaml").read_text())["llm"]["prices"],
        **yaml.safe_load(named_config(CONFIG).read_text())["llm"].get("prices", {}),
    }
    billed = sum(
        (u["prompt_tokens"] * prices[m]["input"] + u["completion_tokens"] * prices[m]["output"]) / 1e6
        for m, u in sent["usage"].items()
    )
    assert usage["cost_usd"].sum() == pytest.approx(billed, abs=1e-5) and billed > 0
    # the report the user opens shows the same total
    total = _usage_total_row((workdir / "report.html").read_text())
    assert f"{sent['requests']:,}" in total and f"${billed:,.4f}" in total, total


def test_report_counts_every_request_of_the_whole_run(loopback_run):
    # the exports' RaDialog language tasks included: every request the server received, once
    total = _usage_total_row((loopback_run["workdir"] / "report.html").read_text())
    assert f"{loopback_run['sent']:,}" in total, (total, loopback_run["sent"])
    exports = read_table(loopback_run["workdir"] / "results/exports/llm_requests.parquet").to_pandas()
    assert len(exports) and exports["stage"].eq("exports").all() and exports["request_key"].is_unique


def test_llm_outputs_keep_their_rounds_and_account_for_every_study(loopback_run):
    workdir = loopback_run["workdir"]
    res = workdir / "results" / "llm"
    gold = read_table(res / "gold" / "requests.parquet").to_pandas()
    assert len(gold) == 12 and (gold["model"] == "gpt-4o").all()
    stats = read_table(res / "followup" / "round2" / "stats.parquet").to_pandas()
    assert stats["round"].tolist() == [0, 1, 2]
    rounds = [read_table(res / "followup" / f"round{r}" / "requests.parquet").to_pandas() for r in (0, 1, 2)]
    assert rounds[0]["stage"].eq("keyinfo").all() and all(r["stage"].eq("followup").all() for r in rounds[1:])
    requests = pd.concat(rounds, ignore_index=True)  # each round holds its own requests only
    assert requests["status"].isin(["completed", "refused"]).all()
    assert requests["prompt_hash"].notna().all() and requests["executor"].eq("openai").all()
    findings = read_table(res / "followup" / "round2" / "findings.parquet").to_pandas()
    assert len(findings) and set(findings["request_hash"]) <= set(requests["request_key"])
    studies = set(read_table(workdir / "results/ingest/studies.parquet").column("study_id").to_pylist())
    rejects = read_table(res / "followup" / "round2" / "rejects.parquet").to_pandas()
    # every study answered or rejected with a reason, never both
    assert set(findings["study_id"]) | set(rejects["study_id"]) == studies
    assert not set(findings["study_id"]) & set(rejects["study_id"])
    assert rejects["reason"].notna().all()
    # downstream stages read the LLM's findings: the exports carry the LLM-written RaDialog tasks
    summary = json.loads((workdir / "results/exports/summary.json").read_text())
    assert summary["radialog_tasks"]["easy_language"] > 0 and summary["radialog_tasks"]["reasoning"] > 0
    # report text stays out of the logs
    sample_report = read_table(workdir / "results/sections/sections.parquet").column("findings")
    snippets = [t[:40] for t in sample_report.to_pylist() if t and len(t) > 40][:20]
    logs = "".join(p.read_text() for p in (workdir / "results/logs").glob("llm_*.log"))
    assert logs and not any(s in logs for s in snippets)
    assert re.search(r"llm_gold: \d+ studies in", logs)


def test_reruns_send_nothing_and_a_dead_endpoint_fails_fast(loopback_run, server, env):
    """Last in this module: it re-runs the LLM rules, fails one on purpose and restores it."""
    workdir, sent = loopback_run["workdir"], loopback_run["sent"]
    configfiles = [str(named_config(CONFIG)), LOCAL_OVERLAY]

    def snakemake(*args, files=configfiles, environment=env):
        return run_with_configfiles(workdir, files, *args, env=environment, timeout=600)

    # A second run of the finished workflow is a no-op: nothing to do, zero requests.
    again = snakemake("--cores", "2")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-4000:]
    assert server.count() == sent
    # Forcing the LLM rules to run again re-reads the cache: still zero requests.
    forced = snakemake(
        "--cores", "2", *LLM_TARGETS, "--forcerun", "llm_gold", "llm_keyinfo_shard", "llm_followup"
    )
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert server.count() == sent

    # Re-runs triggered by nothing: the same values in another key order, a repeated default, other client
    # limits (they change how requests travel, not what comes back).
    merged = yaml.safe_load(named_config(CONFIG).read_text())
    merged["llm"]["endpoints"] = {
        name: {**endpoint, **loopback_urls(server)["llm"]["endpoints"][name]}
        for name, endpoint in merged["llm"]["endpoints"].items()
    }

    def overlay(name, values):
        (workdir / name).write_text(yaml.safe_dump(values, sort_keys=False))
        return [name]

    same = {k: merged[k] for k in reversed(list(merged))}
    same["llm"] = {k: same["llm"][k] for k in reversed(list(same["llm"]))}
    same["llm"]["client"] = {**same["llm"]["client"], "concurrency": 3}
    same["llm"]["keyinfo"] = {**same["llm"]["keyinfo"], "temperature": 0}  # the default, repeated
    dry = snakemake("-n", *LLM_TARGETS, files=overlay("same.yaml", same))
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]

    # A change of what the follow-ups send re-runs the follow-ups only; with nothing listening at the
    # student's URL the job fails at once, naming the URL and the config key, without printing the config.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    changed = yaml.safe_load(yaml.safe_dump(merged))
    changed["llm"]["followup"]["max_tokens"] = 333
    changed["llm"]["endpoints"]["student"]["base_url"] = f"http://127.0.0.1:{closed}/v1"
    changed_files = overlay("changed.yaml", changed)
    dry = snakemake("-n", *LLM_TARGETS, files=changed_files)
    assert "llm_followup" in dry.stdout and "llm_gold" not in dry.stdout and "llm_keyinfo" not in dry.stdout
    dead = snakemake("--cores", "2", *LLM_TARGETS, files=changed_files)
    shown = dead.stdout + dead.stderr
    assert dead.returncode != 0 and f"127.0.0.1:{closed}/v1/models" in shown, shown[-4000:]
    assert "llm.endpoints.student.base_url" in shown
    assert "backoff_initial_s" not in shown  # the settings travel in a file, not on the command line
    restored = snakemake("--cores", "2", *LLM_TARGETS)
    assert restored.returncode == 0, restored.stderr[-4000:]
    assert server.count() == sent  # the failed job's outputs are rebuilt from the cache

    # Without the key in the environment the workflow refuses to start (envvars:).
    no_key = {k: v for k, v in env.items() if k != KEY_ENV}
    refused = snakemake("--cores", "2", *LLM_TARGETS, environment=no_key)
    assert refused.returncode != 0 and KEY_ENV in refused.stderr


def job_resources(stdout: str) -> dict[str, set[str]]:
    """rule -> the `llm_*` resources its jobs take, from a dry run's job listing."""
    out: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=rule \w+:)", stdout):
        name = re.match(r"rule (\w+):", block)
        if not name:
            continue
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        taken = {kv.split("=")[0] for kv in res.group(1).split(", ")} if res else set()
        out.setdefault(name.group(1), set()).update(t for t in taken if t.startswith("llm_"))
    return out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {},
            {
                "llm_gold": {"llm_teacher"},
                "llm_keyinfo_shard": {"llm_student"},
                "llm_followup": {"llm_student"},
                "llm_keyinfo_merge": set(),
                "rg4_shard": set(),
                "rg4": set(),
                "ingest": set(),
            },
        ),
        # the shards ask the endpoint; the merge asks nothing
        (
            {"rg4": {"rewriter": "llm", "llm": {"endpoint": "teacher"}}},
            {"rg4_shard": {"llm_teacher"}, "rg4": set()},
        ),
        # an offline vLLM student is no shared server: its shards take nothing and run side by side
        (
            {"llm": {"endpoints": {"student": {"executor": "vllm"}}, "vllm": {"command": ["true"]}}},
            {"llm_keyinfo_shard": set(), "llm_followup": set(), "llm_gold": {"llm_teacher"}},
        ),
    ],
)
def test_each_llm_job_takes_only_its_endpoints_resource(tmp_path, env, override, expected):
    run = run_named_config(CONFIG, tmp_path, "-n", "--cores", "2", local=override, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    taken = job_resources(run.stdout)
    for rule, resources in expected.items():
        assert taken[rule] == resources, (rule, taken)
    # every endpoint resource a job takes is capped in both profiles
    for profile in ("default", "slurm"):
        caps = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())["resources"]
        assert set().union(*taken.values()) <= set(caps), profile
