"""The RaDialog instruct tasks that need language generation, answered through the LLM layer.

RaDialog had Vicuna write two of its instruct tasks: the report in easy language (for a patient) and
the reasoning behind a diagnosis (its MIMIC-NLE part). Rules cannot write either, so with
``llm.backend: rules`` the tasks are absent (``summary.json`` and the log say so); with
``llm.backend: llm`` each job becomes one chat request rendered from ``prompts/radialog_easy_language.j2``
or ``prompts/radialog_reasoning.j2`` and sent through :func:`workflow.llm.run_requests`, which caches
every answer under the request's content key (a re-run sends nothing), retries 429/5xx, accounts tokens
and cost, and applies the DUA guard (no credentialed report text to a public endpoint). Requests depend
only on the report text (and the diagnoses), so images of one study share one request.

An answer becomes a training target only when it is usable: non-empty, not longer than
``max_chars``, and free of the conversation markers of the Vicuna rendering (``USER:``, ``ASSISTANT:``,
``</s>``), which would corrupt the record. Anything else is dropped with a counted reason.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

# the LLM layer (asyncio, jinja2, the findings parsers) is imported where a generator runs: the rules
# backend's RaDialog job reads only ABSENT from here (~0.1 s CPU of imports less)
if TYPE_CHECKING:
    from workflow.llm import Request

log = logging.getLogger(__name__)

STAGE = "exports"
TEMPLATES = {"easy_language": "radialog_easy_language.j2", "reasoning": "radialog_reasoning.j2"}
ABSENT = (
    "absent: easy_language and reasoning need an LLM (llm.backend: llm); this build used the rules backend"
)
_MARKERS = re.compile(r"USER:|ASSISTANT:|</s>")


def rule_args(config: dict, llm_config_json: str, cache_path: str) -> str:
    """The exports rule's LLM options (rules/exports.smk): none with the rules backend."""
    if (config.get("llm") or {}).get("backend") != "llm":
        return ""
    llm = config["exports"]["radialog"]["llm"]
    return " ".join(
        shlex.quote(str(x))
        for x in (
            "--llm-config",
            llm_config_json,
            "--llm-cache",
            cache_path,
            "--llm-endpoint",
            llm["endpoint"],
            "--temperature",
            llm["temperature"],
            "--max-tokens",
            llm["max_tokens"],
        )
    )


def usable(content: str | None, max_chars: int) -> tuple[str | None, str | None]:
    """(answer, None) or (None, reason)."""
    if content is None:
        return None, "no_answer"
    text = " ".join(content.split())
    if not text:
        return None, "empty"
    if _MARKERS.search(text):
        return None, "conversation_marker"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None


class InstructGenerator:
    """Answers (task, image) jobs; ``stats`` holds requests, outcomes, tokens and cost."""

    def __init__(
        self,
        executor_cfg: dict,
        cache_path: str | Path,
        params: dict | None = None,
        max_chars: int = 1500,
        prompts_dir: str | Path | None = None,
    ):
        self.cfg = executor_cfg
        self.cache_path = cache_path
        self.params = dict(params or {"temperature": 0, "max_tokens": 300})
        self.max_chars = max_chars
        self.prompts_dir = prompts_dir
        self.stats: dict = {}
        self.requests: list[dict] = []  # LLM_REQUESTS rows: one per distinct request of the last answer()

    @classmethod
    def from_config(
        cls, config_json: str, cache_path: str | Path, endpoint: str, params: dict | None = None
    ) -> InstructGenerator:
        """From the workflow config (``{"corpus": {...}, "llm": {...}}``): a settings file, as rules/common.smk
        writes it, or the JSON itself."""
        from workflow.llm import load_executor_config
        from workflow.llm.stages import load_config

        config = load_config(config_json)
        config.setdefault("llm", {})[STAGE] = {"endpoint": endpoint}
        return cls(load_executor_config(config, STAGE), cache_path, params)

    def request(self, task: str, findings: str, diagnoses: list[str], study_id: int) -> Request:
        from workflow.llm import build_request

        variables = {"findings": findings}
        if task == "reasoning":
            variables["diagnoses"] = diagnoses
        return build_request(
            TEMPLATES[task],
            model=self.cfg["model"],
            params=self.params,
            adapter=self.cfg.get("adapter"),
            prompts_dir=self.prompts_dir,
            meta={"task": task, "study_id": study_id},
            **variables,
        )

    def answer(self, jobs: list[tuple[str, str, int, str, list[str]]]) -> dict[tuple[str, str], str]:
        """Jobs ``(task, dicom, study id, findings text, diagnoses)`` → ``{(task, dicom): answer}`` (usable
        ones). ``requests`` then holds the LLM_REQUESTS row of each distinct request (images of one study
        share one), so the report counts what was sent like every other LLM stage's."""
        from workflow.llm import run_requests
        from workflow.llm.stages import request_row

        keys = {}
        for task, dicom, study_id, findings, diagnoses in jobs:
            keys[(task, dicom)] = self.request(task, findings, diagnoses, study_id)
        unique: dict[str, Request] = {}
        for req in keys.values():
            unique.setdefault(req.key, req)
        results = run_requests(unique.values(), self.cfg, self.cache_path) if unique else {}
        self.requests = [
            request_row(req, results.get(key), STAGE, None, self.cfg) for key, req in unique.items()
        ]
        out: dict[tuple[str, str], str] = {}
        dropped: Counter = Counter()
        for job, req in keys.items():
            result = results.get(req.key)
            if result is None or result.status != "completed":
                dropped[f"{job[0]}:llm_{result.status if result else 'no_answer'}"] += 1
                continue
            text, reason = usable(result.content, self.max_chars)
            if reason:
                dropped[f"{job[0]}:{reason}"] += 1
            else:
                out[job] = text
        done = [r for r in (results.get(k) for k in unique) if r is not None]
        run = run_requests.last_stats
        self.stats = {
            "jobs": len(keys),
            "requests": len(unique),
            "sent": run.sent if run else 0,
            "cached": run.cached if run else 0,
            "completed": sum(r.status == "completed" for r in done),
            "accepted": len(out),
            "dropped": dict(sorted(dropped.items())),
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in done),
            "completion_tokens": sum(r.completion_tokens or 0 for r in done),
            "cost_usd": round(sum(r.cost or 0.0 for r in done), 6),
            "endpoint": self.cfg.get("endpoint_name"),
            "model": self.cfg.get("model"),
        }
        log.info("radialog llm tasks: %s", json.dumps(self.stats))
        return out
