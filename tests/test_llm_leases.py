"""Leases on requests in flight: two runners sharing one response cache never both pay for a request.

A job that outlives its Snakemake, or a re-run started while it still works, shares the cache with it. The
lease table says which requests are in flight (owner, expiry); the runners here are real processes of the
``python -m workflow.llm.run`` CLI (or threads with their own connections) against the loopback server,
which counts every request it receives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from workflow.llm import run_requests
from workflow.llm.cache import Cache, Result, export_requests
from workflow.llm.run import load_executor_config

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI, messages_hash  # noqa: E402
from test_llm import config as loopback_config  # noqa: E402
from test_llm import make_requests as requests_of  # noqa: E402
from test_llm import reports, run_cli_argv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_requests(n: int):
    return requests_of(reports(n))


def config(base_url: str, **client) -> dict:
    """test_llm's loopback configuration with a few runners' worth of concurrency and patient timeouts."""
    return loopback_config(base_url, **{"concurrency": 4, "timeout_s": 30, **client})


def cli_runner(tmp_path: Path, cfg: dict, cache_path: Path, name: str) -> subprocess.Popen:
    """One runner process of the CLI every LLM stage goes through (``run_requests`` over the cache)."""
    return subprocess.Popen(
        run_cli_argv(
            tmp_path / "requests.jsonl", cfg, cache_path, "--export", str(tmp_path / f"{name}.jsonl")
        ),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def completed_in(export: Path) -> dict[str, str]:
    """{key: answer text} of the completed answers a runner exported."""
    out = {}
    for line in export.read_text().splitlines():
        row = json.loads(line)
        if row["response"] and row["response"]["status_code"] == 200:
            out[row["custom_id"]] = row["response"]["body"]["choices"][0]["message"]["content"]
    return out


def answer(key: str) -> Result:
    return Result(key, "completed", content='{"findings": []}', prompt_tokens=10, completion_tokens=2)


# -- the lease table ------------------------------------------------------------------------------
def test_lease_table_claim_renew_expire_release_and_foreign_leases(tmp_path):
    path = tmp_path / "c.sqlite"
    with Cache(path) as a, Cache(path) as b:  # two connections, as two runner processes hold
        got = a.claim(["k1", "k2", "k3"], "A", lease_s=30)
        assert (got.claimed, got.busy, got.answered) == (["k1", "k2", "k3"], [], [])
        # B finds A's live leases: it may take none of them, only the key nobody holds
        got = b.claim(["k1", "k2", "k3", "k4"], "B", lease_s=30)
        assert (got.claimed, got.busy) == (["k4"], ["k1", "k2", "k3"])
        # renewing extends every lease of the owner and no other
        before = b.leases()
        assert a.renew("A", lease_s=120) == 3
        after = b.leases()
        assert all(after[k][1] > before[k][1] + 60 for k in ("k1", "k2", "k3"))
        assert after["k4"] == before["k4"]
        # an answer stored releases its lease; another runner then finds it answered, not to send
        a.put(answer("k1"), "A")
        assert "k1" not in b.leases()
        got = b.claim(["k1"], "B", lease_s=30)
        assert (got.claimed, got.busy, got.answered) == ([], [], ["k1"])
        # released leases are free at once
        a.release("A", ["k2"])
        assert b.claim(["k2"], "B", lease_s=30).claimed == ["k2"]
        # an expired lease (its owner was killed and stopped renewing) is taken over
        a.db.execute("UPDATE leases SET expires = ? WHERE key = 'k3'", (time.time() - 1,))
        assert b.claim(["k3"], "B", lease_s=30).claimed == ["k3"]
        assert b.leases()["k3"][0] == "B"
        # a lease of a runner of this host whose process is gone (kill -9) is taken over at once
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        a.claim(["k6"], f"{socket.gethostname()}:{gone.pid}:dead", lease_s=3600)
        assert b.claim(["k6"], "B", lease_s=30).claimed == ["k6"]
        # one of a live process of this host, or of another host, is respected until it expires
        lives = (f"{socket.gethostname()}:{os.getpid()}:other", f"elsewhere:{gone.pid}:x")
        for live in lives:
            a.claim([live], live, lease_s=3600)
            assert b.claim([live], "B", lease_s=30).busy == [live]
        # releasing all of an owner's leases leaves the others'
        a.claim(["k5"], "A", lease_s=30)
        b.release("B")
        assert set(b.leases()) == {"k5", *lives}


def test_claim_respects_the_cache_statuses(tmp_path):
    """Final answers are never claimed; failed ones are (unless another runner stored them during this
    run); unusable ones only when asked to re-ask them."""
    with Cache(tmp_path / "c.sqlite") as cache:
        cache.put(answer("done"))
        cache.put(Result("refused", "refused", error="content_filter"))
        cache.put(Result("failed", "failed", error="timeout"))
        cache.put(Result("unusable", "unusable", error="unusable_answer: not JSON"))
        keys = ["done", "refused", "failed", "unusable", "new"]
        got = cache.claim(keys, "A", 30)
        assert got.claimed == ["failed", "new"] and got.answered == ["done", "refused", "unusable"]
        cache.release("A")
        got = cache.claim(keys, "A", 30, resend=("failed", "unusable"))
        assert got.claimed == ["failed", "unusable", "new"]
        cache.release("A")
        started = time.time()
        cache.put(Result("failed", "failed", error="timeout"))  # another runner's attempt in this run
        got = cache.claim(keys, "A", 30, since=started)
        assert got.claimed == ["new"] and "failed" in got.answered
        # a worse answer does not replace a better one, and still ends the sender's lease
        cache.put(Result("unusable", "failed", error="timeout"), "A")
        assert "unusable" not in cache.leases() and cache.get("unusable").status == "unusable"


# -- runners sharing one cache --------------------------------------------------------------------
def test_two_runner_processes_send_each_request_once_and_both_end_with_every_answer(tmp_path):
    reqs = make_requests(120)
    export_requests(reqs, tmp_path / "requests.jsonl")
    cache_path = tmp_path / "c.sqlite"
    with LoopbackOpenAI(latency=0.05) as srv:
        cfg = config(srv.base_url)
        runners = [cli_runner(tmp_path, cfg, cache_path, name) for name in ("first", "second")]
        errors = [p.communicate(timeout=300)[1] for p in runners]
        assert [p.returncode for p in runners] == [0, 0], errors
        received = Counter({h: len(outcomes) for h, outcomes in srv.by_hash().items()})
    assert set(received) == {messages_hash(r.messages) for r in reqs}
    assert set(received.values()) == {1}  # every request reached the server exactly once
    first, second = completed_in(tmp_path / "first.jsonl"), completed_in(tmp_path / "second.jsonl")
    assert set(first) == set(second) == {r.key for r in reqs} and first == second
    with Cache(cache_path) as cache:
        assert cache.leases() == {}  # nothing left claimed once both are done


def test_a_request_under_a_live_foreign_lease_is_waited_for_not_sent(tmp_path):
    """The other runner's answer is used when it arrives; the server never sees those requests."""
    reqs = make_requests(24)
    held = [r.key for r in reqs[:6]]
    cache_path = tmp_path / "c.sqlite"
    with LoopbackOpenAI(latency=0.01) as srv, Cache(cache_path) as other:
        assert other.claim(held, "another-runner", lease_s=600).claimed == held
        cfg = load_executor_config(config(srv.base_url), "keyinfo")
        out: dict = {}
        runner = threading.Thread(target=lambda: out.update(run_requests(reqs, cfg, cache_path)))
        runner.start()
        deadline = time.monotonic() + 60
        while srv.count() < len(reqs) - len(held) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.is_alive()  # done with its own share, it waits for the leased requests
        for key in held:
            other.put(
                Result(key, "completed", content='{"findings": []}', executor="other"), "another-runner"
            )
        runner.join(60)
        stats = run_requests.last_stats
        received = srv.by_hash()
    assert not runner.is_alive()
    assert not {messages_hash(r.messages) for r in reqs[:6]} & set(received)
    assert len(received) == len(reqs) - len(held)
    assert all(out[k].executor == "other" for k in held) and len(out) == len(reqs)
    assert (stats.completed, stats.elsewhere) == (len(reqs) - len(held), len(held))


