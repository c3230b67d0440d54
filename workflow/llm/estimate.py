"""What the LLM stages would send and cost, before anything is sent.

    python -m workflow.llm.estimate [--configfile more.yaml ...] [--keys KEYS.txt]

The configuration is loaded as Snakemake loads it: ``config.yaml`` of the working directory, then each
``--configfile`` on top (merged deeply), validated and filled with the schema's defaults. Reads the
corpus's sections, studies and rules findings (a missing one is named with the ``snakemake`` target that
builds it), builds the gold and bulk key-information requests with the stages' own functions (same
keys, adapter included), checks the cache, and prints requests / cached / to send / tokens / cost per
stage. Follow-up requests depend on how often the LLM and the rules disagree, so they are priced per
1,000 follow-ups. The guard runs too: a credentialed corpus on a public endpoint is reported before any
money or data moves.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import yaml

from workflow import cli
from workflow.llm import accounting
from workflow.llm.findings import report_text
from workflow.llm.followup import followup_request
from workflow.llm.gold import gold_requests
from workflow.llm.guard import GuardError
from workflow.llm.keyinfo import shard_requests
from workflow.llm.run import run_requests
from workflow.llm.stages import load_studies, stage_params
from workflow.tables import Rejects, read_table

SCHEMA = Path(__file__).resolve().parents[2] / "config.schema.yaml"
BASE_CONFIG = "config.yaml"  # the Snakefile's `configfile:` (relative to the working directory)


class MissingInputError(RuntimeError):
    """An input table of the estimate is not built yet (the message names the target)."""


def load_config(paths: list[str], base: str | Path | None = BASE_CONFIG) -> dict:
    """``base`` (the Snakefile's config.yaml) and then ``paths`` merged deeply, as Snakemake does
    (``snakemake.utils.update_config``), validated and filled with the schema's defaults."""
    from snakemake.utils import update_config, validate

    config: dict = {}
    files = ([str(base)] if base and Path(base).exists() else []) + [p for p in paths if p]
    for p in dict.fromkeys(files):  # `--configfile config.yaml x.yaml` loads config.yaml once
        update_config(config, yaml.safe_load(Path(p).read_text()) or {})
    validate(config, str(SCHEMA))
    return config


def input_paths(config: dict, sections=None, studies=None, rules=None) -> dict[str, Path]:
    outdir = Path(config["outdir"])
    paths = {
        "sections": Path(sections or outdir / "sections" / "sections.parquet"),
        "studies": Path(studies or outdir / "ingest" / "studies.parquet"),
        "rules": Path(rules or outdir / "keyinfo" / "rules" / "findings.parquet"),  # gold's strata
    }
    missing = [p for p in paths.values() if not p.exists()]
    if missing:
        raise MissingInputError(
            "estimate: not built yet: "
            + ", ".join(map(str, missing))
            + ". Build it first (no LLM is asked):\n"
            "    snakemake --cores 2 " + " ".join(map(str, missing)) + " --configfile <the same config files>"
        )
    return paths


def planned_requests(config: dict, sections_path, studies_path, rules_path, studies=None) -> dict[str, list]:
    """The gold and bulk keyinfo requests exactly as the stages will build them (request keys included)."""
    studies = load_studies(sections_path, studies_path) if studies is None else studies
    rules = read_table(rules_path).to_pandas()
    _, gold = gold_requests(config, studies, rules)
    cfg, params = stage_params(config, "keyinfo")
    _, bulk = shard_requests(studies, 0, 1, cfg, params, Rejects("estimate"))
    return {"gold": gold, "keyinfo": bulk}


def _followup_sample(config: dict, studies) -> list:
    """Up to a thousand stand-in follow-up questions on real reports (how many the run asks depends on
    the answers)."""
    cfg, params = stage_params(config, "followup")
    previous = json.dumps(
        {
            "findings": [
                {
                    "name": "pleural effusion",
                    "presence": "positive",
                    "location": "left",
                    "level": "mild",
                    "type": None,
                    "change": None,
                    "evidence": "x" * 30,
                }
            ]
            * 3
        }
    )
    rows = [r for r in studies.to_dict("records") if report_text(r)][:1000]
    return [followup_request(r, previous, "pleural effusion", "missed", cfg, params) for r in rows]


def cache_path(config: dict) -> str:
    """The run's response cache (rules/common.smk: llm_cache)."""
    return config["llm"]["cache"] or f"{config['outdir']}/llm/cache.sqlite"


def estimates(config: dict, sections_path, studies_path, rules_path) -> list[tuple[str, object]]:
    studies = load_studies(sections_path, studies_path)
    planned = planned_requests(config, sections_path, studies_path, rules_path, studies)
    cache = cache_path(config)
    out = [(stage, _estimate(reqs, stage_params(config, stage)[0], cache)) for stage, reqs in planned.items()]
    follow = _followup_sample(config, studies)
    est = _estimate(follow, stage_params(config, "followup")[0], None)
    if isinstance(est, accounting.Estimate) and follow:
        k = 1000 / len(follow)
        est = accounting.Estimate(
            1000, 0, 1000, int(est.prompt_tokens * k), int(est.completion_tokens * k), est.cost_usd * k
        )
    out.append(("followup (per 1,000)", est))
    return out


def _estimate(requests, cfg, cache):
    try:
        cfg = copy.deepcopy(cfg)
        if not cache or not Path(cache).exists():  # nothing cached yet; do not create the file
            cache = ":memory:"
        return run_requests(requests, cfg, cache, dry_run=True)
    except GuardError as exc:
        return f"REFUSED by the guard: {exc}"
    except ValueError as exc:
        return f"not configured: {exc}"


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--configfile", nargs="*", default=[], help="overrides on top of config.yaml (as snakemake)"
    )
    p.add_argument("--sections", help="default: <outdir>/sections/sections.parquet")
    p.add_argument("--studies", help="default: <outdir>/ingest/studies.parquet")
    p.add_argument("--rules-findings", help="default: <outdir>/keyinfo/rules/findings.parquet")
    p.add_argument("--keys", help="write the request keys of gold and keyinfo here (one per line)")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    if not args.verbose:  # the table below says it once; the executor's own estimate lines would repeat it
        logging.getLogger("workflow.llm.run").setLevel(logging.WARNING)
    config = load_config(args.configfile)
    try:
        paths = input_paths(config, args.sections, args.studies, args.rules_findings)
    except MissingInputError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    rows = estimates(config, paths["sections"], paths["studies"], paths["rules"])
    total = 0.0
    for stage, est in rows:
        model = config["llm"]["endpoints"][config["llm"][stage.split()[0]]["endpoint"]]["model"]
        print(f"{stage:<22} [{model}] {est if isinstance(est, str) else est.line()}")
        if isinstance(est, accounting.Estimate) and not stage.startswith("followup"):
            total += est.cost_usd
    print(f"{'gold + keyinfo':<22} ~${total:,.2f} (plus follow-ups at the rate above)")
    if args.keys:
        planned = planned_requests(config, paths["sections"], paths["studies"], paths["rules"])
        Path(args.keys).write_text("".join(f"{r.key}\n" for reqs in planned.values() for r in reqs))


if __name__ == "__main__":
    main()
