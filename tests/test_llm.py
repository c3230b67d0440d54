"""The LLM layer against a real loopback OpenAI-compatible server: keys, cache, faults, resume, Azure,
Batch API, guard, accounting. The openai SDK is the real client throughout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from workflow.llm import build_request, run_requests
from workflow.llm.answers import FINDINGS_SCHEMA, extract_json, findings_of
from workflow.llm.cache import Cache, export_requests
from workflow.llm.guard import GuardError, classify, proxy_for
from workflow.llm.probe import EndpointProbeError
from workflow.llm.run import FatalEndpointError, load_executor_config, make_client

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI, messages_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORTS = [
    "FINDINGS: Small left pleural effusion. No pneumothorax. Heart size is normal.",
    "FINDINGS: Moderate cardiomegaly. Mild pulmonary edema. IMPRESSION: Possible right lower lobe pneumonia.",
    "FINDINGS: Lungs are clear. No effusion or pneumothorax.",
    "FINDINGS: Right basal atelectasis. Old healed left rib fracture. IMPRESSION: No acute process.",
]


def reports(n: int) -> list[str]:
    return [f"{REPORTS[i % len(REPORTS)]} Study {i}." for i in range(n)]


def config(
    base_url: str, *, kind: str = "openai", executor: str = "openai", credentialed: bool = True, **client
) -> dict:
    endpoint = {"kind": kind, "model": "student", "executor": executor, "api_key_env": None}
    if kind == "azure":
        endpoint.update(azure_endpoint=base_url, api_version="2024-10-21", model="gpt-4o-deploy")
    else:
        endpoint["base_url"] = base_url
    return {
        "corpus": {"credentialed": credentialed},
        "llm": {
            "endpoints": {"e": endpoint},
            "client": {
                "concurrency": 16,
                "max_retries": 8,
                "timeout_s": 1.0,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.1,
                **client,
            },
            "batch": {"poll_interval_s": 0.01, "max_requests_per_file": 40, "max_rounds": 6},
            "prices": {"student": {"input": 1.0, "output": 4.0}, "gpt-4o": {"input": 2.5, "output": 10.0}},
            "keyinfo": {"endpoint": "e"},
        },
    }


def run_cli_argv(requests: Path, cfg: dict, cache_path: Path, *extra: str) -> list[str]:
    """The command line of the CLI every LLM stage goes through (``run_requests`` over one cache)."""
    return [sys.executable, "-m", "workflow.llm.run", "--requests", str(requests), "--config", json.dumps(cfg),
            "--stage", "keyinfo", "--cache", str(cache_path), *extra]  # fmt: skip


def make_requests(texts, model="student"):
    return [
        build_request(
            "keyinfo.j2",
            model,
            {"temperature": 0, "max_tokens": 300},
            FINDINGS_SCHEMA,
            meta={"study_id": i},
            report=t,
        )
        for i, t in enumerate(texts)
    ]


@pytest.fixture
def server():
    srv = LoopbackOpenAI(lifetime_s=300).start()
    yield srv
    srv.stop()


# -- requests -------------------------------------------------------------------------------------
def test_request_key_depends_on_exactly_the_request(tmp_path):
    a = build_request(
        "keyinfo.j2", "m", {"temperature": 0}, FINDINGS_SCHEMA, meta={"study_id": 1}, report="X"
    )
    same = build_request(
        "keyinfo.j2", "m", {"temperature": 0}, FINDINGS_SCHEMA, meta={"study_id": 2}, report="X"
    )
    assert a.key == same.key and len(a.key) == 64  # meta travels along but is not part of the key
    variants = [
        build_request("keyinfo.j2", "m", {"temperature": 0}, FINDINGS_SCHEMA, report="Y"),
        build_request("keyinfo.j2", "m2", {"temperature": 0}, FINDINGS_SCHEMA, report="X"),
        build_request("keyinfo.j2", "m", {"temperature": 0.7}, FINDINGS_SCHEMA, report="X"),
        build_request("keyinfo.j2", "m", {"temperature": 0}, None, report="X"),
        build_request("keyinfo.j2", "m", {"temperature": 0}, FINDINGS_SCHEMA, adapter="lora1", report="X"),
    ]
    assert len({a.key, *(v.key for v in variants)}) == 6
    # Editing a template (here: an included one) changes the prompt hash and the key.
    for name in ("keyinfo.j2", "keyinfo_prefix.j2"):
        (tmp_path / name).write_text((ROOT / "prompts" / name).read_text())
    before = build_request("keyinfo.j2", "m", {}, None, prompts_dir=tmp_path, report="X")
    (tmp_path / "keyinfo_prefix.j2").write_text(
        (tmp_path / "keyinfo_prefix.j2").read_text().replace("radiologist", "doctor")
    )
    from workflow.llm import request as request_mod

    request_mod._prompt_hash.cache_clear()
    request_mod._environment.cache_clear()
    after = build_request("keyinfo.j2", "m", {}, None, prompts_dir=tmp_path, report="X")
    assert before.prompt_hash != after.prompt_hash and before.key != after.key


def test_prompts_share_a_maximal_prefix():
    a, b = make_requests(["FINDINGS: A.", "FINDINGS: B."])
    assert a.messages[:-1] == b.messages[:-1]  # only the last user turn (the report) differs
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    shared = sum(len(m["content"]) for m in a.messages[:-1])
    assert shared / a.prompt_chars() > 0.9
    for m in a.messages:  # the few-shot answers follow our own schema
        if m["role"] == "assistant":
            parsed, err = extract_json(m["content"])
            assert err is None and findings_of(parsed)[1] == []
    with pytest.raises(Exception, match="report"):
        build_request("keyinfo.j2", "m", {}, None)  # a missing variable is an error, not an empty prompt


def test_answer_parsing_is_tolerant_but_honest():
    assert extract_json('```json\n{"findings": []}\n```') == ({"findings": []}, None)
    assert extract_json('Here you go: {"findings": []} Done.')[0] == {"findings": []}
    assert extract_json('{"findings": [{"name": "ede')[1].startswith(("invalid_json", "no_json"))
    assert extract_json("")[1] == "empty_answer"
    items, problems = findings_of(
        {"findings": [{"name": "Edema", "presence": "Positive", "level": ["mild"]}, {"presence": "negative"}]}
    )
    assert items[0]["presence"] == "positive" and items[0]["level"] == "mild" and items[0]["change"] is None
    assert problems == ["item_1_without_name"]


# -- executor: faults, cache, resume --------------------------------------------------------------
FAULTS = {
    "429": 0.08,
    "500": 0.06,
    "slow": 0.02,
    "bad_body": 0.04,
    "content_filter": 0.03,
    "filter_finish": 0.01,
    "bad_content": 0.02,
}


def test_every_request_ends_completed_or_failed_with_reason_under_faults(tmp_path):
    assert sum(FAULTS.values()) >= 0.20
    with LoopbackOpenAI(faults=FAULTS, seed=7, slow_s=2.0, retry_after=0.02) as srv:
        reqs = make_requests(reports(300))
        cfg = load_executor_config(config(srv.base_url, timeout_s=0.5), "keyinfo")
        results = run_requests(reqs, cfg, tmp_path / "c.sqlite")
        stats = run_requests.last_stats
        outcomes = Counter(o for _, o in srv.events)
    assert set(results) == {r.key for r in reqs}  # none lost
    statuses = Counter(r.status for r in results.values())
    assert statuses["completed"] + statuses["refused"] + statuses["failed"] == 300
    for r in results.values():
        assert r.status in ("completed", "refused", "failed")
        if r.status != "completed":
            assert r.error  # failed or refused always says why
    # Injected faults really happened and were retried; refusals are recorded as such, not retried.
    assert outcomes["429"] and outcomes["500"] and outcomes["slow"] and outcomes["bad_body"]
    assert stats.retries >= outcomes["429"] + outcomes["500"] + outcomes["bad_body"]
    assert statuses["refused"] == outcomes["content_filter"] + outcomes["filter_finish"]
    assert sum(r.attempts for r in results.values()) == len(srv.events)
    # Answers the server broke are completed (we paid for them) and fail at parsing, a separate step.
    broken = [r for r in results.values() if r.status == "completed" and extract_json(r.content)[1]]
    assert len(broken) == outcomes["bad_content"]
    # Accounting: tokens and cost of every completed request.
    done = [r for r in results.values() if r.status == "completed"]
    assert all(r.prompt_tokens > 0 for r in done)
    assert stats.cost_usd == pytest.approx(sum(r.cost for r in results.values()))  # refusals are billed too
    assert done[0].cost == pytest.approx(
        (done[0].prompt_tokens * 1.0 + done[0].completion_tokens * 4.0) / 1e6
    )


def test_second_run_sends_zero_requests(server, tmp_path):
    reqs = make_requests(reports(60))
    cfg = load_executor_config(config(server.base_url), "keyinfo")
    first = run_requests(reqs, cfg, tmp_path / "c.sqlite")
    sent = server.count()
    assert sent == 60 and all(r.status == "completed" for r in first.values())
    second = run_requests(reqs, cfg, tmp_path / "c.sqlite")
    assert server.count() == sent
    assert {k: r.content for k, r in second.items()} == {k: r.content for k, r in first.items()}
    assert run_requests.last_stats.cached == 60


def test_kill_9_then_resume_never_resends_a_completed_request(tmp_path):
    texts = reports(240)
    reqs = make_requests(texts)
    export_requests(reqs, tmp_path / "requests.jsonl")
    cache_path = tmp_path / "c.sqlite"
    with LoopbackOpenAI(latency=0.05) as srv:
        cfg = config(srv.base_url, concurrency=4)
        argv = run_cli_argv(tmp_path / "requests.jsonl", cfg, cache_path)
        proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        done_before = 0
        while time.monotonic() < deadline and done_before < 40:
            time.sleep(0.1)
            if cache_path.exists():
                with sqlite3.connect(cache_path) as db, contextlib.suppress(sqlite3.OperationalError):
                    done_before = db.execute(
                        "SELECT count(*) FROM responses WHERE status='completed'"
                    ).fetchone()[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with Cache(cache_path) as cache:
            completed = {k for k, r in cache.get_many(r.key for r in reqs).items() if r.status == "completed"}
        assert 40 <= len(completed) < len(reqs)  # killed mid-run, with finished work on disk
        srv.reset_counts()
        results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), cache_path)
        resent = srv.by_hash()
    done_hashes = {messages_hash(r.messages) for r in reqs if r.key in completed}
    assert not done_hashes & set(resent)  # nothing that had returned was asked again
    assert len(resent) == len(reqs) - len(completed)
    assert all(r.status == "completed" for r in results.values()) and len(results) == len(reqs)


def test_wrong_key_fails_in_seconds_naming_the_variable_not_its_value(tmp_path, monkeypatch):
    with LoopbackOpenAI(api_key="right") as srv:
        monkeypatch.setenv("CXR_TEST_WRONG_KEY", "wrong-secret-value")
        for kind, url in (("openai", srv.base_url), ("azure", srv.root_url)):
            cfg = config(url, kind=kind)
            cfg["llm"]["endpoints"]["e"]["api_key_env"] = "CXR_TEST_WRONG_KEY"
            with pytest.raises(EndpointProbeError) as err:
                run_requests(
                    make_requests(reports(50)), load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite"
                )
            message = str(err.value)
            assert "HTTP 401" in message and "$CXR_TEST_WRONG_KEY" in message and url in message
            assert "llm.endpoints.e.api_key_env" in message and "wrong-secret-value" not in message
        assert srv.count() == 0  # not one chat request was sent
    with Cache(tmp_path / "c.sqlite") as cache:
        assert cache.counts().get("completed", 0) == 0


def test_nothing_listening_fails_at_once_naming_the_url_key(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    cfg = config(url, max_retries=8, timeout_s=120)  # without the probe: minutes of retries
    with pytest.raises(
        EndpointProbeError, match=rf"nothing answers at .*:{port}/v1/models.*llm\.endpoints\.e\.base_url"
    ):
        run_requests(make_requests(reports(20)), load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")


def test_endpoint_is_probed_once_and_not_at_all_when_everything_is_cached(tmp_path):
    reqs = make_requests(reports(6))
    with LoopbackOpenAI() as srv:
        cfg = load_executor_config(config(srv.base_url), "keyinfo")
        run_requests(reqs[:3], cfg, tmp_path / "c.sqlite")
        run_requests(reqs, cfg, tmp_path / "c.sqlite")
        assert srv.model_listings == 1 and srv.count() == 6
    # The server is gone: a finished stage re-run from the cache still works (nothing to send, no probe).
    results = run_requests(reqs, cfg, tmp_path / "c.sqlite")
    assert all(r.status == "completed" for r in results.values())


def test_progress_lines_on_the_terminal_and_plain_lines_in_the_log(server, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    cfg = load_executor_config(config(server.base_url, progress_s=0), "keyinfo")
    reqs = make_requests(reports(30))
    run_requests(reqs[:10], cfg, tmp_path / "c.sqlite")
    capsys.readouterr()
    run_requests(reqs, cfg, tmp_path / "c.sqlite")
    terminal = capsys.readouterr()
    lines = terminal.out.splitlines()
    assert lines[0] == "llm keyinfo: 20 requests to send (10 answered from the cache)"
    assert "llm keyinfo: 20/20 (100%), 0 failed, 0 refused, 0 retries;" in lines[-1] and "$" in lines[-1]
    assert len(lines) == 1 + 20 + 1  # progress_s: 0 = a line per answer, then the closing line
    assert (
        "\r" not in terminal.out + terminal.err + caplog.text
    )  # no animation frames, in the log least of all
    assert "llm keyinfo: 20/20 (100%)" in caplog.text


def test_key_comes_from_the_environment_only(server, tmp_path, monkeypatch):
    cfg = config(server.base_url)
    cfg["llm"]["endpoints"]["e"]["api_key_env"] = "CXR_TEST_UNSET_KEY"
    monkeypatch.delenv("CXR_TEST_UNSET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="CXR_TEST_UNSET_KEY"):
        run_requests(make_requests(reports(2)), load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")


def test_report_text_never_reaches_the_logs(server, tmp_path, caplog):
    secret = "Zyxwvutsrq-effusion-phrase"
    caplog.set_level(logging.DEBUG)
    logging.getLogger().setLevel(logging.DEBUG)
    reqs = make_requests([f"FINDINGS: {secret}. Small left pleural effusion."] * 3 + reports(3))
    run_requests(reqs, load_executor_config(config(server.base_url), "keyinfo"), tmp_path / "c.sqlite")
    assert caplog.records and secret not in caplog.text


# -- Azure ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env,proxied",
    [
        ({}, False),
        ({"HTTP_PROXY": "http://proxy.example:3128"}, True),
        ({"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "10.1.2.3"}, False),
        ({"ALL_PROXY": "http://proxy.example:3128"}, True),
    ],
)
def test_the_online_clients_transport_takes_exactly_the_proxies_the_guard_checks(monkeypatch, env, proxied):
    """The executor sends over aiohttp (for speed); the proxy it would use is still the one the guard sees."""
    import httpx2

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    url = "http://10.1.2.3:8000/v1"
    http = make_client(load_executor_config(config(url), "keyinfo"))._client
    uses_proxy = http._transport_for_url(httpx2.URL(f"{url}/chat/completions")) is not http._transport
    assert uses_proxy == proxied == (proxy_for(url) is not None)


def test_azure_deployment_url_shape(server, tmp_path, monkeypatch):
    import openai

    client = openai.AzureOpenAI(
        azure_endpoint=server.root_url, api_version="2024-10-21", api_key="k", max_retries=0
    )
    reply = client.chat.completions.create(
        model="gpt-4o-deploy",
        messages=[{"role": "user", "content": "<report>FINDINGS: Small right pleural effusion.</report>"}],
    )
    assert json.loads(reply.choices[0].message.content)["findings"][0]["name"] == "pleural effusion"
    assert server.azure_calls[-1] == {
        "deployment": "gpt-4o-deploy",
        "api_version": "2024-10-21",
        "has_api_key_header": True,
    }
    monkeypatch.setenv("CXR_TEST_AZURE_KEY", "k")
    cfg = config(server.root_url, kind="azure")
    cfg["llm"]["endpoints"]["e"]["api_key_env"] = "CXR_TEST_AZURE_KEY"
    reqs = make_requests(reports(5), model="gpt-4o-deploy")
    results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
    assert all(r.status == "completed" and r.model == "gpt-4o-deploy" for r in results.values())
    assert len(server.azure_calls) == 6


# -- Batch API and the vLLM boundary ---------------------------------------------------------------
def test_batch_executor_resubmits_only_failed_lines(tmp_path):
    with LoopbackOpenAI(faults={"batch_line_fail": 0.3}, seed=3) as srv:
        reqs = make_requests(reports(100))
        cfg = load_executor_config(config(srv.base_url, executor="batch"), "keyinfo")
        results = run_requests(reqs, cfg, tmp_path / "c.sqlite")
        submissions = dict(srv.batch_submissions)
        failures = Counter(h for h, o in srv.events if o == "batch_500")
        n_batches = len(srv.batches)
        results_again = run_requests(reqs, cfg, tmp_path / "c.sqlite")
        assert len(srv.batches) == n_batches  # nothing pending: no new batch
    assert all(r.status == "completed" and r.executor == "batch" for r in results.values())
    assert sum(failures.values()) > 0
    for r in reqs:  # each line submitted once plus once per failure: successes never resubmitted
        h = messages_hash(r.messages)
        assert submissions[h] == 1 + failures[h]
    assert results_again.keys() == results.keys()
    # Batch answers are priced at the batch discount.
    r = next(iter(results.values()))
    assert r.cost == pytest.approx(0.5 * (r.prompt_tokens * 1.0 + r.completion_tokens * 4.0) / 1e6)
    with Cache(tmp_path / "c.sqlite") as cache:
        rows = cache.db.execute("SELECT batch_id, collected FROM batches").fetchall()
    assert len(rows) == n_batches and all(collected == 1 for _, collected in rows)


def test_batch_executor_on_azure(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_TEST_AZURE_KEY", "k")
    cfg = config(server.root_url, kind="azure", executor="batch")
    cfg["llm"]["endpoints"]["e"]["api_key_env"] = "CXR_TEST_AZURE_KEY"
    reqs = make_requests(reports(10), model="gpt-4o-deploy")
    results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
    assert all(r.status == "completed" for r in results.values())
    batch = next(iter(server.batches.values()))
    assert batch["endpoint"] == "/chat/completions"  # Azure's batch endpoint has no /v1
    lines = [json.loads(x) for x in server.files[batch["input_file_id"]].decode().splitlines()]
    assert {x["url"] for x in lines} == {"/chat/completions"} and lines[0]["body"]["model"] == "gpt-4o-deploy"


def test_batch_ids_are_saved_before_polling_and_adopted_on_restart(server, tmp_path):
    reqs = make_requests(reports(30))
    cfg = config(server.base_url, executor="batch")
    cfg["llm"]["batch"]["wait"] = False
    first = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
    assert not any(r.final for r in first.values())
    with Cache(tmp_path / "c.sqlite") as cache:
        assert len(cache.open_batches(next(iter([f"e:{server.root_url}/v1"])))) == 1
    cfg["llm"]["batch"]["wait"] = True
    results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
    assert len(server.batches) == 1  # the in-flight batch was adopted, not paid for twice
    assert all(r.status == "completed" for r in results.values())


FAKE_VLLM = """
import json, sys
sys.path.insert(0, {tests!r})
from openai_server import LoopbackOpenAI
srv = LoopbackOpenAI()
with open(sys.argv[1]) as inp, open(sys.argv[2], "w") as out:
    for n, raw in enumerate(inp):
        line = json.loads(raw)
        if n == 0:  # one failed line: must stay pending for the next run
            out.write(json.dumps({{"custom_id": line["custom_id"], "response": None,
                                   "error": {{"code": "oom", "message": "engine error"}}}}) + "\\n")
            continue
        status, body, _ = srv.completion(line["body"], sys.argv[3])
        out.write(json.dumps({{"custom_id": line["custom_id"], "response": {{"status_code": status, "body": body}},
                              "error": None}}) + "\\n")
