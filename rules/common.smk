# Helpers shared by every .smk file (functions and constants only): config validation, paths, interpreters.
import json
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

validate(config, "../config.schema.yaml")

# The folder this workflow ships from (Snakefile, libs/, prompts/, envs/, data/demo/, the `workflow`
# package), wherever Snakemake runs: `--directory`, `-s /path/to/Snakefile` or a `module` import.
# `workflow.basedir` would be the importing workflow's folder; the file being parsed is ours.
WORKFLOW_DIR = Path(str(workflow.current_basedir)).parent

from workflow.configcheck import check as check_config  # noqa: E402
from workflow.llm.guard import check_corpus  # noqa: E402

# What the schema cannot say (files that must exist, endpoints that must be configured), named by key.
check_config(config, shipped=WORKFLOW_DIR)
# A corpus that looks like MIMIC-CXR but is marked credentialed: false needs an explicit confirmation.
check_corpus(config["corpus"])

OUT = Path(config["outdir"])
LOGS = OUT / "logs"  # per outdir: two runs on two outdirs keep their own logs


def packaged(*parts):
    """A file the workflow ships (libs/, prompts/, envs/, data/demo/), as an absolute path."""
    return str(WORKFLOW_DIR.joinpath(*parts))


def env_deployment():
    """True when Snakemake deploys the rules' software (`--sdm conda` / `--sdm apptainer`)."""
    settings = workflow.deployment_settings
    methods = settings.deployment_method if settings is not None else ()
    return DeploymentMethod.CONDA in methods or DeploymentMethod.APPTAINER in methods


def python_command():
    """How every rule starts Python, with the `workflow` package next to this Snakefile importable.

    Under `--sdm conda` / `apptainer` it is the rule's environment's `python` (first on PATH once Snakemake
    activated the rule's `conda:` env); otherwise the interpreter running Snakemake (the Makefile's venv).
    Snakemake clears PYTHONPATH before activating a conda env, so it is set in the command itself.
    """
    interpreter = "python" if env_deployment() else shlex.quote(sys.executable)
    return f"PYTHONPATH={shlex.quote(str(WORKFLOW_DIR))}${{PYTHONPATH:+:$PYTHONPATH}} {interpreter}"


PY = python_command()


def per_attempt(base):
    """A resource (mem_mb, runtime in minutes) that grows with each retry of a failed job.

    The CPU rules' bases are about twice their peak RSS / wall time at MIMIC-CXR scale (227k studies,
    bench/RESULTS.md), so a cluster job fits the first time; `retries:` in profiles/slurm doubles them.
    """
    return lambda wildcards, attempt: base * attempt


# Every module appends its final outputs here; `rule all` asks for them.
ALL_TARGETS = []


def out(*parts):
    """A path under the configured output folder."""
    return str(OUT.joinpath(*parts))


def logfile(rule_name):
    return str(LOGS / f"{rule_name}.log")


def config_path(value):
    """A path from the config: relative to the working directory, or else to the workflow's own folder.

    So the defaults that name shipped files (data/demo/..., libs/..., envs/...) work from any working
    directory, while a file of the same name in the working directory still wins.
    """
    if not value or Path(value).is_absolute() or Path(value).exists():
        return value
    shipped = WORKFLOW_DIR / value
    return str(shipped) if shipped.exists() else value


def require_path(key, value):
    """A configured input path that must exist; a clear error names the config key."""
    if not value:
        raise ValueError(
            f"config: `{key}` must be set for corpus.format={config['corpus']['format']}"
        )
    path = config_path(value)
    if not Path(path).exists():
        raise FileNotFoundError(
            f"config: `{key}` points to {value!r}, which does not exist"
        )
    return path


def ingest_inputs(wildcards=None):
    corpus = config["corpus"]
    fmt = corpus["format"]
    keys = (
        ("reports", "split", "metadata")
        if fmt == "mimic"
        else ("reports", "projections")
    )
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
        return llm_round_table(config["llm"]["followup"]["rounds"], "findings")
    return rules.keyinfo_rules.output.findings


def rg4_scores_args():
    """`--scores-tokenizer` / `--scores-max-length` from rg4.scores (nothing without a tokenizer)."""
    scores = config["rg4"]["scores"]
    if not scores["tokenizer"]:
        return ""
    return f"--scores-tokenizer {shlex.quote(str(scores['tokenizer']))} --scores-max-length {scores['max_length']}"


