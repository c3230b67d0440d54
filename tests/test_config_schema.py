"""config.yaml and config.schema.yaml say the same thing once: the shipped config is exactly the schema's
defaults (as Snakemake's ``validate(..., set_default=True)`` fills them), it spells out every setting, and
every setting the schema declares is read by the workflow (a key nobody reads is a promise the code does not
keep)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import yaml
from snakemake.utils import validate
from workflow_run import REPO, prepare_workdir, run_snakemake

from workflow.keyinfo import standardise
from workflow.llm import run as llm_run

SCHEMA_PATH = REPO / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())

# Keys read by code that iterates over a section instead of naming each key: (dotted path, where and how).
READ_GENERICALLY = {
    "corpus.mimic.metadata": "rules/common.smk ingest_inputs: every key of corpus.<format> is an input file",
    "corpus.iu.projections": "rules/common.smk ingest_inputs: every key of corpus.<format> is an input file",
}

# Library defaults that stand in for a config key when the code runs outside the workflow (the standalone
# `python -m workflow.keyinfo.vqa_json import` tool, partial configs handed to the LLM executor); the rules
# always pass the configured value, so these only have to agree with the schema.
LIBRARY_DEFAULTS = {
    "keyinfo.fuzzy_cutoff": standardise.DEFAULT_FUZZY_CUTOFF,
    **{f"llm.client.{key}": value for key, value in llm_run.CLIENT_DEFAULTS.items()},
    **{f"llm.batch.{key}": value for key, value in llm_run.BATCH_DEFAULTS.items()},
}


def schema_defaults() -> dict:
    """The configuration Snakemake builds from an empty config file: nothing but the schema's defaults."""
    config: dict = {}
    validate(config, str(SCHEMA_PATH))
    return config


def shipped() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def leaves(node: dict, path: tuple[str, ...] = (), into_maps: bool = True):
    """Dotted paths of the schema's settings. A map of named entries (``llm.endpoints``, ``llm.prices``) is
    ``*``: with ``into_maps`` its entries' fields are leaves, otherwise the map itself is one."""
    props, entries = node.get("properties"), node.get("additionalProperties")
    if props:
        for key, sub in props.items():
            yield from leaves(sub, (*path, key), into_maps)
    elif isinstance(entries, dict):
        if into_maps:
            yield from leaves(entries, (*path, "*"), into_maps)
        else:
            yield ".".join(path)
    else:
        yield ".".join(path)


def differences(a, b, path: str = ""):
    """Dotted paths where two nested configurations differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                yield f"{where} (only in {'config.yaml' if key in a else 'the schema defaults'})"
            else:
                yield from differences(a[key], b[key], where)
    elif a != b:
        yield f"{path}: config.yaml {a!r} != schema default {b!r}"


def lookup(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


def test_config_yaml_holds_exactly_the_schema_defaults():
    filled = shipped()
    validate(filled, str(SCHEMA_PATH))  # fills what config.yaml leaves out (fields of endpoint entries)
    drift = list(differences(filled, schema_defaults()))
    assert not drift, "config.yaml and config.schema.yaml disagree:\n" + "\n".join(drift)


def test_config_yaml_spells_out_every_setting():
    config = shipped()
    missing = []
    for dotted in leaves(SCHEMA, into_maps=False):
        try:
            lookup(config, dotted)
        except (KeyError, TypeError):
            missing.append(dotted)
    assert not missing, f"settings with a schema default but not written in config.yaml: {missing}"


def test_the_differences_helper_names_a_drifted_key():
    """The drift test can fail: a changed default is reported by its dotted path."""
    changed = copy.deepcopy(schema_defaults())
    changed["keyinfo"]["support_cutoff"] = 80
    del changed["llm"]["vllm"]["workdir"]
    assert list(differences(changed, schema_defaults())) == [
        "keyinfo.support_cutoff: config.yaml 80 != schema default 90",
        "llm.vllm.workdir (only in the schema defaults)",
    ]


def _workflow_sources() -> dict[Path, str]:
    files = [
        REPO / "Snakefile",
        *sorted((REPO / "rules").glob("*.smk")),
        *sorted((REPO / "workflow").rglob("*.py")),
    ]
    return {path.relative_to(REPO): path.read_text(encoding="utf-8") for path in files}


def test_every_schema_key_is_read_by_the_workflow():
    """Each setting's name is read somewhere: ``x["key"]``, ``x['key']`` or ``x.get("key")`` in the Snakefile,
    rules/*.smk or workflow/. A name read anywhere counts, so this catches keys whose name nobody reads
    (a shared name such as ``seed`` passes through any of its readers)."""
    sources = _workflow_sources()
    unread = []
    for dotted in leaves(SCHEMA):
        if dotted in READ_GENERICALLY:
            continue
        key = re.escape(dotted.rsplit(".", 1)[-1])
        pattern = re.compile(rf"""\[\s*(['"]){key}\1\s*\]|\.get\(\s*(['"]){key}\2""")
        if not any(pattern.search(text) for text in sources.values()):
            unread.append(dotted)
    assert not unread, f"schema keys nothing reads (wire them or delete them): {unread}"


def test_generic_readers_and_library_defaults_name_real_keys():
    paths = set(leaves(SCHEMA))
    assert set(READ_GENERICALLY) <= paths
    defaults = schema_defaults()
    for dotted, value in LIBRARY_DEFAULTS.items():
        assert dotted in paths
        assert value == lookup(defaults, dotted), f"the library default of {dotted} drifted from the schema"


def test_keyinfo_cutoffs_reach_every_llm_stage_command(tmp_path):
    """keyinfo.fuzzy_cutoff / support_cutoff and llm.retry_unusable set in a user's config are what the LLM
    stages are run with."""
    override = {
        "llm": {
            "backend": "llm",
            "retry_unusable": True,
            "endpoints": {"teacher": {"azure_endpoint": "https://example.openai.azure.com"}},
        },
        "keyinfo": {"fuzzy_cutoff": 77, "support_cutoff": 66},
    }
    workdir = prepare_workdir(tmp_path / "wd", override)
    env = {**os.environ, "AZURE_OPENAI_API_KEY": "unused: no LLM job runs"}
    run = run_snakemake(workdir, "-n", "-p", env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    commands = {
        stage: [line for line in log.splitlines() if f"-m workflow.llm.{stage}" in line]
        for stage in ("gold", "keyinfo shard", "keyinfo merge", "followup")
    }
    assert all(commands.values()), commands
    # each stage reads its settings from a file (not a page of JSON on the command line), written at start
    run = run_snakemake(workdir, "--cores", "1", "results/ingest/studies.parquet", env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    for stage, lines in commands.items():
        name = stage.split()[-1] if stage != "keyinfo shard" else "keyinfo"
        name = "keyinfo" if name == "merge" else name
        settings = workdir / "results" / "llm" / "settings" / f"{name}.json"
        assert all(str(settings.relative_to(workdir)) in line or str(settings) in line for line in lines), (
            stage,
            lines,
        )
        assert json.loads(settings.read_text())["keyinfo"] == {"fuzzy_cutoff": 77, "support_cutoff": 66}
        assert json.loads(settings.read_text())["llm"]["retry_unusable"] is True  # re-ask the unusable ones
