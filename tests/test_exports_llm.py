"""RaDialog's easy-language and reasoning tasks, for real through the LLM layer against the loopback
OpenAI server (tests/openai_server.py): cached, accounted, guarded; absent with the rules backend.

The server's "model" answers the two generation prompts from the report in the request: easy language
lower-cases it behind "In simple words:", reasoning names the diagnoses and quotes the first sentence.
For reports about sternal wires it answers with a conversation marker, which must never reach a record.
Transient 500s are injected on top (the layer retries them).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI  # noqa: E402
from test_exports import big_corpus, run_exports, write_inputs  # noqa: E402
from test_rg4_llm import llm_config  # noqa: E402
from workflow_run import stage_outputs  # noqa: E402

from workflow.exports import llm_tasks  # noqa: E402

pytestmark = pytest.mark.slow


class InstructServer(LoopbackOpenAI):
    def completion(self, body: dict, model: str):
        status, out, outcome = super().completion(body, model)  # keeps the fault injection
        if status != 200 or not isinstance(out, dict):
            return status, out, outcome
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        findings = user.removeprefix("FINDINGS: ")
        if "Sternal wires" in findings:
            content = "ASSISTANT: wires. USER: more?"
        elif "to patients" in system:
            content = "In simple words: " + findings.lower()
        elif "reasoning" in system:
            diagnoses = re.search(r"diagnosis of (.*?)\. Quote", system).group(1)
            content = f"The report supports {diagnoses}: {findings.split('. ')[0]}."
        else:
            return status, out, outcome
        out["choices"][0]["message"]["content"] = content
        return status, out, outcome


def _second_turn(rec):
    return rec["instruction"].rsplit("USER: ", 1)[1].removesuffix(" ASSISTANT:")


def test_llm_tasks_against_loopback_server(tmp_path):
    paths = write_inputs(tmp_path, big_corpus(180))
    cache = tmp_path / "cache.sqlite"
    with InstructServer(faults={"500": 0.3}, seed=3) as srv:
        extra = ("--llm-config", llm_config(srv.base_url), "--llm-cache", str(cache), "--llm-endpoint", "e")
        a = run_exports(paths, tmp_path / "a", *extra)
        assert srv.count("500") > 0 and srv.count("ok") > 0
        summary = json.loads(a["summary"].read_text())
        ins = json.loads(a["radialog_ins"].read_text())
        tasks, stats = summary["radialog_tasks"], summary["radialog_llm_tasks"]
        # part 0 (30 images): easy language; part 1: reasoning for its images with a diagnosis
        easy = [r for r in ins if r["output"].startswith("In simple words: ")]
        reasoning = [r for r in ins if r["output"].startswith("The report supports ")]
        assert tasks["easy_language"] == len(easy) > 0 and tasks["reasoning"] == len(reasoning) > 0
        for r in easy:  # two turns: the RG prompt -> the report, then the task -> the LLM's answer
            assert r["instruction"].count("USER:") == 2
            report = r["instruction"].split("ASSISTANT: ", 1)[1].split("</s>", 1)[0]
            assert r["output"] == "In simple words: " + report.lower()
        for r in reasoning:
            named = re.match(r"The report supports (.*?):", r["output"]).group(1)
            assert named.lower() in _second_turn(r).lower()  # the question names the same diagnoses
        # the marker answers (sternal wires reports) are dropped, counted, never written
        assert not any("USER: more?" in r["output"] for r in ins)
        assert sum(stats["dropped"].values()) > 0
        assert all(k.endswith(":conversation_marker") for k in stats["dropped"])
        assert stats["accepted"] == len(easy) + len(reasoning)
        # accounted: one request per distinct report, tokens counted
        assert stats["requests"] <= stats["jobs"] and stats["prompt_tokens"] > 0
        assert stats["model"] == "student" and stats["endpoint"] == "e"
        card = a["card"].read_text()
        assert "Easy language, reasoning: written by `student` (endpoint `e`)" in card
        assert f"{stats['accepted']:,} of {stats['jobs']:,} jobs accepted" in card
        assert "| easy_language |" in card and "| reasoning |" in card
        # the rules tasks are the same records as without the LLM
        rules_out = run_exports(paths, tmp_path / "rules")
        rules_summary = json.loads(rules_out["summary"].read_text())
        assert rules_summary["radialog_llm_tasks"] == llm_tasks.ABSENT
        assert "easy_language" not in rules_summary["radialog_tasks"]
        rules_ins = json.loads(rules_out["radialog_ins"].read_text())
        added = {json.dumps(r) for r in easy + reasoning}
        assert sorted(json.dumps(r) for r in ins if json.dumps(r) not in added) == sorted(
            json.dumps(r) for r in rules_ins
        )
        # a re-run is answered from the cache: nothing is sent, the files are the same
        srv.reset_counts()
        b = run_exports(paths, tmp_path / "b", *extra)
        assert srv.count() == 0
        assert b["radialog_ins"].read_text() == a["radialog_ins"].read_text()
        assert json.loads(b["summary"].read_text())["radialog_llm_tasks"]["sent"] == 0


def test_credentialed_corpus_refused_for_public_endpoint(tmp_path):
    """The DUA guard of the layer: MIMIC text never goes to the public OpenAI API."""
    paths = write_inputs(tmp_path, big_corpus(30))
    config = json.loads(llm_config("https://api.openai.com/v1"))
    with pytest.raises(Exception, match=r"(?i)public|credentialed|DUA"):
        run_exports(
            paths,
            tmp_path / "x",
            "--llm-config",
            json.dumps(config),
            "--llm-cache",
            str(tmp_path / "c.sqlite"),
            "--llm-endpoint",
            "e",
        )
    assert not stage_outputs("exports", tmp_path / "x")["radialog_ins"].exists()


def test_rule_passes_the_llm_only_with_the_llm_backend():
    import shlex

    config = {"llm": {"backend": "rules"}, "exports": {"radialog": {"llm": {"endpoint": "student"}}}}
    assert llm_tasks.rule_args(config, "{}", "c.sqlite") == ""
    config["llm"]["backend"] = "llm"
    config["exports"]["radialog"]["llm"].update(temperature=0, max_tokens=300)
    args = shlex.split(llm_tasks.rule_args(config, '{"llm": {"a b": 1}}', "out dir/cache.sqlite"))
    assert args == [
        "--llm-config",
        '{"llm": {"a b": 1}}',
        "--llm-cache",
        "out dir/cache.sqlite",
        "--llm-endpoint",
        "student",
        "--temperature",
        "0",
        "--max-tokens",
        "300",
    ]