def test_a_request_slower_than_the_lease_keeps_it_while_in_flight(tmp_path):
    """Leases are renewed while requests are in flight: a second runner started meanwhile, with answers
    taking longer than a lease, still sends nothing twice."""
    reqs = make_requests(12)
    cache_path = tmp_path / "c.sqlite"
    with LoopbackOpenAI(latency=3.0) as srv:  # answers take 2.5 leases; renewed every 0.4 s
        cfg = load_executor_config(config(srv.base_url, lease_s=1.2, concurrency=12), "keyinfo")
        results: list[dict] = []
        first = threading.Thread(target=lambda: results.append(run_requests(reqs, cfg, cache_path)))
        first.start()
        deadline = time.monotonic() + 30
        while srv.count() < len(reqs) and time.monotonic() < deadline:
            time.sleep(0.02)
        second = run_requests(reqs, cfg, cache_path)  # starts while all 12 are in flight in the first
        first.join(60)
        received = srv.by_hash()
    assert {len(v) for v in received.values()} == {1} and len(received) == len(reqs)
    assert all(r.status == "completed" for r in second.values()) and len(second) == len(reqs)
    assert results[0].keys() == second.keys()


def test_a_runner_killed_mid_flight_is_taken_over_after_its_leases_expire(tmp_path):
    """SIGKILL leaves leases nobody renews: the next runner sends those requests once they expire, and
    only those may reach the server twice; answers that had returned are never asked again."""
    reqs = make_requests(160)
    export_requests(reqs, tmp_path / "requests.jsonl")
    cache_path = tmp_path / "c.sqlite"
    with LoopbackOpenAI(latency=0.2) as srv:
        cfg = config(srv.base_url, lease_s=2)
        victim = cli_runner(tmp_path, cfg, cache_path, "victim")
        deadline = time.monotonic() + 60
        done = 0
        while done < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.suppress(sqlite3.OperationalError), sqlite3.connect(cache_path) as db:
                done = db.execute("SELECT count(*) FROM responses WHERE status = 'completed'").fetchone()[0]
        os.kill(victim.pid, signal.SIGSTOP)  # freeze it, so what it holds can be read, then kill it
        with Cache(cache_path) as cache:
            leased = set(cache.leases())
            completed = {k for k, r in cache.get_many(r.key for r in reqs).items() if r.status == "completed"}
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert completed and leased and not leased & completed
        assert len(completed) < len(reqs)
        results = run_requests(reqs, load_executor_config(cfg, "keyinfo"), cache_path)
        received = Counter({h: len(outcomes) for h, outcomes in srv.by_hash().items()})
    key_of = {messages_hash(r.messages): r.key for r in reqs}
    twice = {key_of[h] for h, n in received.items() if n > 1}
    assert max(received.values()) <= 2
    assert twice <= leased  # only what was in flight at the kill was paid twice
    assert all(received[messages_hash(r.messages)] == 1 for r in reqs if r.key in completed)
    assert set(received) == set(key_of)
    assert len(results) == len(reqs) and all(r.status == "completed" for r in results.values())