# --- LLM layer helpers (rules/llm.smk) ---------------------------------------------------------------
def llm_config_json(wildcards=None):
    """What the LLM modules read: the guard flag, the llm section (keys are env var NAMES only) and the
    standardisation / grounding cutoffs their answers go through."""
    return json.dumps(
        {
            "corpus": {"credentialed": config["corpus"]["credentialed"]},
            "llm": config["llm"],
            "keyinfo": keyinfo_cutoffs(),
        },
        sort_keys=True,
    )


def keyinfo_cutoffs():
    """The standardiser's and grounding's rapidfuzz cutoffs (keyinfo section), which every LLM stage reads."""
    return {key: config["keyinfo"][key] for key in ("fuzzy_cutoff", "support_cutoff")}


LLM_STAGES = ("gold", "keyinfo", "followup")


def llm_endpoint_settings(endpoint):
    """What asking `endpoint` reads (workflow.llm.run.load_executor_config): the guard flags, the client,
    batch, vLLM, price and cache settings, and that one endpoint."""
    llm = config["llm"]
    shared = (
        "allow_public_endpoint",
        "allow_proxy",
        "retry_unusable",
        "max_cost_usd",
        "client",
        "batch",
        "vllm",
        "prices",
        "cache",
    )
    return {
        "corpus": {"credentialed": config["corpus"]["credentialed"]},
        "llm": {
            **{k: llm[k] for k in shared},
            "endpoints": {endpoint: llm["endpoints"].get(endpoint)},
        },
    }


def llm_stage_settings(stage):
    """Everything one LLM stage reads (its section, its endpoint, client, batch, prices, guard flags)."""
    settings = llm_endpoint_settings(config["llm"][stage]["endpoint"])
    settings["llm"][stage] = config["llm"][stage]
    settings["keyinfo"] = keyinfo_cutoffs()
    return settings


def llm_settings_file(stage):
    """The stage's settings as a file (the command line names the file, not a page of JSON)."""
    return out("llm", "settings", f"{stage}.json")


def write_llm_settings():
    """Write every LLM stage's settings file (onstart: before any job, also on a cluster's head node)."""
    if config["llm"]["backend"] != "llm":
        return
    for stage in LLM_STAGES:
        path = Path(llm_settings_file(stage))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(llm_stage_settings(stage), sort_keys=True, indent=1))
    # the stages outside rules/llm.smk that ask an endpoint (exports' language tasks) read the whole llm section
    Path(llm_settings_file("all")).write_text(llm_config_json())


def llm_stage_identity(stage):
    """What changes a stage's outputs, in canonical form: the rule's re-run trigger. URLs, keys, client
    limits and the budget change how requests travel, not what comes back: they re-run nothing.
    """
    llm = config["llm"]
    endpoint = llm["endpoints"].get(llm[stage]["endpoint"]) or {}
    model = endpoint.get("model") or ""
    executor = endpoint.get("executor", "openai")
    return json.dumps(
        {
            "stage": llm[stage],
            "keyinfo": keyinfo_cutoffs(),  # the standardiser's and grounding's cutoffs change the rows
            "model": model,
            "adapter": endpoint.get("adapter"),
            "executor": executor,
            "prices": {m: p for m, p in llm["prices"].items() if model.startswith(m)},
            "batch_discount": llm["batch"]["discount"] if executor == "batch" else None,
            # switching it on re-runs the stages: from the cache, sending only the answers recorded unusable
            "retry_unusable": llm["retry_unusable"],
        },
        sort_keys=True,
    )


def llm_conda_env(endpoint):
    """The conda env file of a job asking `endpoint` (relative to the .smk files, as `conda:` wants).

    With `executor: vllm` the job itself runs offline vLLM (llm.vllm.command, e.g. `python -m
    workflow.llm.vllm_offline`), so it needs envs/vllm.yaml, which also holds the LLM layer's own packages.
    """
    settings = config["llm"]["endpoints"].get(endpoint) or {}
    if settings.get("executor") == "vllm":
        return "../envs/vllm.yaml"
    return "../envs/core.yaml"


def rg4_conda_env():
    """rg4 asks its endpoint only with `rewriter: llm`; the rules rewriter needs the core env alone."""
    if config["rg4"]["rewriter"] != "llm":
        return "../envs/core.yaml"
    return llm_conda_env(config["rg4"]["llm"]["endpoint"])


def rg4_llm_args(wildcards=None):
    """rg4's LLM rewriter options: none with the rules rewriter, so no `llm` key re-runs it; with
    `rewriter: llm`, only the settings of its endpoint (sorted keys: override files' order re-runs nothing).
    """
    rg4 = config["rg4"]
    if rg4["rewriter"] != "llm":
        return ""
    settings = json.dumps(llm_endpoint_settings(rg4["llm"]["endpoint"]), sort_keys=True)
    return " ".join(
        shlex.quote(str(arg))
        for arg in (
            "--llm-config",
            settings,
            "--llm-cache",
            llm_cache(),
            "--llm-endpoint",
            rg4["llm"]["endpoint"],
            "--temperature",
            rg4["llm"]["temperature"],
            "--max-tokens",
            rg4["llm"]["max_tokens"],
            "--max-attempts",
            rg4["llm"]["max_attempts"],
        )
    )


