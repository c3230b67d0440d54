"""The LLM layer: every LLM call of the workflow as a cached, resumable, accounted OpenAI chat request.

Small public API (stable; other stages use only this)::

    from workflow.llm import build_request, run_requests, load_executor_config

    req = build_request("keyinfo.j2", model="gpt-4o", params={"temperature": 0, "max_tokens": 800},
                        schema=FINDINGS_SCHEMA, report="FINDINGS: ...")      # -> Request (req.key = sha256)
    results = run_requests([req, ...], executor_cfg, cache_path)            # -> {key: Result}
    results[req.key].status        # "completed" | "refused" | "unusable" | "failed"
    results[req.key].content       # the model's text (parse it yourself: parsing is a separate step)

* ``Request.key`` is the sha256 of the canonical JSON (sorted keys, no whitespace) of the request body
  ``{"model", "messages", **params, "response_format"}`` plus the LoRA adapter name when one is used.
  Any change of model, prompt text, parameters or schema is a new key; nothing else is.
* The cache (SQLite, WAL) stores every response under its key the moment it arrives; ``run_requests``
  only sends keys that have no final answer yet. A second run of a finished stage sends nothing.
  Keys in flight are leased in the cache (``leases``: owner, expiry; ``llm.client.lease_s``): a second
  runner sharing the cache waits for a foreign live lease's answer and never sends that key twice.
* ``run_requests(..., validate=fn)``: ``fn(result)`` says why an HTTP-200 answer is unusable (None if
  usable); such answers are re-asked ``llm.client.unusable_retries`` times, then stored as ``unusable``
  and sent again only with ``llm.retry_unusable`` (the LLM stages pass the findings parser).
* Executors (``executor_cfg["executor"]``): ``openai`` (AsyncOpenAI / AsyncAzureOpenAI over aiohttp, bounded
  concurrency, RPM/TPM limits, retries with backoff + jitter honouring Retry-After), ``batch`` (the
  Batch API), ``vllm`` (offline vLLM through a command, see below). Without any LLM,
  ``llm.backend: rules`` (the default) keeps the LLM stages out of the workflow: downstream stages read
  the rules findings (``findings_table()`` in rules/common.smk).
* Guard: a corpus with ``corpus.credentialed: true`` is refused for a public non-Azure endpoint unless
  ``llm.allow_public_endpoint: true``; API keys only from the environment variable ``api_key_env`` names.
* A run stops (``FatalEndpointError``) on 401/403/404 and after ``max_consecutive_failures`` requests in
  a row failed; a run whose estimate exceeds ``llm.max_cost_usd`` is refused before sending.

Interchange format (the boundary with the offline vLLM executor, Azure/OpenAI Batch and cache
import/export) is the OpenAI Batch API JSONL:

* request lines:  ``{"custom_id": <request key>, "method": "POST", "url": "/v1/chat/completions",
  "body": <chat completion request>}`` (written by :func:`workflow.llm.cache.export_requests`)
* output lines:   ``{"custom_id": <request key>, "response": {"status_code": 200,
  "body": <chat completion>}, "error": null}``; a failed line has ``"response": null`` or a non-200
  ``status_code`` and ``"error": {"code", "message"}`` (read by :func:`workflow.llm.cache.import_results`).

Command lines::

    python -m workflow.llm.estimate [--configfile config.yaml more.yaml]   # requests/tokens/cost per stage
    python -m workflow.llm.run --requests X.jsonl --config JSON --stage keyinfo --cache C.sqlite [--dry-run]
    python -m workflow.llm.{gold,keyinfo,followup} ...                      # the stages (rules/llm.smk)

Stages (``llm.backend: llm``; outputs under ``<outdir>/llm/``): ``gold/`` (seeded stratified sample sent
to the teacher; ``sft.jsonl`` = conversation + teacher answer), ``keyinfo/shard{i}/`` (bulk, one request
per study), ``followup/round{r}/`` (round 0 = merged bulk; rounds 1..R re-ask where rules and LLM
disagree; ``stats.parquet`` = convergence per round). Every stage writes ``requests.parquet``
(contract ``LLM_REQUESTS``: status, tokens, cost, model, adapter, executor, template, prompt hash, request
key) that every findings row joins through ``request_hash``; a follow-up round's table holds only that
round's requests, so adding the tables up counts each request once. Every stage also writes ``rejects``:
each study ends in its findings or in its rejects with a reason (``llm_no_findings`` when the answer
lists nothing). The rules pass each stage its settings as a file (``<outdir>/llm/settings/<stage>.json``,
written when a run starts); the rule's params hold only what changes its outputs.

Before a stage sends anything, :mod:`workflow.llm.probe` asks the endpoint's ``/models`` once and stops
with the URL, HTTP status and config key to fix; while it sends, :mod:`workflow.llm.progress` prints a
progress line to the terminal (stdout) and plain lines to the log.

The ``vllm`` executor runs ``llm.vllm.command`` (a list; ``{input}``, ``{output}``, ``{model}``,
``{adapter}`` are substituted) on the JSONL of the pending requests and imports its output JSONL into
the cache; lines that failed are left pending for the next run.
"""

from workflow.llm.request import Request, build_request, prompt_hash, render_messages
from workflow.llm.run import Result, load_executor_config, run_requests

__all__ = [
    "Request",
    "Result",
    "build_request",
    "load_executor_config",
    "prompt_hash",
    "render_messages",
    "run_requests",
]
