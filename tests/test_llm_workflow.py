"""End to end through Snakemake: gold -> keyinfo shards -> follow-up rounds on the demo corpus, with the
teacher on the Azure URL shape and the student on an OpenAI-compatible URL, both the loopback server."""

from __future__ import annotations

import csv
import gzip
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tools.synth import METADATA_COLUMNS as MIMIC_METADATA_COLUMNS
from workflow.tables import read_table

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import LoopbackOpenAI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
RULE_FILES = ("common", "ingest", "sections", "keyinfo", "llm")


SENTENCES = [
    "Small left pleural effusion.",
    "No pneumothorax.",
    "Moderate cardiomegaly.",
    "Mild pulmonary edema.",
    "Right lower lobe consolidation.",
    "The lungs are clear.",
    "Possible right basal atelectasis.",
    "No focal consolidation.",
    "Heart size is normal.",
]


def tiny_mimic(out: Path, n: int = 40) -> Path:
    """A minimal MIMIC-CXR layout (zip + split + metadata), used only when data/demo is not there."""
    out.mkdir(parents=True)
    split_rows, meta_rows = [], []
    with zipfile.ZipFile(out / "mimic-cxr-reports.zip", "w") as zf:
        for i in range(n):
            subject, study = 10_000_000 + i // 2, 50_000_000 + i
            body = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3))
            impression = "" if i % 4 else " \n IMPRESSION: \n No acute process.\n"
            text = f" FINAL REPORT\n INDICATION: cough.\n \n FINDINGS: \n {body} Exam {i}.\n{impression}"
            zf.writestr(f"files/p{str(subject)[:2]}/p{subject}/s{study}.txt", text)
            dicom = f"{study:08x}-00000000-0000aaaa-1111bbbb-2222cccc"
            split_rows.append([dicom, study, subject, ("train", "validate", "test")[i % 3]])
            meta_rows.append(
                [
                    dicom,
                    subject,
                    study,
                    "CHEST (PA)",
                    "PA",
                    3056,
                    2544,
                    "21800506",
                    "213014.531",
                    "CHEST (PA)",
                    "postero-anterior",
                    "Erect",
                ]
            )
    for name, header, rows in (
        ("split", ["dicom_id", "study_id", "subject_id", "split"], split_rows),
        (
            "metadata",
            MIMIC_METADATA_COLUMNS,
            meta_rows,
        ),
    ):
        with gzip.open(out / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])
    return out


def demo_corpus(tmp_path: Path) -> Path:
    demo = ROOT / "data" / "demo"
    names = ("mimic-cxr-reports.zip", "mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz")
    if not all((demo / n).exists() for n in names):
        return tiny_mimic(tmp_path / "demo")
    copy = tmp_path / "demo"  # a snapshot: the test's re-runs must not see the corpus change under them
    copy.mkdir()
    for n in names:
        shutil.copy(demo / n, copy / n)
    return copy


def snakefile(tmp_path: Path) -> Path:
    """The repository's Snakefile when it wires these rules; else the same rule files, wired here."""
    text = (ROOT / "Snakefile").read_text()
    if all(f'rules/{name}.smk"' in text for name in RULE_FILES):
        return ROOT / "Snakefile"
    missing = [n for n in RULE_FILES if not (ROOT / "rules" / f"{n}.smk").exists()]
    if missing:
        pytest.skip(f"rule files not present yet: {missing}")
    wrapper = tmp_path / "Snakefile"
    includes = "\n".join(f'include: "{ROOT / "rules" / n}.smk"' for n in RULE_FILES)
    wrapper.write_text(
        f'configfile: "config.yaml"\n\n{includes}\n\n\nrule all:\n    default_target: True\n'
        "    input:\n        ALL_TARGETS,\n"
    )
    return wrapper


