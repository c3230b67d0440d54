# Helpers shared by the rule modules (no rules here): config validation, paths, interpreters.
import sys
from pathlib import Path

from snakemake.utils import validate


validate(config, "../config.schema.yaml")

OUT = Path(config["outdir"])
LOGS = Path("logs")
# The interpreter of the core environment: the one running Snakemake (the Makefile's venv).
PY = sys.executable
# Every module appends its final outputs here; `rule all` asks for them.
ALL_TARGETS = []


def out(*parts):
    """A path under the configured output folder."""
    return str(OUT.joinpath(*parts))


def logfile(rule_name):
    return str(LOGS / f"{rule_name}.log")


def require_path(key, value):
    """A configured input path that must exist; a clear error names the config key."""
    if not value:
        raise ValueError(f"config: `{key}` must be set for corpus.format={config['corpus']['format']}")
    if not Path(value).exists():
        raise FileNotFoundError(f"config: `{key}` points to {value!r}, which does not exist")
    return value


def ingest_inputs(wildcards=None):
    corpus = config["corpus"]
    fmt = corpus["format"]
    keys = ("reports", "split", "metadata") if fmt == "mimic" else ("reports", "projections")
    return {k: require_path(f"corpus.{fmt}.{k}", corpus[fmt][k]) for k in keys}


def ingest_args(wildcards, input):
    """Command-line arguments of `workflow.ingest` for the configured corpus format."""
    return " ".join(f"--{k} {v!r}" for k, v in input.items())


def findings_table(wildcards=None):
    """The standardised findings table every downstream stage (vqa, rg4, exports) reads.

    The rules backend writes it directly; LLM backends replace this with their last follow-up round.
    """
    return out("keyinfo", "rules", "findings.parquet")
