"""What the LLM stages would send and cost, before anything is sent.

    python -m workflow.llm.estimate [--configfile config.yaml [more.yaml ...]]

Reads the configured corpus's sections (run ``snakemake <outdir>/sections/sections.parquet`` first),
builds the gold and bulk key-information requests exactly as the stages will, checks the cache, and
prints requests / cached / to send / tokens / cost per stage. Follow-up requests depend on how often the
LLM and the rules disagree, so they are priced per 1,000 follow-ups. The guard runs too: a credentialed
corpus on a public endpoint is reported before any money or data moves.
"""

from __future__ import annotations

import copy
import json

import yaml

from workflow import cli
from workflow.llm import accounting, build_request
from workflow.llm.answers import FINDINGS_SCHEMA, FOLLOWUP_SCHEMA
from workflow.llm.findings import report_text
from workflow.llm.gold import read_exclusion, select_gold
from workflow.llm.guard import GuardError
from workflow.llm.run import run_requests
from workflow.llm.stages import load_studies, stage_params
from workflow.tables import read_table


def load_config(paths: list[str]) -> dict:
    """config.yaml (+ overrides, merged deeply), validated and filled with the schema's defaults."""
    from pathlib import Path

    from snakemake.utils import validate

    def merge(base, extra):
        for k, v in extra.items():
            base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    config: dict = {}
    for p in paths:
        config = merge(config, yaml.safe_load(Path(p).read_text()) or {})
    validate(config, str(Path(__file__).resolve().parents[2] / "config.schema.yaml"))
    return config


def estimates(config: dict, sections_path, studies_path, rules_path=None) -> list[tuple[str, object]]:
    cache = config["llm"]["cache"] or f"{config['outdir']}/llm/cache.sqlite"
    studies = load_studies(sections_path, studies_path)
    texts = {int(r["study_id"]): report_text(r) for r in studies.to_dict("records")}
    out = []
    cfg, params = stage_params(config, "gold")
    rules = read_table(rules_path).to_pandas() if rules_path else None
    g = config["llm"]["gold"]
    sample = select_gold(studies, rules, int(g["n"]), int(g["seed"]), read_exclusion(g.get("exclude")))
    gold = [build_request("keyinfo.j2", cfg["model"], params, FINDINGS_SCHEMA, report=texts[int(s)])
            for s in sample["study_id"]]
    out.append(("gold", _estimate(gold, cfg, cache)))
    cfg, params = stage_params(config, "keyinfo")
    bulk = [build_request("keyinfo.j2", cfg["model"], params, FINDINGS_SCHEMA, report=t)
            for t in texts.values() if t]
    out.append(("keyinfo", _estimate(bulk, cfg, cache)))
    cfg, params = stage_params(config, "followup")
    sample_texts = [t for t in texts.values() if t][:1000]
    previous = json.dumps({"findings": [{"name": "pleural effusion", "presence": "positive", "location": "left",
                                         "level": "mild", "type": None, "change": None, "evidence": "x" * 30}] * 3})
    follow = [build_request("followup.j2", cfg["model"], params, FOLLOWUP_SCHEMA, report=t, previous=previous,
                            finding="pleural effusion", reason="missed") for t in sample_texts]
    est = _estimate(follow, cfg, None)
    if isinstance(est, accounting.Estimate) and follow:
        k = 1000 / len(follow)
        est = accounting.Estimate(1000, 0, 1000, int(est.prompt_tokens * k), int(est.completion_tokens * k),
                                  est.cost_usd * k)
    out.append(("followup (per 1,000)", est))
    return out


def _estimate(requests, cfg, cache):
    try:
        cfg = copy.deepcopy(cfg)
        return run_requests(requests, cfg, cache or ":memory:", dry_run=True)
    except GuardError as exc:
        return f"REFUSED by the guard: {exc}"
    except ValueError as exc:
        return f"not configured: {exc}"


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--configfile", nargs="+", default=["config.yaml"])
    p.add_argument("--sections", help="default: <outdir>/sections/sections.parquet")
    p.add_argument("--studies", help="default: <outdir>/ingest/studies.parquet")
    p.add_argument("--rules-findings", help="default: <outdir>/keyinfo/rules/findings.parquet if it exists")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    from pathlib import Path

    config = load_config(args.configfile)
    outdir = Path(config["outdir"])
    rules = args.rules_findings or outdir / "keyinfo" / "rules" / "findings.parquet"
    rows = estimates(config, args.sections or outdir / "sections" / "sections.parquet",
                     args.studies or outdir / "ingest" / "studies.parquet", rules if Path(rules).exists() else None)
    for stage, est in rows:
        model = config["llm"]["endpoints"][config["llm"][stage.split()[0]]["endpoint"]]["model"]
        print(f"{stage:<22} [{model}] {est if isinstance(est, str) else est.line()}")


if __name__ == "__main__":
    main()
