"""Gold extraction: a seeded, stratified sample of studies answered by the teacher LLM.

The sample is stratified by split and by how many distinct findings the rules extractor found positive
(0, 1, 2, 3+), so the teacher sees normal and busy reports in the corpus's proportions. Studies in the
exclusion list (e.g. a held-out doctor-evaluation set) are never sampled. Outputs: the sample, the
standardised findings, per-request provenance, rejects, and ``sft.jsonl`` (chat messages + the teacher's
answer, for fine-tuning the student). An answer flagged against the rules (``contradicts_rules``,
``ungrounded``: see :func:`workflow.llm.findings.answer_flags`) keeps its flags in the findings and is never
written to ``sft.jsonl``: the student must not learn from an answer a report's text may have dictated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from workflow import cli
from workflow.contract import FINDINGS, LLM_GOLD_SAMPLE, findings_table
from workflow.llm import accounting, stages
from workflow.llm.answers import FINDINGS_SCHEMA
from workflow.llm.findings import (
    add_flags,
    answer_flags,
    report_text,
    rules_positive_names,
)
from workflow.tables import Rejects, atomic_output, read_table, summary, write_requests, write_table

log = logging.getLogger(__name__)
TEMPLATE = "keyinfo.j2"


def read_exclusion(path: str | None) -> set[int]:
    """Study ids to exclude: a text/csv file, one id per line (a leading 's' and a header are fine)."""
    if not path:
        return set()
    ids = set()
    for line in Path(path).read_text().splitlines():
        token = line.split(",")[0].strip().lstrip("s")
        if token.isdigit():
            ids.add(int(token))
    return ids


def select_gold(
    studies: pd.DataFrame, rules: pd.DataFrame | None, n: int, seed: int, exclude: set[int] = frozenset()
) -> pd.DataFrame:
    """A seeded sample of ``n`` studies, allocated to strata in proportion (largest remainder)."""
    pool = studies[~studies["study_id"].isin(exclude)].copy()
    has_text = pd.Series(False, index=pool.index)
    for column in ("findings", "impression", "last_paragraph"):  # what report_text() would send
        has_text |= pool[column].fillna("").astype(str).str.strip().ne("")
    pool = pool[has_text]
    if rules is not None and not rules.empty:
        positive = rules[rules["presence"] == "positive"].groupby("study_id")["name"].nunique()
        count = pool["study_id"].map(positive).fillna(0).astype(int)
    else:
        count = pd.Series(0, index=pool.index)
    bucket = count.clip(upper=3).astype(str).replace("3", "3+")
    pool["stratum"] = pool["split"].fillna("unknown").astype(str) + "/" + bucket
    pool = pool.sort_values("study_id")
    n = min(n, len(pool))
    sizes = pool["stratum"].value_counts().sort_index()
    quota = sizes / sizes.sum() * n
    alloc = np.floor(quota).astype(int)
    remainder = (quota - alloc).sort_values(ascending=False, kind="stable")
    for stratum in remainder.index[: n - alloc.sum()]:
        alloc[stratum] += 1
    rng = np.random.default_rng(seed)
    picked = []
    for stratum, k in alloc.items():
        members = pool[pool["stratum"] == stratum]
        picked.append(members.iloc[np.sort(rng.permutation(len(members))[:k])])
    sample = pd.concat(picked) if picked else pool.head(0)
    return (
        sample[["subject_id", "study_id", "split", "stratum"]].sort_values("study_id").reset_index(drop=True)
    )


def gold_requests(
    config: dict, studies: pd.DataFrame, rules: pd.DataFrame | None
) -> tuple[pd.DataFrame, list]:
    """The gold sample and its teacher requests (the stage and the estimate both call this)."""
    gcfg = config["llm"]["gold"]
    cfg, params = stages.stage_params(config, "gold")
    sample = select_gold(
        studies, rules, int(gcfg["n"]), int(gcfg["seed"]), read_exclusion(gcfg.get("exclude"))
    )
    by_id = studies.set_index("study_id", drop=False)
    requests = [
        stages.stage_request(
            TEMPLATE,
            FINDINGS_SCHEMA,
            cfg,
            params,
            {"study_id": int(sid)},
            report=report_text(by_id.loc[sid].to_dict()),
        )
        for sid in sample["study_id"]
    ]
    return sample, requests


def main(argv=None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    stages.add_common_args(p)
    p.add_argument("--sections", required=True)
    p.add_argument("--studies", required=True)
    p.add_argument("--rules-findings", help="rules findings (for stratification)")
    p.add_argument("--sample", required=True)
    p.add_argument("--findings", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--sft", required=True, help="chat fine-tuning JSONL (messages + teacher answer)")
    p.add_argument("--rejects", required=True)
    p.add_argument("--estimate", help="write the dry-run estimate here (JSON)")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    config = stages.load_config(args.config)
    gcfg = config["llm"]["gold"]
    cfg, params = stages.stage_params(config, "gold")

    studies = stages.load_studies(args.sections, args.studies)
    rules = read_table(args.rules_findings).to_pandas() if args.rules_findings else None
    sample, requests = gold_requests(config, studies, rules)
    log.info("gold: %d studies sampled from %d (seed %s)", len(sample), len(studies), gcfg["seed"])
    by_id = studies.set_index("study_id", drop=False)
    answers = stages.ask(requests, cfg, args.cache, dry_run=args.dry_run)
    if isinstance(answers, accounting.Estimate):
        stages.write_estimate(answers, args.estimate)
        return

    rules_positive = rules_positive_names(rules)
    rows, rejects = [], Rejects("llm_gold")
    n_flagged = 0
    with atomic_output(args.sft, "w") as sft:
        for a in answers:
            sid = int(a.request.meta["study_id"])
            new = stages.first_answer_rows(a, by_id, rejects, config["keyinfo"]["fuzzy_cutoff"])
            if new is None:
                continue
            flags = answer_flags(new, rules_positive.get(sid, set()))
            add_flags(new, flags)
            if not new and flags:
                rejects.add(sid, "llm_flagged", ";".join(flags) + ": the answer lists no findings")
            elif not new:  # a valid answer ("nothing found") that leaves no findings row: say so
                rejects.add(sid, *stages.no_findings_reason(a.items))
            rows += new
            if flags:
                n_flagged += 1
                continue  # kept out of the fine-tuning data
            sft.write(
                json.dumps(
                    {
                        "study_id": sid,
                        "request_key": a.request.key,
                        "messages": a.request.messages + [{"role": "assistant", "content": a.result.content}],
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    write_table(
        pa.Table.from_pandas(sample, schema=LLM_GOLD_SAMPLE, preserve_index=False),
        args.sample,
        LLM_GOLD_SAMPLE,
    )
    write_table(findings_table(rows), args.findings, FINDINGS)
    write_requests(stages.request_rows(answers, "gold", 0, cfg), args.requests)
    rejects.write(args.rejects)
    if n_flagged:
        log.warning("gold: %d answer(s) flagged against the rules, kept out of sft.jsonl", n_flagged)
    summary("llm_gold", len(sample), len(sample) - len(rejects), len(rejects))


if __name__ == "__main__":
    main()
