"""Follow-up rounds: re-ask the LLM where it and the rules extractor disagree, merge, re-standardise.

Round ``r`` (1..R) reads round ``r-1``. Targets are (study, finding) pairs where the rules found a
finding the LLM did not mention (``missed``) or both mention it with a different presence
(``disagreement``), minus every pair asked in an earlier round. Each target is one follow-up request
(the conversation continues from the LLM's previous answer). An answer replaces the study's rows of that
finding; an empty answer to a ``missed`` question confirms the omission. A round with nothing new to
ask is a fixpoint: later rounds copy it and send nothing. Statistics of every round so far are written
with each round; ``requests`` holds this round's requests only; ``rejects`` carries the earlier rejects of
every study still without findings, so each study is in the round's findings or in its rejects.
"""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa

from workflow import cli
from workflow.contract import FINDINGS, LLM_FOLLOWUP_STATS, REJECTS
from workflow.llm import accounting, stages
from workflow.llm.answers import FOLLOWUP_SCHEMA
from workflow.llm.findings import (
    answer_json,
    findings_frame,
    ground_findings,
    per_name_presence,
    reflag,
    report_text,
    rules_positive_names,
    standardise_answer,
)
from workflow.tables import read_table, summary, write_requests, write_table

log = logging.getLogger(__name__)
TEMPLATE = "followup.j2"
ASKED = pa.schema(
    [
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("round", pa.int16(), nullable=False),
    ]
)
SKIP_NAMES = {"unknown"}


def empty_asked() -> pa.Table:
    return ASKED.empty_table()


def followup_targets(
    llm: pd.DataFrame, rules: pd.DataFrame, studies: set[int], asked: pd.DataFrame
) -> pd.DataFrame:
    """(study_id, name, reason) pairs to ask about, in a stable order."""
    llm_p = per_name_presence(llm[llm["study_id"].isin(studies)])
    rules_p = per_name_presence(rules[rules["study_id"].isin(studies) & ~rules["name"].isin(SKIP_NAMES)])
    both = rules_p.merge(llm_p, on=["study_id", "name"], how="left", suffixes=("_rules", "_llm"))
    both["reason"] = None
    both.loc[both["presence_llm"].isna(), "reason"] = "missed"
    both.loc[both["presence_llm"].notna() & (both["presence_llm"] != both["presence_rules"]), "reason"] = (
        "disagreement"
    )
    targets = both[both["reason"].notna()][["study_id", "name", "reason"]]
    if not asked.empty:
        done = asked[["study_id", "name"]].assign(_asked=True)
        targets = targets.merge(done, on=["study_id", "name"], how="left")
        targets = targets[targets["_asked"].isna()].drop(columns="_asked")
    return targets.sort_values(["study_id", "name"]).reset_index(drop=True)


def followup_request(row: dict, previous_answer: str, finding: str, reason: str, cfg: dict, params: dict):
    """One follow-up question (the stage and the estimate both build them here)."""
    return stages.stage_request(
        TEMPLATE,
        FOLLOWUP_SCHEMA,
        cfg,
        params,
        {"study_id": int(row["study_id"]), "finding": finding, "reason": reason},
        report=report_text(row),
        previous=previous_answer,
        finding=finding,
        reason=reason,
    )


def _signature(df: pd.DataFrame) -> set:
    return {
        tuple(map(str, r))
        for r in df[["name", "presence", "location", "level", "type", "change"]].itertuples(index=False)
    }


def round_rejects(
    previous_rejects: pd.DataFrame, previous: pd.DataFrame, merged: pd.DataFrame, round_: int
) -> pd.DataFrame:
    """The rejects that go with a round's findings: every study the chain has seen is in exactly one.

    Earlier rejects stay unless a follow-up answer gave the study findings; a study whose rows all went
    away in this round is recorded too."""
    kept = set(merged["study_id"])
    carried = previous_rejects[~previous_rejects["study_id"].isin(kept)]
    lost = sorted(set(previous["study_id"]) - kept)
    new = pd.DataFrame(
        {
            "study_id": pd.Series(lost, dtype="int64"),
            "stage": "llm_followup",
            "reason": "llm_no_findings",
            "detail": f"follow-up round {round_} left no findings",
        }
    )
    return pd.concat([carried, new], ignore_index=True)[list(REJECTS.names)]


