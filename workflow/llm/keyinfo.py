"""Bulk key-information extraction by the LLM over every study, in shards.

``shard``: the studies with ``study_id % shards == shard`` are asked (one request each, through the
cache), answers parsed and standardised. ``merge``: the shards become round 0 of the follow-up chain
(``<outdir>/llm/followup/round0/``).
"""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa

from workflow import cli
from workflow.contract import (
    AUDIT,
    FINDINGS,
    LLM_FOLLOWUP_STATS,
    LLM_REQUESTS,
    REJECTS,
    UNKNOWN_TERMS,
    findings_table,
)
from workflow.keyinfo.standardise import unknown_terms
from workflow.llm import accounting, stages
from workflow.llm.answers import FINDINGS_SCHEMA
from workflow.llm.findings import (
    add_flags,
    answer_flags,
    ground_findings,
    report_text,
    rules_positive_names,
    write_audit,
)
from workflow.llm.followup import ASKED, empty_asked, followup_targets
from workflow.tables import Rejects, read_table, summary, write_requests, write_table

log = logging.getLogger(__name__)
TEMPLATE = "keyinfo.j2"


def shard_requests(studies: pd.DataFrame, shard: int, shards: int, cfg: dict, params: dict, rejects: Rejects):
    part = studies[studies["study_id"] % shards == shard]
    requests = []
    for row in part.to_dict("records"):
        text = report_text(row)
        if text is None:
            rejects.add(int(row["study_id"]), "no_findings_or_impression", "nothing to send to the LLM")
            continue
        requests.append(
            stages.stage_request(
                TEMPLATE, FINDINGS_SCHEMA, cfg, params, {"study_id": int(row["study_id"])}, report=text
            )
        )
    return part, requests


def run_shard(args, config) -> None:
    cfg, params = stages.stage_params(config, "keyinfo")
    studies = stages.load_studies(args.sections, args.studies)
    rejects = Rejects("llm_keyinfo")
    part, requests = shard_requests(studies, args.shard, args.shards, cfg, params, rejects)
    answers = stages.ask(requests, cfg, args.cache, dry_run=args.dry_run)
    if isinstance(answers, accounting.Estimate):
        stages.write_estimate(answers, args.estimate)
        return
    by_id = part.set_index("study_id", drop=False)
    rows, audit = [], []
    for a in answers:
        sid = int(a.request.meta["study_id"])
        new = stages.first_answer_rows(a, by_id, rejects, config["keyinfo"]["fuzzy_cutoff"], audit)
        if new is None:
            continue
        if not new:  # answered, nothing found: recorded, so every study is in the output or in rejects
            rejects.add(sid, *stages.no_findings_reason(a.items))
        rows += new
    write_audit(audit, args.audit)
    write_table(findings_table(rows), args.findings, FINDINGS)
    write_requests(stages.request_rows(answers, "keyinfo", 0, cfg), args.requests)
    rejects.write(args.rejects)
    summary(
        f"llm_keyinfo shard {args.shard}/{args.shards}", len(part), len(part) - len(rejects), len(rejects)
    )