def llm_cache(wildcards=None):
    return config["llm"]["cache"] or out("llm", "cache.sqlite")


def _llm_endpoint_envvars():
    if config["llm"]["backend"] != "llm":
        return []
    used = {
        config["llm"][stage]["endpoint"] for stage in ("gold", "keyinfo", "followup")
    }
    endpoints = config["llm"]["endpoints"]
    return sorted(
        {
            endpoints[e]["api_key_env"]
            for e in used
            if e in endpoints and endpoints[e].get("api_key_env")
        }
    )


# API keys the LLM stages need: declared with `envvars:` so Snakemake checks them before running.
LLM_ENVVARS = _llm_endpoint_envvars()


def llm_resources(*endpoints):
    """`llm_<endpoint>: 1` for each endpoint a rule's job talks to (none for a rule that asks no LLM).

    Jobs on different endpoints run side by side; the profiles cap the jobs per endpoint (an endpoint
    the profile does not name is uncapped). An endpoint with the offline `vllm` executor is no shared
    server (each job runs its own engine), so it takes no resource."""
    import re

    served = [
        e
        for e in sorted({e for e in endpoints if e})
        if config["llm"]["endpoints"].get(e, {}).get("executor", "openai") != "vllm"
    ]
    return {"llm_{}".format(re.sub(r"\W", "_", e)): 1 for e in served}


def llm_round_table(round_, name):
    """Output `name` (findings, asked, stats, requests, rejects) of LLM round `round_`, as its rule declares
    it: round 0 is llm_keyinfo_merge, rounds 1.. are llm_followup (called once rules/llm.smk is loaded).
    """
    if int(round_) == 0:
        return getattr(rules.llm_keyinfo_merge.output, name)
    return getattr(rules.llm_followup.output, name).format(round=round_)


def followup_previous(wildcards):
    """The previous round's tables, inputs of follow-up round `wildcards.round`."""
    prev = int(wildcards.round) - 1
    return {
        "previous": llm_round_table(prev, "findings"),
        "previous_asked": llm_round_table(prev, "asked"),
        "previous_stats": llm_round_table(prev, "stats"),
        "previous_rejects": llm_round_table(prev, "rejects"),
        "keyinfo_requests": rules.llm_keyinfo_merge.output.requests,
    }


def llm_targets():
    """Final LLM outputs for `rule all` (none with the rules backend)."""
    if config["llm"]["backend"] != "llm":
        return []
    last = config["llm"]["followup"]["rounds"]
    return [
        rules.llm_gold.output.findings,
        rules.llm_gold.output.sft,
        llm_round_table(last, "findings"),
        llm_round_table(last, "stats"),
    ]


# --- fine-tuning helpers (rules/finetune.smk) --------------------------------------------------------
def student_needed():
    """The finetune branch is in the DAG only when an LLM stage asks the endpoint the student serves."""
    ft = config["finetune"]
    if not ft["enabled"] or config["llm"]["backend"] != "llm":
        return False
    return any(
        config["llm"][stage]["endpoint"] == ft["endpoint"]
        for stage in ("keyinfo", "followup")
    )


def student_inputs(wildcards=None):
    """Extra inputs of the LLM stages that ask the student: its trained adapter (nothing otherwise)."""
    if not student_needed():
        return {}
    return {"student_adapter": rules.finetune.output.adapter}


def first_output_dir(wildcards, output):
    """The folder of a rule's first output (for tools that write a whole folder)."""
    return str(Path(output[0]).parent)


def first_input_dir(wildcards, input):
    """The folder of a rule's first input (for tools that read a whole folder)."""
    return str(Path(input[0]).parent)


def input_dirs(wildcards, input):
    """The folders of a rule's inputs, each once, in input order (the shard folders a merge rule reads)."""
    return list(dict.fromkeys(str(Path(f).parent) for f in input))


# The `finetune:` keys that select the student, split the data or size the SLURM job: train never reads them.
FINETUNE_NOT_TRAINING = (
    "enabled",
    "endpoint",
    "target",
    "heldout_fraction",
    "merge",
    "gpu_model",
)


