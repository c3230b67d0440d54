# Helpers shared by every .smk file (functions and constants only): config validation, paths, interpreters.
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate


validate(config, "../config.schema.yaml")

from workflow.configcheck import check as check_config  # noqa: E402
from workflow.llm.guard import check_corpus  # noqa: E402

# What the schema cannot say (files that must exist, endpoints that must be configured), named by key.
check_config(config)
# A corpus that looks like MIMIC-CXR but is marked credentialed: false needs an explicit confirmation.
check_corpus(config["corpus"])

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
    return " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in input.items())


def findings_table(wildcards=None):
    """The standardised findings table every downstream stage (vqa, rg4, exports) reads.

    The rules backend writes it directly; with `llm.backend: llm` it is the last follow-up round
    (round 0 is the bulk LLM extraction; see rules/llm.smk).
    """
    if config["llm"]["backend"] == "llm":
        return out("llm", "followup", f"round{config['llm']['followup']['rounds']}", "findings.parquet")
    return out("keyinfo", "rules", "findings.parquet")


# --- LLM layer helpers (rules/llm.smk) ---------------------------------------------------------------
def llm_config_json(wildcards=None):
    """What the LLM modules read: the guard flag, the llm section (keys are env var NAMES only) and the
    standardisation / grounding cutoffs their answers go through."""
    import json

    keyinfo = {key: config["keyinfo"][key] for key in ("fuzzy_cutoff", "support_cutoff")}
    return json.dumps(
        {"corpus": {"credentialed": config["corpus"]["credentialed"]}, "llm": config["llm"], "keyinfo": keyinfo}
    )


def llm_cache(wildcards=None):
    return config["llm"]["cache"] or out("llm", "cache.sqlite")


def _llm_endpoint_envvars():
    if config["llm"]["backend"] != "llm":
        return []
    used = {config["llm"][stage]["endpoint"] for stage in ("gold", "keyinfo", "followup")}
    endpoints = config["llm"]["endpoints"]
    return sorted({endpoints[e]["api_key_env"] for e in used if e in endpoints and endpoints[e].get("api_key_env")})


# API keys the LLM stages need: declared with `envvars:` so Snakemake checks them before running.
LLM_ENVVARS = _llm_endpoint_envvars()


def llm_round_dir(round_, name):
    return out("llm", "followup", f"round{round_}", name)


def followup_previous(wildcards):
    """The previous round's tables, inputs of follow-up round `wildcards.round`."""
    prev = int(wildcards.round) - 1
    return {
        "previous": llm_round_dir(prev, "findings.parquet"),
        "previous_asked": llm_round_dir(prev, "asked.parquet"),
        "previous_stats": llm_round_dir(prev, "stats.parquet"),
        "previous_requests": llm_round_dir(prev, "requests.parquet"),
    }


def llm_targets():
    """Final LLM outputs for `rule all` (none with the rules backend)."""
    if config["llm"]["backend"] != "llm":
        return []
    last = config["llm"]["followup"]["rounds"]
    return [
        out("llm", "gold", "findings.parquet"),
        out("llm", "gold", "sft.jsonl"),
        llm_round_dir(last, "findings.parquet"),
        llm_round_dir(last, "stats.parquet"),
    ]


# --- fine-tuning helpers (rules/finetune.smk) --------------------------------------------------------
def student_needed():
    """The finetune branch is in the DAG only when an LLM stage asks the endpoint the student serves."""
    ft = config["finetune"]
    if not ft["enabled"] or config["llm"]["backend"] != "llm":
        return False
    return any(config["llm"][stage]["endpoint"] == ft["endpoint"] for stage in ("keyinfo", "followup"))


def student_inputs(wildcards=None):
    """Extra inputs of the LLM stages that ask the student: its trained adapter (nothing otherwise)."""
    if not student_needed():
        return {}
    return {"student_adapter": out("finetune", "adapter", "adapter_config.json")}


def first_output_dir(wildcards, output):
    """The folder of a rule's first output (for tools that write a whole folder)."""
    return str(Path(output[0]).parent)


def first_input_dir(wildcards, input):
    """The folder of a rule's first input (for tools that read a whole folder)."""
    return str(Path(input[0]).parent)


def finetune_settings(wildcards=None):
    """The `finetune:` config section as JSON (what workflow.finetune.train reads)."""
    import json

    return json.dumps(config["finetune"])


def finetune_targets():
    """Final fine-tuning outputs for `rule all` (none unless an LLM stage asks the student)."""
    if not student_needed():
        return []
    targets = [out("finetune", "adapter", "adapter_config.json"), out("finetune", "eval.parquet")]
    if config["finetune"]["merge"]:
        targets.append(out("finetune", "merged", "config.json"))
    return targets