def run_round(args, config) -> None:
    round_ = int(args.round)
    fcfg = config["llm"]["followup"]
    cfg, params = stages.stage_params(config, "followup")
    previous = read_table(args.previous).to_pandas()
    prev_stats = read_table(args.previous_stats).to_pylist()
    asked = read_table(args.previous_asked).to_pandas()
    # Who answered the bulk extraction (round 0); each round's requests.parquet holds only its own requests.
    keyinfo_requests = read_table(args.keyinfo_requests).to_pandas()
    rules = read_table(args.rules_findings).to_pandas()
    studies = stages.load_studies(args.sections, args.studies).set_index("study_id", drop=False)
    first = keyinfo_requests[keyinfo_requests["status"] == "completed"]
    answered_ids = set(first.loc[first["parse_error"].isna(), "study_id"])

    converged_before = bool(prev_stats and prev_stats[-1]["converged"])
    targets = followup_targets(previous, rules, answered_ids, asked)
    n_missed = int((targets["reason"] == "missed").sum())
    n_disagree = int((targets["reason"] == "disagreement").sum())
    if converged_before or round_ > int(fcfg["rounds"]):
        targets = targets.head(0)

    by_study = {sid: g for sid, g in previous.groupby("study_id")}
    requests = []
    for t in targets.itertuples(index=False):
        row = studies.loc[t.study_id].to_dict()
        current = by_study.get(t.study_id, previous.head(0))
        requests.append(followup_request(row, answer_json(current, row), t.name, t.reason, cfg, params))
    answers = stages.ask(requests, cfg, args.cache, dry_run=args.dry_run) if requests else []
    if isinstance(answers, accounting.Estimate):
        stages.write_estimate(answers, args.estimate)
        return

    merged = previous
    changed = answered = 0
    for a in answers:
        if a.items is None:
            continue
        answered += 1
        sid, name, reason = a.request.meta["study_id"], a.request.meta["finding"], a.request.meta["reason"]
        new = findings_frame(
            standardise_answer(
                a.items,
                studies.loc[sid].to_dict(),
                source="followup",
                round_=round_,
                request_key=a.request.key,
                fuzzy_cutoff=config["keyinfo"]["fuzzy_cutoff"],
            )
        )
        new = new[new["name"] == name]
        old_mask = (merged["study_id"] == sid) & (merged["name"] == name)
        if new.empty and reason == "disagreement":
            continue  # "not mentioned" contradicts both extractors: keep the earlier rows
        if _signature(merged[old_mask]) != _signature(new):
            changed += 1
        merged = pd.concat([merged[~old_mask], new], ignore_index=True)
    if answers:  # re-ground and re-flag: flags follow the merged rows
        merged = ground_findings(
            merged, rules, studies.reset_index(drop=True), support_cutoff=config["keyinfo"]["support_cutoff"]
        )
        merged = reflag(merged, rules_positive_names(rules))
    merged = merged.sort_values(["study_id", "round", "name"], kind="stable").reset_index(drop=True)

    new_asked = pd.DataFrame({"study_id": targets["study_id"], "name": targets["name"], "round": round_})
    all_asked = pd.concat([asked, new_asked], ignore_index=True)
    stats = prev_stats + [
        {
            "round": round_,
            "studies": len(answered_ids),
            "missed": n_missed,
            "disagreements": n_disagree,
            "asked": len(requests),
            "answered": answered,
            "changed": changed,
            "findings": len(merged),
            "converged": len(requests) == 0 or changed == 0,
        }
    ]
    rejects = round_rejects(read_table(args.previous_rejects).to_pandas(), previous, merged, round_)
    write_table(pa.Table.from_pandas(merged, schema=FINDINGS, preserve_index=False), args.findings, FINDINGS)
    write_table(pa.Table.from_pandas(rejects, schema=REJECTS, preserve_index=False), args.rejects, REJECTS)
    write_table(pa.Table.from_pandas(all_asked, schema=ASKED, preserve_index=False), args.asked, ASKED)
    write_table(pa.Table.from_pylist(stats, schema=LLM_FOLLOWUP_STATS), args.stats, LLM_FOLLOWUP_STATS)
    # This round's requests only, once each: the report adds the rounds up.
    write_requests(stages.request_rows(answers, "followup", round_, cfg), args.requests)
    log.info(
        "followup round %d: %d missed, %d disagreements, %d asked, %d answered, %d changed%s",
        round_,
        n_missed,
        n_disagree,
        len(requests),
        answered,
        changed,
        " (fixpoint)" if stats[-1]["converged"] else "",
    )
    n_out = merged["study_id"].nunique()
    summary(f"llm_followup round {round_}", n_out + rejects["study_id"].nunique(), n_out, len(rejects))


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    stages.add_common_args(p)
    p.add_argument("--round", type=int, required=True)
    for name in (
        "sections",
        "studies",
        "rules-findings",
        "previous",
        "previous-asked",
        "previous-stats",
        "keyinfo-requests",
        "previous-rejects",
        "findings",
        "asked",
        "stats",
        "requests",
        "rejects",
    ):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--estimate")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    run_round(args, stages.load_config(args.config))


if __name__ == "__main__":
    main()