def finetune_settings(wildcards=None):
    """What workflow.finetune.train reads of the `finetune:` section, as sorted-key JSON, its paths resolved.

    Under `--sdm conda` the rule runs in envs/llamafactory.yaml, whose `llamafactory-cli` is on PATH.
    """
    settings = {
        k: v for k, v in config["finetune"].items() if k not in FINETUNE_NOT_TRAINING
    }
    settings["deepspeed"] = config_path(settings["deepspeed"])
    if env_deployment():
        settings["llamafactory_cli"] = "llamafactory-cli"
    else:
        settings["llamafactory_cli"] = config_path(settings["llamafactory_cli"])
    return json.dumps(settings, sort_keys=True)


def finetune_targets():
    """Final fine-tuning outputs for `rule all` (none unless an LLM stage asks the student)."""
    if not student_needed():
        return []
    targets = [rules.finetune.output.adapter, rules.finetune_eval.output.table]
    if config["finetune"]["merge"]:
        targets.append(rules.finetune_merge.output.merged)
    return targets


# --- the Snakemake report (rules/report.smk) ---------------------------------------------------------
def report_stages():
    """(stage, input table, output table, rejects table) of each stage, for the report's counts.

    Paths come from the stages' own rules (called at DAG time, when every rule module is loaded).
    """
    studies, sections = rules.ingest.output.studies, rules.sections.output.sections
    keyinfo = (
        # the last round's rejects go with its findings: every study is in exactly one of them
        (
            "keyinfo (llm)",
            sections,
            findings_table(),
            llm_round_table(config["llm"]["followup"]["rounds"], "rejects"),
        )
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
    files = {
        f"{i}_{kind}": path
        for i, stage in enumerate(report_stages())
        for kind, path in zip(("in", "out", "rejects"), stage[1:])
        if path
    }
    files.update(
        findings=findings_table(),
        questions=rules.vqa.output.questions,
        vqa_stats=rules.vqa.output.stats,
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
    return [
        rules.llm_gold.output.requests,
        *(llm_round_table(r, "requests") for r in rounds),
        rules.rg4.output.llm_requests,
        rules.exports.output.llm_requests,
    ]


# --- release folders with dataset cards (rules/release.smk) ------------------------------------------
def corpus_is_demo():
    """The embedded synthetic demo (its cards say so instead of quoting a data-use agreement)."""
    corpus = config["corpus"]
    reports = corpus[corpus["format"]]["reports"] or ""
    demo = (WORKFLOW_DIR / "data" / "demo").resolve()
    return Path(config_path(reports)).resolve().is_relative_to(demo)


def release_args(wildcards, input):
    """`--table CONFIG=PATH` arguments of workflow.cards for a release's tables."""
    return " ".join(f"--table {name}={path}" for name, path in input.items())


def card_config(spec):
    """The configuration a release card quotes (its spec's sections and facts), as sorted-key JSON: only a
    change to those keys re-runs the release."""
    from workflow import cards

    return json.dumps(
        cards.quoted_config(config, cards.load_spec(spec)), sort_keys=True
    )


# --- vqa helpers (rules/vqa.smk) ---------------------------------------------------------------------
def vqa_templates_path():
    """`vqa.templates` (null: the style's own file), checked at start-up: a bad file stops the run here."""
    from workflow.vqa import libs as vqa

    path = config_path(config["vqa"]["templates"]) or str(
        vqa.STYLE_TEMPLATES[config["vqa"]["style"]]
    )
    vqa.load_templates(path, key="vqa.templates")
    return path


def vqa_names_path():
    """`vqa.names`, checked at start-up: a misspelt path fails instead of quietly using canonical names."""
    from workflow.vqa import libs as vqa

    path = config_path(config["vqa"]["names"])
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
        **{
            scenario: getattr(rules.rg4.output, scenario)
            for scenario in ("sn", "sw", "mn", "mw")
        },
    }
    if (
        config["llm"]["backend"] == "llm"
    ):  # the teacher's and the rules' readings side by side
        files["rules_findings"] = rules.keyinfo_rules.output.findings
    if config["review"]["exclude"]:
        files["exclude"] = require_path("review.exclude", config["review"]["exclude"])
    return files


def review_args(wildcards, input):
    """Arguments of workflow.review.build besides the fixed tables: RG4 tables, optional files, corpus."""
    args = [
        f"--rg4 {s}={shlex.quote(str(getattr(input, s)))}"
        for s in ("sn", "sw", "mn", "mw")
    ]
    for key in ("rules_findings", "exclude"):
        if key in input.keys():
            args.append(
                f"--{key.replace('_', '-')} {shlex.quote(str(getattr(input, key)))}"
            )
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
        raise ValueError(
            "config: `review.verdicts` must list the verdicts.csv files to score"
        )
    return [require_path("review.verdicts", p) for p in paths]
