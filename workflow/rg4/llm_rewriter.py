"""The ``llm`` rewriter: the same jobs as the rules rewriter, answered by an LLM through the LLM layer.

Each target whose original text contains content the scenario removes becomes one chat request rendered
from ``prompts/rg4_rewrite.j2`` (answer schema ``REWRITE_SCHEMA``: ``{"findings", "impression"}``),
sent through :func:`workflow.llm.run_requests` (cache, retries on 429/5xx, guard, accounting). Every
answer passes the same :func:`workflow.rg4.rewrite.check` as the rules rewriter. A failed answer is
retried as a new conversation that shows the model its previous answer and what was wrong with it (a
new request key, so the cache never returns the failed answer again); after ``max_attempts`` the target
is dropped with the last reason. Targets with nothing to remove are kept as written without a request.
The share of sentences removed / rephrased is measured by aligning the rewrite with the original
(:func:`edit_counts`), since the model does not say what it did.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from workflow.llm import Request, build_request, load_executor_config, run_requests
from workflow.llm.answers import REWRITE_SCHEMA, extract_json
from workflow.llm.request import request_key
from workflow.llm.stages import load_config, request_row
from workflow.rg4.build import Job, Outcome
from workflow.rg4.rewrite import check, detect, joined, load_rules, normalise_space, split_sentences

log = logging.getLogger(__name__)

TEMPLATE = "rg4_rewrite.j2"
STAGE = "rg4"
_COMPLAINTS = {
    "empty": "Your answer left both sections empty, but the report has findings to keep.",
    "labels_changed": "Your answer changed which findings are present or absent. Keep every finding of the "
    "original with its presence exactly; only remove or rephrase the content described.",
    "residual": "Your answer still contains content that must be removed: {what}.",
    "unparsable": "Your answer was not the requested JSON object.",
}
_CATEGORY_NAMES = {
    "pc": "comparison with a prior study",
    "pp": "a prior procedure",
    "comm": "communication of results",
    "view": "a view that is not provided",
}


def complaint(reason: str) -> str:
    if reason.startswith("residual_"):
        cats = reason.removeprefix("residual_").split("_")
        return _COMPLAINTS["residual"].format(what=", ".join(_CATEGORY_NAMES.get(c, c) for c in cats))
    return _COMPLAINTS.get(reason, _COMPLAINTS["unparsable"])


def _words(sentence: str) -> set[str]:
    return set(re.findall(r"[a-z]{3,}", sentence.lower()))


def edit_counts(job: Job, finding: str | None, impression: str | None, rules) -> tuple[int, Counter, Counter]:
    """(sentences, removed, rephrased per category) of an LLM rewrite, by aligning sentences: a flagged
    original sentence found verbatim in the rewrite was kept; one whose words make up at least 60 % of a
    rewritten sentence was rephrased; any other was removed (an estimate: the model does not say)."""
    before = [x for t in (job.finding, job.impression) if t for x in split_sentences(t)]
    after = [x for t in (finding, impression) if t for x in split_sentences(t)]
    kept = set(after)
    after_words = [_words(x) for x in after]
    removed, rephrased = Counter(), Counter()
    for x in before:
        cats = detect(x, job.removes, rules)
        if not cats or x in kept:
            continue
        words = _words(x)
        # rephrased: some rewritten sentence is made mostly of this sentence's words
        best = max((len(words & w) / len(w) for w in after_words if w), default=0.0) if words else 0.0
        (rephrased if best >= 0.6 else removed).update(cats)
    return len(before), removed, rephrased


def _text(value) -> str | None:
    if not isinstance(value, str):
        return None
    value = normalise_space(value)
    return value or None


class LLMJobRunner:
    name = "llm"

    def __init__(
        self,
        executor_cfg: dict,
        cache_path: str | Path,
        label_vector: Callable[[str], dict],
        params: dict | None = None,
        max_attempts: int = 3,
        prompts_dir: str | Path | None = None,
    ):
        self.cfg = executor_cfg
        self.cache_path = cache_path
        self.label_vector = label_vector
        self.params = dict(params or {"temperature": 0, "max_tokens": 800})
        self.max_attempts = max_attempts
        self.prompts_dir = prompts_dir
        self.rules = load_rules()
        self.requests: list[dict] = []  # LLM_REQUESTS rows: every request sent or answered from the cache
        self.stats: dict[str, int] = {
            "requests": 0,
            "accepted": 0,
            "retried": 0,
            "dropped": 0,
            "untouched": 0,
        }

    @classmethod
    def from_config(
        cls,
        config_json: str,
        cache_path: str | Path,
        endpoint: str,
        label_vector: Callable[[str], dict],
        params: dict | None = None,
        max_attempts: int = 3,
    ) -> LLMJobRunner:
        """From the workflow config (``{"corpus": {...}, "llm": {...}}``): its JSON, as rules/common.smk passes
        it, or a settings file."""
        config = load_config(config_json)
        config.setdefault("llm", {})[STAGE] = {"endpoint": endpoint}
        return cls(load_executor_config(config, STAGE), cache_path, label_vector, params, max_attempts)

    def first_request(self, job: Job) -> Request:
        lateral = "view" not in job.removes
        return build_request(
            TEMPLATE,
            model=self.cfg["model"],
            params=self.params,
            schema=REWRITE_SCHEMA,
            adapter=self.cfg.get("adapter"),
            prompts_dir=self.prompts_dir,
            meta={"study_id": job.study_id, "scenario": job.scenario},
            findings=job.finding or "",
            impression=job.impression or "",
            keep_prior="pc" not in job.removes,
            views=["frontal", "lateral"] if lateral else ["frontal"],
        )

    def retry_request(self, previous: Request, answer: str | None, reason: str) -> Request:
        messages = [
            *previous.messages,
            {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": complaint(reason) + " Answer again with the corrected JSON object."},
        ]
        req = Request(
            "",
            previous.model,
            messages,
            previous.params,
            previous.schema,
            previous.schema_name,
            previous.template,
            previous.prompt_hash,
            previous.adapter,
            previous.meta,
        )
        object.__setattr__(req, "key", request_key(req.body(), previous.adapter))
        return req

    def _judge(self, job: Job, content: str | None) -> tuple[str | None, str | None, str | None]:
        answer, error = extract_json(content)
        if answer is None or not {"findings", "impression"} <= answer.keys():
            return None, None, "unparsable"
        finding, impression = _text(answer["findings"]), _text(answer["impression"])
        # a section the report does not have stays absent
        finding = finding if job.finding else None
        impression = impression if job.impression else None
        reason = check(
            (job.finding, job.impression), (finding, impression), job.removes, self.label_vector, self.rules
        )
        return finding, impression, reason

    def run(self, jobs: list[Job]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        current: dict[int, Request] = {}
        for idx, job in enumerate(jobs):
            if detect(joined(job.finding, job.impression), job.removes, self.rules):
                current[idx] = self.first_request(job)
            else:
                n = sum(len(split_sentences(t)) for t in (job.finding, job.impression) if t)
                outcomes[idx] = Outcome(job.finding, job.impression, sentences=n)
                self.stats["untouched"] += 1
        for attempt in range(1, self.max_attempts + 1):
            if not current:
                break
            self.stats["requests"] += len(current)
            results = run_requests(current.values(), self.cfg, self.cache_path)
            self.requests += [
                request_row(r, results.get(r.key), "rg4", attempt - 1, self.cfg) for r in current.values()
            ]
            retry: dict[int, Request] = {}
            for idx, req in current.items():
                job, result = jobs[idx], results.get(req.key)
                if result is None or result.status != "completed":
                    reason = "llm_" + (result.status if result else "no_answer")
                    content = None
                    finding = impression = None
                    if result is not None and result.status == "refused":  # a refusal will not change
                        outcomes[idx] = Outcome(reason=reason, request_hash=req.key)
                        continue
                else:
                    content = result.content
                    finding, impression, reason = self._judge(job, content)
                if reason is None:
                    n, removed, rephrased = edit_counts(job, finding, impression, self.rules)
                    outcomes[idx] = Outcome(finding, impression, None, req.key, n, removed, rephrased)
                    self.stats["accepted"] += 1
                elif attempt < self.max_attempts:
                    retry[idx] = self.retry_request(req, content, reason)
                    self.stats["retried"] += 1
                else:
                    outcomes[idx] = Outcome(reason=reason, request_hash=req.key)
                    self.stats["dropped"] += 1
            current = retry
        log.info("rg4 llm rewriter: %s", self.stats)
        return outcomes  # type: ignore[return-value]