def flag_answers(
    llm: pd.DataFrame, rules: pd.DataFrame, answered: set[int], rejects: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Round 0's answers flagged against the rules (:func:`answer_flags`): flags on the study's rows, or,
    for a flagged answer that left no rows, the study's reject says ``llm_flagged`` instead of
    ``llm_no_findings``. Follow-up asks every rules finding such an answer missed."""
    positive = rules_positive_names(rules)
    rows = {sid: g.to_dict("records") for sid, g in llm.groupby("study_id")} if not llm.empty else {}
    out, flagged_empty = [], {}
    for sid in sorted(answered):
        study_rows = rows.pop(sid, [])
        flags = answer_flags(study_rows, positive.get(int(sid), set()))
        add_flags(study_rows, flags)
        out += study_rows
        if flags and not study_rows:
            flagged_empty[sid] = ";".join(flags) + ": the answer lists no findings"
    out += [r for group in rows.values() for r in group]
    flagged = rejects["study_id"].isin(flagged_empty.keys())
    rejects = rejects.copy()
    rejects.loc[flagged, "reason"] = "llm_flagged"
    rejects.loc[flagged, "detail"] = rejects.loc[flagged, "study_id"].map(flagged_empty)
    n = len(flagged_empty) + len(
        {r["study_id"] for r in out if "contradicts_rules" in (r.get("flags") or "")}
    )
    if n:
        log.warning("llm_keyinfo: %d answer(s) flagged against the rules (re-asked in follow-up)", n)
    return pd.DataFrame(out, columns=FINDINGS.names), rejects


def merge(args, config) -> None:
    """Concatenate the shards into round 0 and record its disagreement with the rules."""
    findings = pa.concat_tables([read_table(p) for p in args.shard_findings]).cast(FINDINGS)
    requests = pa.concat_tables([read_table(p) for p in args.shard_requests]).cast(LLM_REQUESTS)
    rejects = pa.concat_tables([read_table(p) for p in args.shard_rejects]).cast(REJECTS)
    audit = pa.concat_tables([read_table(p) for p in args.shard_audit]).cast(AUDIT)
    write_table(audit, args.audit, AUDIT)
    write_table(unknown_terms(audit), args.unknown_terms, UNKNOWN_TERMS)  # what to add to libs/
    rules = read_table(args.rules_findings).to_pandas()
    sections = read_table(args.sections).to_pandas()
    grounded = ground_findings(
        findings.to_pandas(), rules, sections, support_cutoff=config["keyinfo"]["support_cutoff"]
    )
    req = requests.to_pandas()
    answered = set(req.loc[(req["status"] == "completed") & req["parse_error"].isna(), "study_id"])
    grounded, rejects = flag_answers(grounded, rules, answered, rejects.to_pandas())
    findings = pa.Table.from_pandas(grounded, schema=FINDINGS, preserve_index=False)
    write_table(findings, args.findings, FINDINGS)
    write_table(requests, args.requests, LLM_REQUESTS)
    write_table(pa.Table.from_pandas(rejects, schema=REJECTS, preserve_index=False), args.rejects, REJECTS)
    write_table(empty_asked(), args.asked, ASKED)
    llm = grounded
    targets = followup_targets(llm, rules, answered, empty_asked().to_pandas())
    stats = {
        "round": 0,
        "studies": len(answered),
        "missed": int((targets["reason"] == "missed").sum()),
        "disagreements": int((targets["reason"] == "disagreement").sum()),
        "asked": 0,
        "answered": 0,
        "changed": 0,
        "findings": findings.num_rows,
        "converged": False,
    }
    write_table(pa.Table.from_pylist([stats], schema=LLM_FOLLOWUP_STATS), args.stats, LLM_FOLLOWUP_STATS)
    n_out = len(set(findings.column("study_id").to_pylist()))
    n_rejected = rejects["study_id"].nunique()
    summary("llm_keyinfo merge", n_out + n_rejected, n_out, n_rejected)


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shard")
    stages.add_common_args(s)
    s.add_argument("--sections", required=True)
    s.add_argument("--studies", required=True)
    s.add_argument("--shard", type=int, required=True)
    s.add_argument("--shards", type=int, required=True)
    for name in ("findings", "requests", "rejects", "audit"):
        s.add_argument(f"--{name}", required=True)
    s.add_argument("--estimate")
    m = sub.add_parser("merge")
    m.add_argument("--config", required=True, help="JSON of the workflow config (keyinfo.support_cutoff)")
    for name in ("shard-findings", "shard-requests", "shard-rejects", "shard-audit"):
        m.add_argument(f"--{name}", nargs="+", required=True)
    m.add_argument("--rules-findings", required=True)
    m.add_argument("--sections", required=True)
    for name in ("findings", "requests", "rejects", "asked", "stats", "audit", "unknown-terms"):
        m.add_argument(f"--{name}", required=True)
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.command == "shard":
        run_shard(args, stages.load_config(args.config))
    else:
        merge(args, stages.load_config(args.config))


if __name__ == "__main__":
    main()