def test_leases_of_a_runner_that_stopped_early_are_released(tmp_path):
    """A run stopped by the circuit breaker frees what it had claimed: nobody waits for a lease."""
    reqs = make_requests(30)
    with LoopbackOpenAI(faults={"500": 1.0}) as srv:
        cfg = load_executor_config(
            config(srv.base_url, lease_s=600, max_retries=0, max_consecutive_failures=3), "keyinfo"
        )
        with pytest.raises(RuntimeError, match="in a row failed"):
            run_requests(reqs, cfg, tmp_path / "c.sqlite")
    with Cache(tmp_path / "c.sqlite") as cache:
        assert cache.leases() == {}


def test_the_batch_executor_leaves_out_requests_another_runner_holds(tmp_path):
    """A batch is submitted only with keys its runner leased: what another runner is sending is not
    submitted again (it has no answer here yet, so this run reports it unanswered)."""
    reqs = make_requests(20)
    held = {r.key for r in reqs[:5]}
    cache_path = tmp_path / "c.sqlite"
    with LoopbackOpenAI() as srv, Cache(cache_path) as other:
        other.claim(held, "another-runner", lease_s=600)
        cfg = config(srv.base_url)
        cfg["llm"]["endpoints"]["e"]["executor"] = "batch"
        cfg["llm"]["batch"] = {"poll_interval_s": 0.01, "max_rounds": 2}
        results = run_requests(make_requests(20), load_executor_config(cfg, "keyinfo"), cache_path)
        submitted = set(srv.batch_submissions)
    assert submitted == {messages_hash(r.messages) for r in reqs[5:]}
    assert {k for k, r in results.items() if r.status == "completed"} == {r.key for r in reqs[5:]}
    assert not held & set(results)
