"""What the LLM stages share: inputs, asking through the cache, parsing answers, provenance rows."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workflow.llm import accounting
from workflow.llm.answers import extract_json, findings_of
from workflow.llm.cache import Result
from workflow.llm.findings import standardise_answer
from workflow.llm.request import Request, build_request
from workflow.llm.run import load_executor_config, run_requests
from workflow.tables import read_table

log = logging.getLogger(__name__)


def add_common_args(p) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="the stage's settings (corpus + llm sections): a JSON file, or JSON text",
    )
    p.add_argument("--cache", required=True, help="the response cache (SQLite)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the estimate (requests, tokens, cost) and stop"
    )


def load_config(value: str) -> dict:
    """``--config``: a JSON file (what the rules pass) or JSON text (tests, one-off calls)."""
    if value.lstrip().startswith("{"):
        return json.loads(value)
    try:
        return json.loads(Path(value).read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"--config {value}: no such settings file (the workflow writes it when a run starts)"
        ) from None


def load_studies(sections_path, studies_path) -> pd.DataFrame:
    """Sections joined with the split of each study (one row per study)."""
    sections = read_table(sections_path).to_pandas()
    studies = read_table(studies_path, columns=["study_id", "split"]).to_pandas()
    return sections.merge(studies, on="study_id", how="left")


def stage_params(config: dict, stage: str) -> tuple[dict, dict]:
    """(executor settings, request params) of one stage."""
    cfg = load_executor_config(config, stage)
    stage_cfg = config["llm"][stage]
    params = {"temperature": stage_cfg.get("temperature", 0), "max_tokens": stage_cfg.get("max_tokens", 1500)}
    return cfg, params


def stage_request(template: str, schema: dict, cfg: dict, params: dict, meta: dict, **variables) -> Request:
    """The one way every LLM stage (and the estimate) builds a request: the stage endpoint's model and
    adapter (the adapter is part of the key), the stage's parameters, the answer schema."""
    return build_request(
        template, cfg["model"], params, schema, adapter=cfg.get("adapter"), meta=meta, **variables
    )


class PendingRequestsError(RuntimeError):
    """Some requests are still in flight: the stage must not write outputs as if it were done."""


@dataclass
class Answer:
    request: Request
    result: Result | None
    items: list[dict] | None  # parsed finding items; None when unusable
    parse_error: str | None


def parse_findings_answer(result: Result) -> tuple[list[dict] | None, str | None]:
    """(finding items, None) of a completed answer, or (None, why it is unusable)."""
    items = None
    parsed, error = extract_json(result.content)
    if parsed is not None:
        items, problems = findings_of(parsed)
        if problems and not items and problems != ["no_findings_key"]:
            items, error = None, ";".join(problems)
        elif problems == ["no_findings_key"]:
            items, error = None, "no_findings_key"
    if result.finish_reason == "length" and items is None:
        error = f"truncated (max_tokens): {error}"
    return items, error


def unusable_findings_answer(result: Result) -> str | None:
    """The executor's check of an HTTP-200 answer: why it is unusable, or None (re-asked when not None)."""
    return parse_findings_answer(result)[1]


def ask(requests: list[Request], cfg: dict, cache_path, dry_run: bool = False):
    """Run the requests through the cache and executor, then parse each answer (a separate step).

    An answer that does not parse into findings is re-asked by the executor (``llm.client.unusable_retries``)
    and then recorded as ``unusable``: its study goes to the rejects as ``llm_unusable_answer``."""
    results = run_requests(requests, cfg, cache_path, dry_run=dry_run, validate=unusable_findings_answer)
    if isinstance(results, accounting.Estimate):
        return results
    unanswered = sum(1 for r in requests if r.key not in results)
    if unanswered:  # e.g. Batch API jobs still running with batch.wait: false
        raise PendingRequestsError(
            f"{unanswered} request(s) have no answer yet (batch in flight?); re-run to collect them"
        )
    answers = []
    for req in requests:
        result = results.get(req.key)
        items = error = None
        if result is not None and result.status == "unusable":
            error = result.error
        elif result is not None and result.status == "completed":
            items, error = parse_findings_answer(result)
        answers.append(Answer(req, result, items, error))
    return answers


def request_row(req: Request, result, stage: str, round_: int | None, cfg: dict, *, parse_error: str | None = None,
                n_findings: int | None = None) -> dict:  # fmt: skip
    """One row of ``LLM_REQUESTS`` for a request of a stage (``meta["study_id"]`` names its study)."""
    r = result
    return {
        "study_id": int(req.meta["study_id"]),
        "stage": stage,
        "round": round_,
        "finding": req.meta.get("finding"),
        "request_key": req.key,
        "status": r.status if r else "not_sent",
        "model": (r.model if r and r.model else req.model),
        "adapter": req.adapter,
        "executor": (r.executor if r and r.executor else cfg["executor"]),
        "template": req.template,
        "prompt_hash": req.prompt_hash,
        "prompt_tokens": r.prompt_tokens if r else 0,
        "completion_tokens": r.completion_tokens if r else 0,
        "cost_usd": r.cost if r else 0.0,
        "finish_reason": r.finish_reason if r else None,
        "error": r.error if r else None,
        "parse_error": parse_error,
        "n_findings": n_findings,
    }


def request_rows(answers: list[Answer], stage: str, round_: int | None, cfg: dict) -> list[dict]:
    return [
        request_row(
            a.request,
            a.result,
            stage,
            round_,
            cfg,
            parse_error=a.parse_error,
            n_findings=len(a.items) if a.items is not None else None,
        )
        for a in answers
    ]


def reject_reason(a: Answer) -> tuple[str, str]:
    if a.result is None:
        return "llm_not_answered", "no answer in the cache"
    if a.result.status == "refused":
        return "llm_refused", a.result.error or "content_filter"
    if a.result.status == "failed":
        return "llm_failed", a.result.error or ""
    if a.result.status == "unusable":
        return "llm_unusable_answer", a.result.error or ""
    return "llm_unusable_answer", a.parse_error or ""


def first_answer_rows(a: Answer, sections: pd.DataFrame, rejects, fuzzy_cutoff: float,
                      audit: list[dict] | None = None) -> list[dict] | None:  # fmt: skip
    """A round-0 answer's finding rows (gold and bulk keyinfo alike), its evidence located in the study's
    sections (``sections`` indexed by study_id); None when the answer is unusable (recorded in ``rejects``)."""
    sid = int(a.request.meta["study_id"])
    if a.items is None:
        rejects.add(sid, *reject_reason(a))
        return None
    return standardise_answer(
        a.items, sections.loc[sid].to_dict(), source="llm", round_=0, request_key=a.request.key,
        fuzzy_cutoff=fuzzy_cutoff, audit=audit,
    )  # fmt: skip


def no_findings_reason(items: list[dict]) -> tuple[str, str]:
    """Why a usable answer left a study without findings rows (a recorded outcome, not an error)."""
    if not items:
        return "llm_no_findings", "the model's answer lists no findings"
    return "llm_findings_dropped", f"standardisation kept none of the {len(items)} answer items"


def write_estimate(est: accounting.Estimate, path: str | Path | None) -> None:
    print(est.line())
    if path:
        Path(path).write_text(json.dumps(est.as_dict(), indent=2))
