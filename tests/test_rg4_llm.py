"""The llm rewriter of MIMIC-RG4, for real through the LLM layer against the loopback OpenAI server.

The server's "model" for rewrite prompts is deliberately imperfect: its first answer only drops the
communication sentence, so a target that also needs comparisons removed fails the check and is retried
with the complaint; a report marked DESTROY is always answered with text that loses its findings, so it
is dropped after the last attempt. Transient 500s are injected on top (the layer retries them).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI  # noqa: E402
from test_rg4 import _study, members, run_rule, run_shards, write_inputs  # noqa: E402
from workflow_run import run_stage  # noqa: E402

from workflow.tables import read_table  # noqa: E402

pytestmark = pytest.mark.slow


class RewritingServer(LoopbackOpenAI):
    def completion(self, body: dict, model: str):
        status, out, outcome = super().completion(body, model)  # keeps the fault injection
        messages = body["messages"]
        if status != 200 or not isinstance(out, dict) or "report sections" not in messages[0]["content"]:
            return status, out, outcome
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        findings = re.search(r"FINDINGS: (.*)", first_user).group(1).strip()
        impression = re.search(r"IMPRESSION: (.*)", first_user).group(1).strip()
        retried = len(messages) > 2

        def answer(text: str) -> str | None:
            if "DESTROY" in text:
                return "Normal chest radiograph."
            sentences = [
                s for s in re.split(r"(?<=\.)\s+(?=[A-Z])", text) if s and "discussed" not in s.lower()
            ]
            if retried and "Keep comparisons" not in messages[0]["content"]:
                sentences = [re.sub(r"^Stable (\w)", lambda m: m.group(1).upper(), s) for s in sentences]
                sentences = [s.replace(" compared to prior", "") for s in sentences]
            return " ".join(sentences) or None

        content = json.dumps(
            {
                "findings": answer(findings) if findings else None,
                "impression": answer(impression) if impression else None,
            }
        )
        out["choices"][0]["message"]["content"] = content
        return status, out, outcome


def llm_config(base_url: str) -> str:
    endpoint = {
        "kind": "openai",
        "model": "student",
        "executor": "openai",
        "api_key_env": None,
        "base_url": base_url,
    }
    return json.dumps(
        {
            "corpus": {"credentialed": True},
            "llm": {
                "endpoints": {"e": endpoint},
                "client": {
                    "concurrency": 8,
                    "max_retries": 8,
                    "timeout_s": 5.0,
                    "backoff_initial_s": 0.01,
                    "backoff_max_s": 0.05,
                },
            },
        }
    )


def rows():
    return [
        _study(
            1,
            11,
            "train",
            datetime(2150, 1, 1),
            "Mild cardiomegaly.",
            "No acute process.",
            images=[("a", "PA")],
        ),
        _study(
            1,
            12,
            "train",
            datetime(2150, 2, 1),
            "Stable mild cardiomegaly compared to prior.",
            "Mild cardiomegaly. Findings were discussed with Dr. ___ at 10 a.m.",
            images=[("b", "PA")],
        ),
        _study(
            2,
            21,
            "train",
            datetime(2150, 1, 1),
            "Stable small left pleural effusion. DESTROY.",
            None,
            images=[("c", "PA")],
        ),
    ]


def rewriter_args(base_url: str, cache: Path) -> list[str]:
    return [
        *("--rewriter", "llm", "--llm-config", llm_config(base_url), "--llm-cache", str(cache)),
        *("--llm-endpoint", "e", "--max-attempts", "2"),
    ]


def test_llm_rewriter_against_loopback_server(tmp_path):
    cache = tmp_path / "cache.sqlite"
    with RewritingServer(faults={"500": 0.5}, seed=5) as srv:
        args = rewriter_args(srv.base_url, cache)
        out = run_rule(tmp_path, rows(), extra=args)
        sent = srv.count("ok")
        sn, sw = members(out, "sn"), members(out, "sw")
        # comparison removed on the retry (sn), kept where a prior is an input (sw); comm removed in both
        assert sn[12]["finding"] == "Mild cardiomegaly."
        assert sw[12]["finding"] == "Stable mild cardiomegaly compared to prior."
        assert sn[12]["impression"] == sw[12]["impression"] == "Mild cardiomegaly."
        assert sn[12]["rewriter"] == "llm" and len(sn[12]["request_hash"]) == 64
        # nothing to remove: kept as written without a request
        assert sn[11]["finding"] == "Mild cardiomegaly." and sn[11]["request_hash"] is None
        # a rewrite that loses the findings is retried, then dropped with the check's reason
        assert 21 not in sn
        reasons = {(r["study_id"], r["reason"]) for r in read_table(out["rejects"]).to_pylist()}
        assert (21, "sn:labels_changed") in reasons
        assert srv.count("500") > 0  # faults were injected and absorbed by the layer's retries
        stats = {(r["scenario"], r["category"]): r for r in read_table(out["stats"]).to_pylist()}
        assert stats[("sn", "comm")]["removed"] == 1 and stats[("sw", "comm")]["removed"] == 1
        assert stats[("sn", "pc")]["rephrased"] == 1 and stats[("sw", "pc")]["rephrased"] == 0
        # every request is accounted for once (the report counts these rows): answered = what the server sent
        requests = read_table(out["llm_requests"]).to_pandas()
        assert requests["stage"].eq("rg4").all() and requests["request_key"].is_unique
        assert (requests["status"] == "completed").sum() == sent
        assert sn[12]["request_hash"] in set(requests["request_key"])
        # a re-run is answered from the cache: nothing is sent again
        srv.reset_counts()
        again = tmp_path / "again"
        again.mkdir()
        run_rule(again, rows(), extra=args)
        assert srv.count() == 0
        assert sent > 0


def test_shards_ask_their_own_targets_through_the_shared_cache(tmp_path):
    """With rg4.shards: 2 (patients 1 and 2 apart) the shards ask what one job asks, each for its own
    patients, and write the same files; a re-run of the shards is answered from their shared cache."""
    inputs = write_inputs(tmp_path, rows())
    with RewritingServer(seed=5) as srv:
        whole = run_stage(
            "rg4", inputs, tmp_path / "whole", *rewriter_args(srv.base_url, tmp_path / "a.sqlite")
        )
        sent = srv.count("ok")
        srv.reset_counts()
        shared = rewriter_args(srv.base_url, tmp_path / "b.sqlite")
        merged = run_shards(inputs, tmp_path / "sharded", 2, *shared)
        assert srv.count("ok") == sent > 0
        srv.reset_counts()
        run_shards(inputs, tmp_path / "again", 2, *shared)
        assert srv.count() == 0
    for name in whole.keys() - {"llm_requests"}:
        assert merged[name].read_bytes() == whole[name].read_bytes(), name
    columns = ["study_id", "request_key", "status"]
    requests = [read_table(out["llm_requests"], columns).to_pandas() for out in (whole, merged)]
    assert (
        requests[0].sort_values(columns).values.tolist() == requests[1].sort_values(columns).values.tolist()
    )