@pytest.mark.slow
def test_gold_keyinfo_followup_through_snakemake(tmp_path):
    demo = demo_corpus(tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    for shared in ("libs", "prompts", "envs"):  # rules name these relative to the working directory
        if (ROOT / shared).exists():
            (workdir / shared).symlink_to(ROOT / shared)
    with LoopbackOpenAI(faults={"429": 0.05, "500": 0.05}, retry_after=0.01) as srv:
        override = {
            "corpus": {
                "format": "mimic",
                "credentialed": True,
                "mimic": {
                    "reports": str(demo / "mimic-cxr-reports.zip"),
                    "split": str(demo / "mimic-cxr-2.0.0-split.csv.gz"),
                    "metadata": str(demo / "mimic-cxr-2.0.0-metadata.csv.gz"),
                },
            },
            "outdir": str(workdir / "results"),
            "llm": {
                "backend": "llm",
                "endpoints": {
                    "teacher": {
                        "kind": "azure",
                        "azure_endpoint": srv.root_url,
                        "api_version": "2024-10-21",
                        "model": "gpt-4o",
                        "api_key_env": "CXR_TEST_AZURE_KEY",
                        "executor": "openai",
                    },
                    "student": {
                        "kind": "openai",
                        "base_url": srv.base_url,
                        "model": "student",
                        "api_key_env": None,
                        "executor": "openai",
                    },
                },
                "client": {
                    "concurrency": 8,
                    "timeout_s": 10,
                    "backoff_initial_s": 0.01,
                    "backoff_max_s": 0.1,
                },
                "gold": {"n": 12, "seed": 7},
                "keyinfo": {"shards": 2},
                "followup": {"rounds": 2},
            },
        }
        if "finetune:" in (ROOT / "config.yaml").read_text():
            override["finetune"] = {"enabled": False}  # the student is the loopback server: nothing to train
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
        targets = [
            str(workdir / "results" / "llm" / p)
            for p in (
                "gold/findings.parquet",
                "gold/sft.jsonl",
                "followup/round2/findings.parquet",
                "followup/round2/stats.parquet",
            )
        ]
        argv = [
            str(SNAKEMAKE),
            "-s",
            str(snakefile(tmp_path)),
            "--directory",
            str(workdir),
            "--cores",
            "2",
            "--configfile",
            "config.yaml",
            "override.yaml",
            "--nolock",
            *targets,
        ]
        env = {**os.environ, "CXR_TEST_AZURE_KEY": "test-key"}
        run = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        # Progress on the terminal, one line per stage (not only in the logs)
        assert re.search(r"llm keyinfo: \d+/\d+ \(100%\), \d+ failed", run.stdout + run.stderr), run.stdout[
            -3000:
        ]
        sent = srv.count()
        azure_calls = len(srv.azure_calls)

        # A second run of the finished workflow is a no-op: nothing to do, zero requests.
        again = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-4000:]
        assert srv.count() == sent, again.stderr[-6000:]
        # Forcing the LLM rules to run again re-reads the cache: still zero requests.
        forced = subprocess.run(
            argv + ["--forcerun", "llm_gold", "llm_keyinfo_shard", "llm_followup"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert forced.returncode == 0, forced.stderr[-4000:]
        assert srv.count() == sent

        # Re-runs triggered by nothing: the same values in another key order, a repeated default, other
        # client limits (they change how requests travel, not what comes back).
        def with_override(name, values):
            (workdir / name).write_text(yaml.safe_dump(values, sort_keys=False))
            return [name if a == "override.yaml" else a for a in argv]

        same = {k: override[k] for k in reversed(list(override))}
        same["llm"] = {k: same["llm"][k] for k in reversed(list(same["llm"]))}
        same["llm"]["client"] = {**same["llm"]["client"], "concurrency": 3}
        same["llm"]["keyinfo"] = {**same["llm"]["keyinfo"], "temperature": 0}  # the default, repeated
        dry = subprocess.run(
            with_override("same.yaml", same) + ["-n"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]

        # A change of what the follow-ups send re-runs the follow-ups only; with nothing listening at the
        # student's URL the job fails at once, naming the URL and the config key, without printing the config.
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        changed = yaml.safe_load(yaml.safe_dump(override))
        changed["llm"]["followup"]["max_tokens"] = 333
        changed["llm"]["endpoints"]["student"]["base_url"] = f"http://127.0.0.1:{closed}/v1"
        dry = subprocess.run(
            with_override("changed.yaml", changed) + ["-n"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert (
            "llm_followup" in dry.stdout and "llm_gold" not in dry.stdout and "llm_keyinfo" not in dry.stdout
        )
        dead = subprocess.run(
            with_override("changed.yaml", changed),
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        shown = dead.stdout + dead.stderr
        assert dead.returncode != 0 and f"127.0.0.1:{closed}/v1/models" in shown, shown[-4000:]
        assert "llm.endpoints.student.base_url" in shown
        assert "backoff_initial_s" not in shown  # the settings travel in a file, not on the command line
        restored = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert restored.returncode == 0, restored.stderr[-4000:]
        assert srv.count() == sent  # the failed job's outputs are rebuilt from the cache

        # Without the key in the environment the workflow refuses to start (envvars:).
        no_key = {k: v for k, v in env.items() if k != "CXR_TEST_AZURE_KEY"}
        refused = subprocess.run(argv, cwd=workdir, env=no_key, capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and "CXR_TEST_AZURE_KEY" in refused.stderr

    res = workdir / "results" / "llm"
    gold = read_table(res / "gold" / "requests.parquet").to_pandas()
    assert len(gold) == 12 and (gold["model"] == "gpt-4o").all() and azure_calls >= 12
    stats = read_table(res / "followup" / "round2" / "stats.parquet").to_pandas()
    assert stats["round"].tolist() == [0, 1, 2]
    rounds = [read_table(res / "followup" / f"round{r}" / "requests.parquet").to_pandas() for r in (0, 1, 2)]
    assert rounds[0]["stage"].eq("keyinfo").all() and all(r["stage"].eq("followup").all() for r in rounds[1:])
    requests = pd.concat(rounds, ignore_index=True)  # each round holds its own requests only
    assert (requests["status"] == "completed").all()
    assert requests["prompt_hash"].notna().all() and requests["executor"].eq("openai").all()
    findings = read_table(res / "followup" / "round2" / "findings.parquet").to_pandas()
    assert len(findings) and set(findings["request_hash"]) <= set(requests["request_key"])
    studies = set(
        read_table(workdir / "results" / "ingest" / "studies.parquet").column("study_id").to_pylist()
    )
    rejects = read_table(res / "followup" / "round2" / "rejects.parquet").to_pandas()
    # every study answered or rejected with a reason, never both
    assert set(findings["study_id"]) | set(rejects["study_id"]) == studies
    assert not set(findings["study_id"]) & set(rejects["study_id"])
    # Report text stays out of the logs.
    sample_report = read_table(workdir / "results" / "sections" / "sections.parquet").column("findings")
    snippets = [t[:40] for t in sample_report.to_pylist() if t and len(t) > 40][:20]
    logs = "".join(p.read_text() for p in (workdir / "results" / "logs").glob("llm_*.log"))
    assert logs and not any(s in logs for s in snippets)
    assert re.search(r"llm_gold: \d+ studies in", logs)


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
                "rg4": set(),
                "ingest": set(),
            },
        ),
        ({"rg4": {"rewriter": "llm", "llm": {"endpoint": "teacher"}}}, {"rg4": {"llm_teacher"}}),
        # an offline vLLM student is no shared server: its shards take nothing and run side by side
        (
            {
                "llm": {
                    "endpoints": {"student": {"kind": "openai", "model": "student", "executor": "vllm"}},
                    "vllm": {"command": ["true"]},
                }
            },
            {"llm_keyinfo_shard": set(), "llm_followup": set(), "llm_gold": {"llm_teacher"}},
        ),
    ],
)
def test_each_llm_job_takes_only_its_endpoints_resource(tmp_path, override, expected):
    from workflow_run import demo_corpus as demo_section
    from workflow_run import prepare_workdir, run_snakemake

    base = {
        "corpus": demo_section(demo_corpus(tmp_path)),
        "outdir": "results",
        "finetune": {"enabled": False},
        "llm": {
            "backend": "llm",
            "endpoints": {
                "teacher": {
                    "kind": "azure",
                    "azure_endpoint": "https://r.openai.azure.com",
                    "model": "gpt-4o",
                    "api_key_env": "CXR_TEST_AZURE_KEY",
                }
            },
        },
    }
    for key, value in override.items():
        base[key] = (
            {**base.get(key, {}), **value}
            if key != "llm"
            else {
                **base["llm"],
                **value,
                "endpoints": {**base["llm"]["endpoints"], **value.get("endpoints", {})},
            }
        )
    workdir = prepare_workdir(tmp_path / "run", base)
    run = run_snakemake(workdir, "-n", "--cores", "2", env={**os.environ, "CXR_TEST_AZURE_KEY": "k"})
    assert run.returncode == 0, run.stderr[-3000:]
    taken = job_resources(run.stdout)
    for rule, resources in expected.items():
        assert taken[rule] == resources, (rule, taken)
    # every endpoint resource a job takes is capped in both profiles
    for profile in ("default", "slurm"):
        caps = yaml.safe_load((ROOT / "profiles" / profile / "config.yaml").read_text())["resources"]
        assert set().union(*taken.values()) <= set(caps), profile
