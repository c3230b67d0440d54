"""The fine-tuning branch through Snakemake: in the DAG only when the student is asked, and end to end
gold (loopback teacher) -> LLaMA-Factory LoRA -> bulk keyinfo on offline vLLM with the adapter ->
standardised round 0, on a small synthetic MIMIC-layout corpus."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workflow.tables import read_table

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI  # noqa: E402
from test_finetune import LF_CLI, LF_PY, OFFLINE_ENV, VLLM_PY, venv_tool  # noqa: E402
from workflow_run import prepare_workdir, run_snakemake  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def workdir_with(tmp_path: Path, override: dict) -> Path:
    return prepare_workdir(tmp_path / "run", override)


def snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: int = 900):
    return run_snakemake(workdir, "--nolock", *args, env=env, timeout=timeout)


def planned_rules(run) -> set[str]:
    return set(re.findall(r"^rule (\w+):", run.stdout, re.MULTILINE))


def corpus_override(corpus: Path, workdir_results: str = "results") -> dict:
    return {
        "corpus": {"format": "mimic", "credentialed": True, "mimic": {
            "reports": str(corpus / "mimic-cxr-reports.zip"), "split": str(corpus / "mimic-cxr-2.0.0-split.csv.gz"),
            "metadata": str(corpus / "mimic-cxr-2.0.0-metadata.csv.gz")}},
        "outdir": workdir_results,
    }  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, "-m", "tools.synth", "--out", str(out), "--studies", "16", "--patients", "8",
                    "--no-tree", "--jobs", "1"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    return out


def test_branch_is_in_the_dag_only_when_an_llm_stage_asks_the_student(corpus, tmp_path):
    teacher = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t", "api_key_env": None}
    cases = {
        "rules backend (demo default)": ({}, False),
        "llm backend, student asked": ({"llm": {"backend": "llm", "endpoints": {"teacher": teacher}}}, True),
        "llm backend, training off": (
            {"llm": {"backend": "llm", "endpoints": {"teacher": teacher}}, "finetune": {"enabled": False}}, False),
        "llm backend, teacher-only run": (
            {"llm": {"backend": "llm", "endpoints": {"teacher": teacher},
                     "keyinfo": {"endpoint": "teacher"}, "followup": {"endpoint": "teacher"}}}, False),
    }  # fmt: skip
    for i, (name, (override, expected)) in enumerate(cases.items()):
        workdir = workdir_with(tmp_path / str(i), {**corpus_override(corpus), **override})
        run = snakemake(workdir, "-n")
        assert run.returncode == 0, (name, run.stderr[-2000:])
        rules = planned_rules(run)
        assert ({"finetune_data", "finetune", "finetune_eval"} <= rules) is expected, (name, sorted(rules))
        assert ("finetune" in rules) is expected, name


@pytest.mark.slow
def test_gold_finetune_bulk_standardise_through_snakemake(corpus, tmp_path):
    for tool in (LF_PY, LF_CLI, VLLM_PY):
        venv_tool(tool)
    tiny = tmp_path / "tiny-llama"
    subprocess.run([str(LF_PY), "-m", "tools.tiny_model", "--out", str(tiny), "--corpus",
                    str(corpus / "mimic-cxr-reports.zip")], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, **OFFLINE_ENV})  # fmt: skip
    with LoopbackOpenAI() as teacher:
        adapter = tmp_path / "run" / "results" / "finetune" / "adapter"
        override = {
            **corpus_override(corpus),
            "llm": {
                "backend": "llm",
                "endpoints": {
                    "teacher": {"kind": "openai", "base_url": teacher.base_url, "model": "teacher",
                                "api_key_env": None, "executor": "openai"},
                    "student": {"kind": "openai", "model": "student", "adapter": "student", "api_key_env": None,
                                "executor": "vllm"},
                },
                "vllm": {"command": [
                    str(VLLM_PY), "-m", "workflow.llm.vllm_offline", "--requests", "{input}", "--output", "{output}",
                    "--model", str(tiny), "--lora", f"{{model}}={adapter}", "--max-model-len", "4096",
                    "--dtype", "float32", "--enforce-eager"]},
                "gold": {"n": 10, "seed": 3},
                "keyinfo": {"shards": 1, "max_tokens": 48},
                "followup": {"rounds": 0},
            },
            "finetune": {
                "base_model": str(tiny), "template": "default", "gpus": 0, "max_steps": 3, "cutoff_len": 2560,
                "precision": "fp32", "deepspeed": None, "learning_rate": 0.02, "per_device_batch_size": 2,
                "gradient_accumulation": 1, "logging_steps": 1, "preprocessing_workers": 1,
                "heldout_fraction": 0.25, "llamafactory_cli": str(LF_CLI),
            },
        }  # fmt: skip
        workdir = workdir_with(tmp_path, override)
        results = workdir / "results"
        # Relative to the working directory, like the configured outdir.
        targets = ["results/llm/followup/round0/findings.parquet", "results/finetune/adapter/loss.tsv"]
        env = {**os.environ, **OFFLINE_ENV}
        run = snakemake(workdir, "--cores", "2", *targets, env=env)
        assert run.returncode == 0, run.stderr[-5000:]
        # Nothing left to do on a second run: no retraining, no engine start.
        again = snakemake(workdir, "-n", *targets, env=env)
        assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[
            -3000:
        ]

    loss = (results / "finetune" / "adapter" / "loss.tsv").read_text().splitlines()
    assert len(loss) == 1 + 3  # header + one line per step
    requests = read_table(results / "llm" / "followup" / "round0" / "requests.parquet").to_pylist()
    rejects = read_table(results / "llm" / "followup" / "round0" / "rejects.parquet").to_pylist()
    studies = read_table(results / "ingest" / "studies.parquet").num_rows
    assert requests and all(
        r["executor"] == "vllm" and r["status"] in ("completed", "unusable") for r in requests
    )
    assert all(r["adapter"] == "student" and r["model"] == "student" for r in requests)
    assert len(requests) + sum(r["reason"] == "no_findings_or_impression" for r in rejects) == studies
    unusable = {r["study_id"] for r in rejects if r["reason"] == "llm_unusable_answer"}
    for r in requests:  # garbage from the random student: a parse failure with its reason, or findings
        assert (r["parse_error"] is not None) == (r["study_id"] in unusable)
    log = (workdir / "results" / "logs" / "finetune.log").read_text()
    assert "System: You read chest X-ray reports" in log and re.search(r"step 3/3 loss \d", log)