# --- the Snakemake report (rules/report.smk) ---------------------------------------------------------
def report_stages():
    """(stage, input table, output table, rejects table) of each stage, for the report's counts.

    Paths come from the stages' own rules (called at DAG time, when every rule module is loaded)."""
    studies, sections = rules.ingest.output.studies, rules.sections.output.sections
    keyinfo = (
        ("keyinfo (llm)", sections, findings_table(), rules.llm_keyinfo_merge.output.rejects)
        if config["llm"]["backend"] == "llm"
        else ("keyinfo (rules)", sections, None, rules.keyinfo_rules.output.rejects)
    )
    return [
        ("ingest", None, studies, rules.ingest.output.rejects),
        ("sections", studies, sections, rules.sections.output.rejects),
        keyinfo,
        ("vqa", studies, rules.vqa.output.questions, rules.vqa.output.rejects),
        ("rg4", sections, None, rules.rg4.output.rejects),
        ("exports", sections, None, rules.exports.output.rejects),
    ]


def report_inputs(wildcards=None):
    files = {f"{i}_{kind}": path for i, stage in enumerate(report_stages())
             for kind, path in zip(("in", "out", "rejects"), stage[1:]) if path}
    files.update(
        findings=findings_table(),
        questions=rules.vqa.output.questions,
        rg4_counts=rules.rg4.output.counts,
        rg4_stats=rules.rg4.output.stats,
    )
    return files


def report_stage_args(wildcards, input):
    """`--stage NAME=INPUT,OUTPUT,REJECTS` arguments (an empty field is derived by workflow.report)."""
    import shlex

    args = []
    for name, *paths in report_stages():
        fields = ",".join(p or "" for p in paths)
        args.append(f"--stage {shlex.quote(f'{name}={fields}')}")
    return " ".join(args)


def llm_report_requests():
    """Every LLM_REQUESTS table of the run (LLM backend only)."""
    rounds = range(config["llm"]["followup"]["rounds"] + 1)
    return [out("llm", "gold", "requests.parquet"), *(llm_round_dir(r, "requests.parquet") for r in rounds)]


# --- release folders with dataset cards (rules/release.smk) ------------------------------------------
def corpus_is_demo():
    """The embedded synthetic demo (its cards say so instead of quoting a data-use agreement)."""
    corpus = config["corpus"]
    reports = corpus[corpus["format"]]["reports"] or ""
    return Path(reports).resolve().is_relative_to(Path("data/demo").resolve())


def release_args(wildcards, input):
    """`--table CONFIG=PATH` arguments of workflow.cards for a release's tables."""
    return " ".join(f"--table {name}={path}" for name, path in input.items())


def effective_config(wildcards=None):
    """The run's configuration after defaults and overrides, as JSON (quoted in dataset cards)."""
    import json

    return json.dumps(config)


# --- vqa helpers (rules/vqa.smk) ---------------------------------------------------------------------
def vqa_templates_path():
    """`vqa.templates` (null: the style's own file), checked at start-up: a bad file stops the run here."""
    from workflow import vqa

    path = config["vqa"]["templates"] or str(vqa.STYLE_TEMPLATES[config["vqa"]["style"]].relative_to(vqa.REPO))
    vqa.load_templates(path, key="vqa.templates")
    return path


def vqa_names_path():
    """`vqa.names`, checked at start-up: a misspelt path fails instead of quietly using canonical names."""
    from workflow import vqa

    path = config["vqa"]["names"]
    if path:
        vqa.read_name_lib(path, key="vqa.names")
    return path or "None"


# --- the clinicians' review (rules/review.smk) ------------------------------------------------------
def review_inputs(wildcards=None):
    """The review page's tables: sections, images, findings, questions, the four RG4 scenarios (+ extras)."""
    files = {
        "sections": rules.sections.output.sections,
        "images": rules.ingest.output.images,
        "findings": findings_table(),
        "questions": rules.vqa.output.questions,
        **{scenario: getattr(rules.rg4.output, scenario) for scenario in ("sn", "sw", "mn", "mw")},
    }
    if config["llm"]["backend"] == "llm":  # the teacher's and the rules' readings side by side
        files["rules_findings"] = rules.keyinfo_rules.output.findings
    if config["review"]["exclude"]:
        files["exclude"] = require_path("review.exclude", config["review"]["exclude"])
    return files


def review_args(wildcards, input):
    """Arguments of workflow.review.build besides the fixed tables: RG4 tables, optional files, corpus."""
    args = [f"--rg4 {s}={shlex.quote(str(getattr(input, s)))}" for s in ("sn", "sw", "mn", "mw")]
    for key in ("rules_findings", "exclude"):
        if key in input.keys():
            args.append(f"--{key.replace('_', '-')} {shlex.quote(str(getattr(input, key)))}")
    corpus = config["corpus"]
    reports = corpus[corpus["format"]]["reports"]
    args.append(f"--corpus-format {corpus['format']}")
    if reports:
        args.append(f"--corpus-reports {shlex.quote(str(reports))}")
    if corpus_is_demo():
        args.append("--demo")
    return " ".join(args)


def review_verdicts(wildcards=None):
    """The verdicts.csv files `review_score` reads (config `review.verdicts`), checked only when asked for."""
    paths = config["review"]["verdicts"]
    if not paths:
        raise ValueError("config: `review.verdicts` must list the verdicts.csv files to score")
    return [require_path("review.verdicts", p) for p in paths]