"""


def test_vllm_executor_boundary_is_batch_jsonl(tmp_path):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM.format(tests=str(Path(__file__).parent)))
    cfg = config("http://unused", executor="vllm")
    cfg["llm"]["vllm"] = {
        "command": [sys.executable, str(script), "{input}", "{output}", "{model}"],
        "workdir": str(tmp_path / "vllm"),
    }
    reqs = make_requests(reports(12))
    results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
    statuses = Counter(r.status for r in results.values())
    assert statuses == {"completed": 11, "failed": 1}
    failed = next(r for r in results.values() if r.status == "failed")
    assert failed.error.startswith("oom")
    parsed = [extract_json(r.content)[0] for r in results.values() if r.status == "completed"]
    assert all(findings_of(p)[0] for p in parsed)
    results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
    assert Counter(r.status for r in results.values()) == {
        "completed": 11,
        "failed": 1,
    }  # the runner fails line 0 again


# -- guard and accounting -------------------------------------------------------------------------
def test_guard_refuses_credentialed_corpus_on_public_endpoint(tmp_path):
    reqs = make_requests(reports(3))
    public = config("https://api.openai.com/v1")
    with pytest.raises(GuardError, match="credentialed"):
        run_requests(reqs, load_executor_config(public, "keyinfo"), tmp_path / "c.sqlite", dry_run=True)
    public["llm"]["allow_public_endpoint"] = True
    est = run_requests(reqs, load_executor_config(public, "keyinfo"), tmp_path / "c.sqlite", dry_run=True)
    assert est.to_send == 3
    open_corpus = config("https://api.openai.com/v1", credentialed=False)
    assert run_requests(
        reqs, load_executor_config(open_corpus, "keyinfo"), tmp_path / "c.sqlite", dry_run=True
    )
    azure = config("https://myres.openai.azure.com", kind="azure")
    assert run_requests(reqs, load_executor_config(azure, "keyinfo"), tmp_path / "c.sqlite", dry_run=True)
    assert classify("http://127.0.0.1:8000/v1") == classify("http://localhost:1/v1") == "local"
    assert (
        classify("http://10.1.2.3:8000/v1") == "local" and classify("https://api.together.xyz/v1") == "public"
    )


def test_dry_run_estimates_without_sending(server, tmp_path):
    reqs = make_requests(reports(40))
    cfg = load_executor_config(config(server.base_url), "keyinfo")
    est = run_requests(reqs, cfg, tmp_path / "c.sqlite", dry_run=True)
    assert server.count() == 0
    chars = sum(r.prompt_chars() for r in reqs)
    assert est.requests == est.to_send == 40 and est.cached == 0
    assert chars / 4 <= est.prompt_tokens <= chars / 4 * 1.2
    assert est.completion_tokens == 40 * 300  # the max_tokens bound
    assert est.cost_usd == pytest.approx((est.prompt_tokens * 1.0 + est.completion_tokens * 4.0) / 1e6)
    run_requests(reqs[:25], cfg, tmp_path / "c.sqlite")
    est = run_requests(reqs, cfg, tmp_path / "c.sqlite", dry_run=True)
    assert (est.cached, est.to_send) == (25, 15)
    # A cost ceiling refuses the run before anything is sent.
    capped = config(server.base_url)
    capped["llm"]["max_cost_usd"] = est.cost_usd / 2
    sent = server.count()
    with pytest.raises(RuntimeError, match="max_cost_usd"):
        run_requests(reqs, load_executor_config(capped, "keyinfo"), tmp_path / "c.sqlite")
    assert server.count() == sent


def test_exhausted_retries_fail_with_reason_and_are_retried_next_run_refusals_are_not(tmp_path):
    reqs = make_requests(reports(40))
    with LoopbackOpenAI(faults={"500": 1.0}) as broken:  # every attempt fails
        cfg = config(broken.base_url, max_retries=2)
        results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
        assert {r.status for r in results.values()} == {"failed"}
        assert {r.error for r in results.values()} == {"http_500 (after 3 attempts)"}
        assert broken.count() == 40 * 3
    with LoopbackOpenAI(faults={"content_filter": 0.25}, seed=11) as fixed:
        cfg = config(fixed.base_url)
        results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
        refused = {k for k, r in results.items() if r.status == "refused"}
        assert refused and len(refused) + sum(r.status == "completed" for r in results.values()) == 40
        sent = fixed.count()
        assert sent == 40  # the failed ones were asked again (once each: filters are not retried)
        run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
        assert fixed.count() == sent  # a refusal is final: never paid for twice


def test_rate_limiter_spreads_requests_and_tokens(monkeypatch):
    """RPM and TPM budgets on a simulated clock (no real waiting, no timing assertions)."""
    import asyncio

    from workflow.llm import run as run_mod

    clock = {"now": 1000.0}
    monkeypatch.setattr(run_mod.time, "monotonic", lambda: clock["now"])

    async def fake_sleep(seconds):
        clock["now"] += seconds

    monkeypatch.setattr(run_mod.asyncio, "sleep", fake_sleep)

    async def take(limiter, n, tokens):
        start = clock["now"]
        for _ in range(n):
            await limiter.acquire(tokens)
        return clock["now"] - start

    # 60 RPM with a 10 s burst: 10 at once, then one a second.
    assert asyncio.run(take(run_mod.RateLimiter(rpm=60), 10, 0)) == 0
    assert asyncio.run(take(run_mod.RateLimiter(rpm=60), 13, 0)) == pytest.approx(3.0)
    # 6,000 TPM (1,000 tokens of burst): 1,000-token requests go at one per 10 s after the first.
    assert asyncio.run(take(run_mod.RateLimiter(tpm=6000), 4, 1000)) == pytest.approx(30.0)
    # A 429 cool-down pauses everyone.
    limiter = run_mod.RateLimiter()
    limiter.pause(5)
    assert asyncio.run(take(limiter, 1, 0)) == pytest.approx(5.0)


def test_circuit_breaker_stops_a_run_against_a_dead_endpoint(tmp_path):
    reqs = make_requests(reports(300))
    with LoopbackOpenAI(faults={"500": 1.0}) as dead:
        cfg = config(dead.base_url, max_retries=1, concurrency=4)
        cfg["llm"]["client"]["max_consecutive_failures"] = 20
        with pytest.raises(FatalEndpointError, match="in a row failed"):
            run_requests(reqs, load_executor_config(cfg, "keyinfo"), tmp_path / "c.sqlite")
        assert dead.count() < 2 * 60  # stopped after ~20 failures (x2 attempts), not 300 x 2
    with LoopbackOpenAI() as alive:  # the failures are re-sent once the endpoint is back
        results = run_requests(
            reqs, load_executor_config(config(alive.base_url), "keyinfo"), tmp_path / "c.sqlite"
        )
        assert all(r.status == "completed" for r in results.values()) and alive.count() == 300


def test_batch_answers_that_do_not_parse_are_recorded_unusable_and_re_asked_only_on_request(tmp_path):
    """The Batch API path of issue 18 item 7: a garbage line is stored as unusable (not completed, not
    pending); ``retry_unusable`` submits exactly those lines again."""
    from workflow.llm.stages import unusable_findings_answer

    with LoopbackOpenAI(faults={"garbage": 0.3}, seed=2) as srv:
        reqs = make_requests(reports(40))
        cfg = load_executor_config(config(srv.base_url, executor="batch"), "keyinfo")
        first = run_requests(reqs, cfg, tmp_path / "c.sqlite", validate=unusable_findings_answer)
        garbage = {h for h, o in srv.events if o == "batch_garbage"}
        unusable = {k for k, r in first.items() if r.status == "unusable"}
        assert unusable and len(unusable) == len(garbage)
        assert all(r.status == "completed" for k, r in first.items() if k not in unusable)
        assert all(first[k].error.startswith("unusable_answer: ") for k in unusable)
        srv.reset_counts()
        run_requests(reqs, cfg, tmp_path / "c.sqlite", validate=unusable_findings_answer)
        assert srv.count() == 0  # on record, not pending
        srv.faults = {}
        again = run_requests(
            reqs, {**cfg, "retry_unusable": True}, tmp_path / "c.sqlite", validate=unusable_findings_answer
        )
        assert {h for h, _ in srv.events} == garbage
    assert all(r.status == "completed" for r in again.values())
