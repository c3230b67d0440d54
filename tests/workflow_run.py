"""Run the repository's Snakefile in a scratch working directory, so tests never write into the repo.

The named test configurations (`.test/<name>/config.yaml`, overlays on the shipped config.yaml) run the way
the README shows: `snakemake --cores 2 --configfile .test/<name>/config.yaml --directory <scratch>`
(:func:`run_named_config`). Otherwise:
`libs/`, `prompts/`, `envs/`, `data/` and `profiles/` are linked in so tests and their overrides can name
them relatively (the workflow itself finds them next to its Snakefile: tests/test_deployment.py runs it from
a bare directory); `config.yaml` is copied and an optional `override.yaml` layered on top of it.
"""

from __future__ import annotations

import ast
import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
LINKED = ("libs", "prompts", "envs", "data", "profiles")
TEST_CONFIGS = REPO / ".test"
LOCAL_OVERLAY = "local.yaml"


def demo_corpus(corpus: Path = DEMO) -> dict:
    """The `corpus:` config section of a MIMIC-layout corpus folder (default: the committed demo)."""
    return {
        "format": "mimic",
        "credentialed": True,
        "mimic": {
            "reports": str(corpus / "mimic-cxr-reports.zip"),
            "split": str(corpus / "mimic-cxr-2.0.0-split.csv.gz"),
            "metadata": str(corpus / "mimic-cxr-2.0.0-metadata.csv.gz"),
        },
    }


def prepare_workdir(workdir: Path, override: dict | None = None) -> Path:
    """A working directory with the default config (plus `override.yaml` when given) and the linked folders."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config.yaml", workdir / "config.yaml")
    for name in LINKED:
        if not (workdir / name).exists():
            (workdir / name).symlink_to(REPO / name)
    if override is not None:
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    return workdir


def run_snakemake(
    workdir: Path,
    *args: str,
    snakefile: Path = REPO / "Snakefile",
    env: dict | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in ``workdir`` with its config files; returns the finished process (never raises)."""
    configfiles = ["config.yaml"] + (["override.yaml"] if (workdir / "override.yaml").exists() else [])
    argv = [SNAKEMAKE, "-s", str(snakefile), "--directory", str(workdir), *args, "--configfile", *configfiles]
    return subprocess.run(
        argv, cwd=workdir, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout
    )


def named_config(name: str) -> Path:
    """`.test/<name>/config.yaml`, one of the named test configurations."""
    path = TEST_CONFIGS / name / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no test configuration {path}")
    return path


def run_named_config(
    name: str,
    workdir: Path,
    *args: str,
    local: dict | None = None,
    env: dict | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """`snakemake ARGS --configfile .test/NAME/config.yaml [local.yaml] --directory WORKDIR`, from a bare
    working directory (the workflow finds its libs/, prompts/ and demo data next to its Snakefile).

    ``local`` holds what only the machine running the test knows (a server's port, where a corpus is), as
    ``WORKDIR/local.yaml`` layered last; later calls on the same working directory (a re-run, the report)
    reuse it, so they see the run's configuration.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if local is not None:
        (workdir / LOCAL_OVERLAY).write_text(yaml.safe_dump(local))
    overlays = [str(named_config(name))]
    if (workdir / LOCAL_OVERLAY).exists():
        overlays.append(LOCAL_OVERLAY)
    return run_with_configfiles(workdir, overlays, *args, env=env, timeout=timeout)


def run_with_configfiles(
    workdir: Path, configfiles: list[str], *args: str, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`snakemake ARGS --configfile CONFIGFILES...` in ``workdir`` (the shipped config.yaml underneath)."""
    argv = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(
        [*argv, "--configfile", *configfiles],
        cwd=workdir,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def landing_text(report_html: str) -> str:
    """The landing page of a `snakemake --report` HTML file (the rendered `report:` text), tags removed
    and whitespace collapsed."""
    desc = re.search(r'var workflow_desc = ("(?:[^"\\]|\\.)*");', report_html)
    if desc is None:
        raise AssertionError("the report has no landing text (workflow_desc)")
    return " ".join(re.sub(r"<[^>]+>", "", json.loads(desc.group(1))).split())


def embedded_file(report_html: str, name: str) -> str:
    """The text of an HTML file a self-contained `snakemake --report` file embeds (base64 in a data: URI)."""
    uri = re.search(
        rf"data:text/html;charset=utf8;filename={re.escape(name)};base64,([A-Za-z0-9+/=]+)", report_html
    )
    if uri is None:
        raise AssertionError(f"the report embeds no {name}")
    return base64.b64decode(uri.group(1)).decode()


_OUTPUT_LINE = re.compile(r"^\s+(\w+)=out\((.*)\),?$")


def rule_outputs(rule: str, outdir: Path, smk: str | None = None) -> dict[str, Path]:
    """The outputs ``rules/<rule>.smk`` (or ``rules/<smk>.smk``) declares, by name, as paths under ``outdir``
    (the configured `outdir`): the file names live in the rule only."""
    text = (REPO / "rules" / f"{smk or rule}.smk").read_text()
    block = re.search(rf"^rule {rule}:\n(?:.*\n)*?    output:\n((?:        .*\n)+)", text, re.MULTILINE)
    if block is None:
        raise ValueError(f"rules/{rule}.smk: no output block for rule {rule}")
    outputs = {}
    for line in block.group(1).splitlines():
        if line.strip().startswith("#"):
            continue
        m = _OUTPUT_LINE.match(line)
        if m is None:
            raise ValueError(f"rules/{rule}.smk: output line not of the form name=out(...): {line.strip()}")
        outputs[m.group(1)] = outdir.joinpath(*ast.literal_eval(f"({m.group(2)},)"))
    return outputs


# the rules whose outputs one stage's module writes in one process (`python -m workflow.rg4` unsharded); the
# workflow splits them so that what waits on one part starts before the other is written
STAGE_RULES = {"rg4": ("rg4", "rg4_loader"), "exports": ("exports_r2gen", "exports_radialog", "exports")}


def stage_outputs(stage: str, outdir: Path) -> dict[str, Path]:
    """The outputs of the rules of ``rules/<stage>.smk`` that one run of the stage's module writes, by name."""
    return {
        name: path
        for rule in STAGE_RULES.get(stage, (stage,))
        for name, path in rule_outputs(rule, outdir, stage).items()
    }


def run_stage(rule: str, inputs: Mapping[str, Path], outdir: Path, *options: str) -> dict[str, Path]:
    """Run the stage of ``rules/<rule>.smk`` in this process the way its shell line does: the path flags
    from the rule's input names (``inputs``) and output names (under ``outdir``, see :func:`stage_outputs`),
    then ``options``. Returns the output paths by name."""
    stage = importlib.import_module(f"workflow.{rule}.build")
    outputs = stage_outputs(rule, outdir)
    stage.main([*stage.rule_args({**inputs, **outputs}), *options])
    return outputs
