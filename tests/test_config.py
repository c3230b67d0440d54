"""Bad configurations fail at start-up naming the key (config.schema.yaml through Snakemake's validate,
then workflow.configcheck), instead of being accepted silently."""

from __future__ import annotations

import copy

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from workflow_run import REPO, prepare_workdir, run_snakemake

from workflow import configcheck

SCHEMA = str(REPO / "config.schema.yaml")


@pytest.fixture
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_the_shipped_config_is_valid(config):
    validate(config, SCHEMA)
    configcheck.check(config, REPO)


# (how to break it, a fragment the error must contain)
SCHEMA_CASES = {
    "endpoint client key": (
        lambda c: c["llm"]["endpoints"]["student"].update(client={"concurency": 4}),
        "'concurency' was unexpected",
    ),
    "endpoint client value": (
        lambda c: c["llm"]["endpoints"]["student"].update(client={"timeout_s": 0}),
        "timeout_s",
    ),
    "price field misspelt": (
        lambda c: c["llm"]["prices"].update({"gpt-4o": {"inptu": 2.5, "output": 10.0}}),
        "'inptu' was unexpected",
    ),
    "price field missing": (lambda c: c["llm"]["prices"].update({"gpt-4o": {"input": 2.5}}), "'output'"),
    "outdir empty": (lambda c: c.update(outdir=""), "outdir"),
    "outdir blank": (lambda c: c.update(outdir="  "), "outdir"),
    "api key pasted instead of its variable name": (
        lambda c: c["llm"]["endpoints"]["teacher"].update(api_key_env="sk-abc123 def"),
        "api_key_env",
    ),
    "ingest cap": (lambda c: c.update(ingest={"max_report_bytes": 0}), "max_report_bytes"),
    "ingest unknown key": (
        lambda c: c.update(ingest={"max_report_byte": 10}),
        "'max_report_byte' was unexpected",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_refuses_and_names_the_key(config, case):
    breaks, fragment = SCHEMA_CASES[case]
    bad = copy.deepcopy(config)
    breaks(bad)
    with pytest.raises(WorkflowError) as err:
        validate(bad, SCHEMA)
    assert fragment in str(err.value)


def test_endpoint_client_gets_no_defaults_so_llm_client_applies(config):
    validate(config, SCHEMA)
    assert config["llm"]["endpoints"]["student"]["client"] == {}  # nothing that would override llm.client


CHECK_CASES = {
    "vqa names missing": (lambda c: c["vqa"].update(names="libs/no_such_findings.csv"), "`vqa.names`"),
    "vqa templates missing": (lambda c: c["vqa"].update(templates="libs/nope.yaml"), "`vqa.templates`"),
    "gold exclude missing": (lambda c: c["llm"]["gold"].update(exclude="exclude.txt"), "`llm.gold.exclude`"),
    "outdir is the working directory": (lambda c: c.update(outdir="./"), "`outdir`"),
    "stage names an unknown endpoint": (
        lambda c: (c["llm"].update(backend="llm"), c["llm"]["keyinfo"].update(endpoint="studnet")),
        "`llm.keyinfo.endpoint` names the endpoint 'studnet'",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_start_up_checks_name_the_key(config, case):
    breaks, fragment = CHECK_CASES[case]
    bad = copy.deepcopy(config)
    breaks(bad)
    validate(bad, SCHEMA)  # the schema has nothing against it
    with pytest.raises(configcheck.ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        configcheck.check(bad, REPO)


def test_vqa_names_null_means_canonical_names_and_is_fine(config):
    config["vqa"]["names"] = None
    configcheck.check(config, REPO)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"vqa": {"names": "libs/missing.csv"}}, "`vqa.names` points to 'libs/missing.csv'"),
        ({"outdir": ""}, "outdir"),
        (
            {"llm": {"endpoints": {"student": {"kind": "openai", "model": "s", "client": {"rmp": 5}}}}},
            "'rmp'",
        ),
    ],
)
def test_snakemake_stops_at_start_up_naming_the_key(tmp_path, override, fragment):
    workdir = prepare_workdir(tmp_path / "wd", override)
    proc = run_snakemake(workdir, "-n", "--quiet", timeout=300)
    assert proc.returncode != 0
    assert fragment in proc.stderr + proc.stdout
    assert not (workdir / "ingest").exists() and not (workdir / "results").exists()
