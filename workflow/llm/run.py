"""Sending requests: the executors behind :func:`run_requests`.

``openai``  async client (AsyncOpenAI for any OpenAI-compatible base URL, AsyncAzureOpenAI for Azure
            deployments) with a fixed pool of workers (bounded concurrency and memory), an RPM/TPM
            limiter, and our own retries (the SDK's are turned off) with exponential backoff and jitter
            on 429 (honouring Retry-After, which also pauses every worker), 5xx, timeouts and broken
            responses. An HTTP-200 answer the caller's ``validate`` rejects (bad JSON, wrong schema) is
            re-asked up to ``unusable_retries`` times, then stored as ``unusable`` (re-asked by a later run
            only with ``llm.retry_unusable``). Content-filter refusals are stored as ``refused`` and never
            re-sent. An authentication or not-found error stops the run at once: every request would
            fail. Requests are claimed in the cache's lease table (in batches) before they are sent, so
            two runners sharing one cache never both pay for a key: the second waits for the first's
            answer, and takes a key over only when its lease expired (``lease_s``; renewed while the
            request is in flight).
``batch``   Batch API: pending requests as JSONL (``custom_id`` = key) → files.create → batches.create;
            the batch id is stored before polling, so a restart adopts it; output and error files are
            imported; only failed lines are resubmitted.
``vllm``    a configured command (the offline vLLM runner, its own venv) on the pending JSONL; its
            output JSONL is imported.
For ``batch`` and ``vllm`` an answer ``validate`` rejects is stored as ``unusable`` at once (no re-ask in
the same run: re-run with ``llm.retry_unusable``).
Keys come only from environment variables (``api_key_env``). Nothing here logs prompt or answer text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from workflow.llm import accounting, guard
from workflow.llm.cache import Cache, Result, export_requests, import_results, new_owner, resend_statuses
from workflow.llm.progress import Progress
from workflow.llm.request import Request, sha256_text

log = logging.getLogger(__name__)
# The SDK and its HTTP client log request bodies at DEBUG: keep them quiet even under --verbose.
for _name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2"):
    logging.getLogger(_name).setLevel(logging.WARNING)

__all__ = ["Result", "RunStats", "load_executor_config", "run_requests"]

CLIENT_DEFAULTS = {
    "concurrency": 32,
    "rpm": 0,
    "tpm": 0,
    "max_retries": 8,
    "unusable_retries": 2,
    "timeout_s": 120.0,
    "backoff_initial_s": 1.0,
    "backoff_max_s": 60.0,
    "max_consecutive_failures": 50,
    "probe_timeout_s": 10.0,
    "progress_s": 10.0,
    "lease_s": 60.0,
}
BATCH_DEFAULTS = {
    "poll_interval_s": 30.0,
    "completion_window": "24h",
    "max_requests_per_file": 50000,
    "max_rounds": 3,
    "wait": True,
    "discount": 0.5,
}


class FatalEndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown deployment): stop, do not burn retries."""


def load_executor_config(config: dict, stage: str) -> dict:
    """The flat executor settings of one stage (``gold``, ``keyinfo``, ``followup``, ``rg4``)."""
    llm = config.get("llm", {})
    stage_cfg = llm.get(stage, {})
    endpoint_name = stage_cfg.get("endpoint", "student")
    endpoint = dict(llm.get("endpoints", {}).get(endpoint_name) or {})
    if not endpoint:
        raise ValueError(f"config: llm.{stage}.endpoint names {endpoint_name!r}, not in llm.endpoints")
    cfg = {**CLIENT_DEFAULTS, **llm.get("client", {}), **endpoint.get("client", {})}
    cfg.update(
        stage=stage,
        endpoint_name=endpoint_name,
        endpoint=endpoint,
        executor=endpoint.get("executor", "openai"),
        model=endpoint.get("model"),
        adapter=endpoint.get("adapter"),
        prices=llm.get("prices", {}),
        batch={**BATCH_DEFAULTS, **llm.get("batch", {})},
        vllm=llm.get("vllm", {}),
        credentialed=config.get("corpus", {}).get("credentialed", True),
        allow_public=llm.get("allow_public_endpoint", False),
        allow_proxy=llm.get("allow_proxy", False),
        retry_unusable=bool(llm.get("retry_unusable", False)),
        max_cost_usd=llm.get("max_cost_usd"),
    )
    return cfg


@dataclass
class RunStats:
    sent: int = 0  # HTTP attempts (including retries)
    completed: int = 0
    refused: int = 0
    unusable: int = 0
    failed: int = 0
    retries: int = 0
    cached: int = 0
    elsewhere: int = 0  # answered meanwhile by another runner sharing the cache (not sent by this one)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: dict = field(default_factory=dict)
    consecutive_failures: int = 0

    def add(self, result: Result) -> None:
        setattr(self, result.status, getattr(self, result.status) + 1)
        self.prompt_tokens += result.prompt_tokens or 0
        self.completion_tokens += result.completion_tokens or 0
        self.cost_usd += result.cost or 0.0
        if result.status in ("failed", "unusable"):
            reason = (result.error or "unknown").split(":")[0]
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def line(self) -> str:
        return (
            f"llm: {self.completed} completed, {self.refused} refused, {self.unusable} unusable, "
            f"{self.failed} failed, {self.cached} cached"
            + (f", {self.elsewhere} answered by another runner" if self.elsewhere else "")
            + "; "
            f"{self.sent} HTTP attempts ({self.retries} retries); tokens {self.prompt_tokens:,} in / "
            f"{self.completion_tokens:,} out; ${self.cost_usd:,.4f}"
            + (f"; failures {self.errors}" if self.errors else "")
        )


def _api_key(endpoint: dict) -> str:
    env = endpoint.get("api_key_env")
    if not env:
        return "EMPTY"  # local servers (vLLM, LLaMA-Factory) accept any key
    key = os.environ.get(env)
    if not key:
        raise RuntimeError(f"environment variable {env} (llm endpoint api_key_env) is not set")
    return key


def make_client(cfg: dict, asynchronous: bool = True):
    """An SDK client for the endpoint; the SDK's own retries are off (ours honour our limits)."""
    import openai

    endpoint = cfg["endpoint"]
    common = {"api_key": _api_key(endpoint), "max_retries": 0, "timeout": float(cfg["timeout_s"])}
    if asynchronous:
        # The SDK over aiohttp's transport (C HTTP parser, a connection pool that does not scan every
        # connection per request) instead of httpcore's: a third less client CPU per request.
        common["http_client"] = openai.DefaultAioHttpClient()
    if endpoint.get("kind") == "azure":
        cls = openai.AsyncAzureOpenAI if asynchronous else openai.AzureOpenAI
        return cls(azure_endpoint=endpoint["azure_endpoint"], api_version=endpoint["api_version"], **common)
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=endpoint.get("base_url"), **common)


class RateLimiter:
    """Requests- and tokens-per-minute budgets as token buckets; ``pause`` stops everyone (429 cool-down).

    A bucket holds ``burst_s`` seconds of budget (10 s: providers such as Azure enforce their per-minute
    quota over short windows, so a full minute's burst at start would be answered with 429s).
    """

    def __init__(self, rpm: float = 0, tpm: float = 0, burst_s: float = 10.0):
        self.rpm, self.tpm = float(rpm or 0), float(tpm or 0)
        self.req_cap = max(1.0, self.rpm * burst_s / 60)
        self.tok_cap = self.tpm * burst_s / 60
        self.req_tokens, self.tok_tokens = self.req_cap, self.tok_cap
        self.updated = time.monotonic()
        self.paused_until = 0.0
        self.lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm and self.paused_until <= time.monotonic():
            return  # no budgets and no cool-down: nothing to wait for, no lock to take
        while True:
            async with self.lock:
                now = time.monotonic()
                wait = self.paused_until - now
                if wait <= 0:
                    elapsed, self.updated = now - self.updated, now
                    if self.rpm:
                        self.req_tokens = min(self.req_cap, self.req_tokens + elapsed * self.rpm / 60)
                    if self.tpm:
                        self.tok_tokens = min(self.tok_cap, self.tok_tokens + elapsed * self.tpm / 60)
                    cost = min(
                        float(tokens), self.tok_cap
                    )  # a request bigger than the bucket waits for a full one
                    need_r = 1 - self.req_tokens if self.rpm else 0
                    need_t = cost - self.tok_tokens if self.tpm else 0
                    if need_r <= 0 and need_t <= 0:
                        if self.rpm:
                            self.req_tokens -= 1
                        if self.tpm:
                            self.tok_tokens -= cost
                        return
                    wait = max(
                        need_r * 60 / self.rpm if self.rpm else 0, need_t * 60 / self.tpm if self.tpm else 0
                    )
            await asyncio.sleep(wait)


def _retry_after(exc) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None


def _backoff(attempt: int, cfg: dict) -> float:
    base = min(float(cfg["backoff_max_s"]), float(cfg["backoff_initial_s"]) * 2 ** (attempt - 1))
    return base * random.uniform(0.5, 1.0) + random.uniform(0, 0.1 * float(cfg["backoff_initial_s"]))


def _classify_error(exc) -> tuple[str, str, bool]:
    """(status, reason, retryable) of an exception raised by the SDK."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "failed", "timeout", True
    if isinstance(exc, openai.APIConnectionError):
        return "failed", "connection_error", True
    if isinstance(exc, openai.APIStatusError):
        code = getattr(exc, "code", None)
        status = exc.status_code
        if code == "content_filter" or (status == 400 and "content management policy" in str(exc.message)):
            return "refused", "content_filter", False
        if status in (401, 403, 404):
            raise FatalEndpointError(
                f"endpoint answered HTTP {status} ({code or type(exc).__name__}); stopping"
            ) from None
        if status == 429:
            return "failed", "http_429", True
        if status >= 500 or status in (408, 409):
            return "failed", f"http_{status}", True
        return "failed", f"http_{status}: {code or ''}", False
    # A body that is not JSON, a response that does not validate: transient on real servers.
    return "failed", f"bad_response: {type(exc).__name__}", True


def _result_from_body(req: Request, body: dict, attempts: int, cfg: dict, executor: str) -> Result:
    """The :class:`Result` of a chat completion's JSON body (read as plain JSON: building the SDK's
    pydantic model of it cost a tenth of the client's CPU per request)."""
    choices = body.get("choices")
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    usage = body.get("usage") or {}
    pt = usage.get("prompt_tokens") or 0
    ct = usage.get("completion_tokens") or 0
    finish = choice.get("finish_reason")
    content = message.get("content")
    refused = finish == "content_filter" or bool(message.get("refusal"))
    return Result(
        req.key,
        "refused" if refused else "completed",
        content=content,
        finish_reason=finish,
        error="content_filter" if refused else None,
        prompt_tokens=pt,
        completion_tokens=ct,
        cost=accounting.cost(req.model, pt, ct, cfg["prices"]),
        attempts=attempts,
        executor=executor,
        model=body.get("model") or req.model,
    )


Validator = Callable[[Result], "str | None"]


def _check_usable(result: Result, validate: Validator | None, answers: int) -> None:
    """Mark a completed answer the caller cannot use as ``unusable`` (the reason in ``error``)."""
    if validate is None or result.status != "completed":
        return
    problem = validate(result)
    if problem:
        result.status = "unusable"
        result.error = f"unusable_answer: {problem}" + (f" (after {answers} answers)" if answers > 1 else "")


async def _openai_worker(queue, client, cfg, cache, limiter, stats, progress, stop, validate, owner):
    max_retries = int(cfg["max_retries"])
    unusable_retries = int(cfg.get("unusable_retries", 0))
    azure = cfg["endpoint"].get("kind") == "azure"
    while True:
        req = await queue.get()
        if req is None:
            return
        # The body goes as JSON bytes: the SDK would deep-copy the dict (schema included) per attempt.
        # Azure's deployment path is then ours to add (the SDK adds it only to a dict body).
        body = json.dumps(req.body(), ensure_ascii=False, separators=(",", ":")).encode()
        path = f"/deployments/{quote(req.model, safe='')}/chat/completions" if azure else "/chat/completions"
        est = accounting.estimate_tokens(req.prompt_chars()) + int(req.params.get("max_tokens") or 0)
        attempt = answers = 0
        paid = [0, 0, 0.0]  # tokens and cost of unusable answers re-asked: billed, so counted
        result = None
        while result is None and not stop.is_set():
            attempt += 1
            await limiter.acquire(est)
            stats.sent += 1
            try:
                # The body is already a plain JSON request: post it as is. (chat.completions.create would
                # re-walk messages and schema through the SDK's TypedDict transform: ~5 ms CPU a request.)
                # The SDK still maps HTTP errors to its exceptions; the answer is read as plain JSON.
                raw = await client.post(path, content=body, cast_to=bytes)
                result = _result_from_body(req, json.loads(raw), attempt, cfg, "openai")
                answers += 1
                result.prompt_tokens += paid[0]
                result.completion_tokens += paid[1]
                result.cost += paid[2]
                _check_usable(result, validate, answers)
                if result.status == "unusable" and answers <= unusable_retries:
                    paid = [result.prompt_tokens, result.completion_tokens, result.cost]
                    stats.retries += 1
                    result = None  # HTTP 200 but garbage: ask again (bounded), not cached as final
                    continue
            except FatalEndpointError:
                raise
            except Exception as exc:  # noqa: BLE001 - every SDK failure is classified below
                status, reason, retryable = _classify_error(exc)
                if not retryable or attempt > max_retries:
                    detail = reason if not retryable else f"{reason} (after {attempt} attempts)"
                    result = Result(
                        req.key, status, error=detail, attempts=attempt, executor="openai", model=req.model
                    )
                    break
                stats.retries += 1
                delay = _retry_after(exc) if reason == "http_429" else None
                if delay is not None:
                    delay = min(delay, float(cfg["backoff_max_s"]))
                    limiter.pause(delay)  # cool-down: the whole pool waits, not only this request
                else:
                    delay = _backoff(attempt, cfg)
                await asyncio.sleep(delay)
        if result is None:
            return
        cache.put(result, owner)  # also ends the key's lease
        stats.add(result)
        # Circuit breaker: when request after request exhausts its retries (quota gone, endpoint down),
        # stop instead of grinding through the rest; finished answers are in the cache, a re-run goes on.
        stats.consecutive_failures = stats.consecutive_failures + 1 if result.status == "failed" else 0
        limit = int(cfg.get("max_consecutive_failures") or 0)
        if limit and stats.consecutive_failures >= limit:
            raise FatalEndpointError(
                f"{stats.consecutive_failures} requests in a row failed after retries "
                f"(last: {result.error}); stopping. Completed answers are cached: re-run to continue."
            )
        progress.update()


async def _run_openai_async(
    pending: Iterable[Request],
    n_pending: int,
    cfg: dict,
    cache: Cache,
    stats: RunStats,
    validate: Validator | None = None,
    resend: tuple[str, ...] = ("failed",),
    since: float | None = None,
):
    """Send ``pending`` through a pool of workers; each key is leased before it is queued (see module doc).

    ``resend`` and ``since`` say which stored answers are still to be asked (:meth:`Cache.claim`)."""
    owner = new_owner()
    lease_s = float(cfg["lease_s"])
    concurrency = max(1, int(cfg["concurrency"]))
    client = make_client(cfg)
    queue: asyncio.Queue = asyncio.Queue(maxsize=4 * concurrency)
    limiter = RateLimiter(cfg.get("rpm"), cfg.get("tpm"))
    stop = asyncio.Event()
    progress = Progress(
        cfg.get("stage", ""),
        n_pending,
        stats,
        cached=stats.cached,
        terminal_s=float(cfg["progress_s"]),
        log_s=max(30.0, float(cfg["progress_s"])),
    )
    workers = [
        asyncio.create_task(
            _openai_worker(queue, client, cfg, cache, limiter, stats, progress, stop, validate, owner)
        )
        for _ in range(concurrency)
    ]

    def claim(requests: dict[str, Request]) -> list[Request]:
        """Lease what nobody else holds (one transaction); keys another runner answered are done."""
        got = cache.claim(requests, owner, lease_s, resend=resend, since=since)
        if got.answered:
            stats.elsewhere += len(got.answered)
            progress.update(len(got.answered))
        for key in got.answered:
            del requests[key]
        return [requests.pop(key) for key in got.claimed]

    async def produce():
        # Lease a worker pool's worth at a time: leases are held only by what is queued or in flight.
        waiting: dict[str, Request] = {}  # under another runner's live lease
        chunk: dict[str, Request] = {}
        for req in pending:
            chunk[req.key] = req
            if len(chunk) >= concurrency:
                for leased in claim(chunk):
                    await queue.put(leased)
                waiting.update(chunk)
                chunk = {}
        for leased in claim(chunk):
            await queue.put(leased)
        waiting.update(chunk)
        if waiting:
            log.info("%d requests are in flight in another runner: waiting for its answers", len(waiting))
        while waiting:
            await asyncio.sleep(min(1.0, lease_s / 10))
            for leased in claim(waiting):
                await queue.put(leased)
        for _ in workers:
            await queue.put(None)

    async def renew():
        while True:
            await asyncio.sleep(lease_s / 3)
            cache.renew(owner, lease_s)

    producer = asyncio.create_task(produce())
    renewer = asyncio.create_task(renew())
    try:
        done, _ = await asyncio.wait([producer, *workers], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception():
                raise task.exception()
        await asyncio.gather(producer, *workers)
    finally:
        stop.set()
        for task in (producer, renewer, *workers):
            task.cancel()
        await asyncio.gather(producer, renewer, *workers, return_exceptions=True)
        cache.release(owner)  # what was claimed but not answered (stopped early) is free at once
        await client.close()
        progress.close()


def _run_batch(
    pending: list[Request], cfg: dict, cache: Cache, stats: RunStats, retry_unusable: bool = False
) -> None:
    """Submit pending requests as Batch API jobs, adopt jobs of earlier runs, collect, resubmit failures."""
    bcfg = cfg["batch"]
    client = make_client(cfg, asynchronous=False)
    endpoint_id = f"{cfg['endpoint_name']}:{guard.endpoint_url(cfg['endpoint'])}"
    url = "/chat/completions" if cfg["endpoint"].get("kind") == "azure" else "/v1/chat/completions"
    by_key = {r.key: r for r in pending}
    owner, lease_s = new_owner(), float(cfg["lease_s"])
    resend = resend_statuses(True, retry_unusable)
    for round_ in range(int(bcfg["max_rounds"])):
        in_flight = {k for _, keys in cache.open_batches(endpoint_id) for k in keys}
        todo = [k for k in cache.pending(by_key, retry_unusable=retry_unusable) if k not in in_flight]
        step = int(bcfg["max_requests_per_file"])
        for i in range(0, len(todo), step):
            # Leased from here until the batch is on record (then the batches table says it is in flight):
            # a runner submitting meanwhile leaves these keys out.
            leased = cache.claim(todo[i : i + step], owner, lease_s, resend=resend).claimed
            if not leased:
                continue
            chunk = [by_key[k] for k in leased]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "requests.jsonl"
                export_requests(chunk, path, url=url)
                with open(path, "rb") as fh:
                    file_obj = client.files.create(file=("requests.jsonl", fh), purpose="batch")
            batch = client.batches.create(
                input_file_id=file_obj.id,
                endpoint=url,
                completion_window=bcfg["completion_window"],
                metadata={"producer": "cxr-dataset-factory", "stage": str(cfg.get("stage", ""))},
            )
            cache.add_batch(batch.id, endpoint_id, file_obj.id, [r.key for r in chunk])
            cache.release(owner, leased)
            stats.sent += len(chunk)
            log.info("batch %s submitted: %d requests (round %d)", batch.id, len(chunk), round_)
        open_batches = cache.open_batches(endpoint_id)
        if not open_batches:
            break
        if not bcfg["wait"]:
            log.warning(
                "%d batch(es) in flight; wait=false, so re-run the rule to collect them", len(open_batches)
            )
            return
        print(f"llm {cfg.get('stage', '')}: waiting for {len(open_batches)} batch(es)", flush=True)
        while open_batches:
            for batch_id, keys in list(open_batches):
                batch = client.batches.retrieve(batch_id)
                if batch.status not in ("completed", "failed", "expired", "cancelled"):
                    continue
                _collect_batch(client, batch, keys, cfg, cache)
                open_batches.remove((batch_id, keys))
                print(
                    f"llm {cfg.get('stage', '')}: batch {batch_id} {batch.status}, "
                    f"{len(open_batches)} still open",
                    flush=True,
                )
            if open_batches:
                time.sleep(float(bcfg["poll_interval_s"]))
        if not cache.pending(by_key, retry_unusable=retry_unusable):
            break


def _collect_batch(client, batch, keys: list[str], cfg: dict, cache: Cache) -> None:
    seen: set[str] = set()
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        text = client.files.content(file_id).text
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as fh:
            fh.write(text)
        try:
            import_results(fh.name, cache, "batch", cfg["model"], batch.id)
        finally:
            os.unlink(fh.name)
        seen.update(json.loads(line).get("custom_id") for line in text.splitlines() if line.strip())
    for key in set(keys) - seen:
        cache.put(
            Result(
                key,
                "failed",
                error=f"batch_{batch.status}: no output line",
                attempts=1,
                executor="batch",
                model=cfg["model"],
                batch_id=batch.id,
            )
        )
    # Price the answers of this batch at the batch discount.
    for result in cache.get_many(keys).values():
        if result.status == "completed" and result.batch_id == batch.id and not result.cost:
            result.cost = accounting.cost(
                result.model or cfg["model"],
                result.prompt_tokens,
                result.completion_tokens,
                cfg["prices"],
                batch=True,
                batch_discount=float(cfg["batch"]["discount"]),
            )
            cache.put(result)
    cache.close_batch(batch.id, batch.status)
    log.info("batch %s %s: collected", batch.id, batch.status)


def _run_vllm(pending: list[Request], cfg: dict, cache: Cache, stats: RunStats) -> None:
    """Run the offline vLLM runner (its own environment) on the pending requests and import its output.

    The file names derive from the pending keys, so a killed run restarts on the same files (the runner
    skips lines already in its output); after a complete import both files are removed, so failed lines
    are asked again next time.
    """
    command = cfg["vllm"].get("command")
    if not command:
        raise ValueError("config: llm.vllm.command must be set to use the vllm executor")
    workdir = Path(cfg["vllm"].get("workdir") or cache.path.parent / "vllm")
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{cfg.get('stage', 'llm')}-{sha256_text(''.join(sorted(r.key for r in pending)))[:12]}"
    inp, outp = workdir / f"{tag}.requests.jsonl", workdir / f"{tag}.output.jsonl"
    export_requests(pending, inp)
    subs = {
        "input": str(inp),
        "output": str(outp),
        "model": cfg["model"] or "",
        "adapter": cfg.get("adapter") or "",
    }
    argv = [str(part).format(**subs) for part in command]
    stats.sent += len(pending)
    log.info("vllm: running the offline executor on %d requests", len(pending))
    subprocess.run(argv, check=True)
    import_results(outp, cache, "vllm", cfg["model"])
    inp.unlink(missing_ok=True)
    outp.unlink(missing_ok=True)


def run_requests(
    requests: Iterable[Request],
    executor_cfg: dict,
    cache_path: str | Path,
    *,
    dry_run: bool = False,
    retry_failed: bool = True,
    return_results: bool = True,
    validate: Validator | None = None,
) -> dict[str, Result] | accounting.Estimate:
    """Answer every request, from the cache where possible; returns ``{key: Result}``.

    ``validate(result)`` returns why a completed answer is unusable (or None): such answers are re-asked
    up to ``unusable_retries`` times and then stored as ``unusable``; with ``retry_unusable`` in the
    settings, the unusable answers of earlier runs are asked again.

    With ``dry_run`` nothing is sent and the :class:`~workflow.llm.accounting.Estimate` is returned.
    The guard runs before anything else; a run whose estimate exceeds ``llm.max_cost_usd`` is refused.
    """
    cfg = executor_cfg
    executor = cfg["executor"]
    guard.check_executor(cfg)
    requests = list(requests)
    stats = RunStats()
    started = time.time()
    with Cache(cache_path) as cache:
        retry_unusable = bool(cfg.get("retry_unusable")) and validate is not None
        pending_keys = cache.pending(
            (r.key for r in requests), retry_failed=retry_failed, retry_unusable=retry_unusable
        )
        est = accounting.estimate(
            requests,
            pending_keys,
            cfg["prices"],
            batch=executor == "batch",
            batch_discount=float(cfg["batch"]["discount"]),
        )
        log.info(est.line())
        if dry_run:
            return est
        if cfg.get("max_cost_usd") is not None and est.cost_usd > float(cfg["max_cost_usd"]):
            raise RuntimeError(
                f"estimated cost ${est.cost_usd:,.2f} exceeds llm.max_cost_usd={cfg['max_cost_usd']}"
            )
        stats.cached = est.cached
        pending_set = set(pending_keys)
        pending = [r for r in {r.key: r for r in requests}.values() if r.key in pending_set]
        if pending:
            from workflow.llm.probe import probe  # (imports this module)

            probe(cfg)  # seconds, not minutes of retries, when the URL or key is wrong
            if executor == "openai":
                resend = resend_statuses(retry_failed, retry_unusable)
                asyncio.run(
                    _run_openai_async(
                        iter(pending), len(pending), cfg, cache, stats, validate, resend, started
                    )
                )
            elif executor == "batch":
                _run_batch(pending, cfg, cache, stats, retry_unusable)
            elif executor == "vllm":
                _run_vllm(pending, cfg, cache, stats)
            else:
                raise ValueError(f"unknown executor {executor!r} (openai, batch, vllm)")
        if executor != "openai":  # counts come from the cache for the executors that import files
            for result in cache.get_many(pending_set).values():
                if result.status == "completed" and validate is not None:
                    _check_usable(result, validate, 1)
                    if result.status == "unusable":
                        cache.db.execute(  # a downgrade: put() never replaces a row by a worse one
                            "UPDATE responses SET status = ?, error = ? WHERE key = ?",
                            (result.status, result.error, result.key),
                        )
                stats.add(result)
        log.info(stats.line())
        run_requests.last_stats = stats
        if not return_results:
            return {}
        return cache.get_many(r.key for r in requests)


run_requests.last_stats = None


def main(argv=None) -> None:
    """Answer a Batch-API-format request JSONL through the cache (``python -m workflow.llm.run``)."""
    import json

    from workflow import cli
    from workflow.llm.cache import Cache
    from workflow.llm.request import request_from_line

    p = cli.parser("Send the requests of a Batch API JSONL file through the cache and an executor")
    p.add_argument("--requests", required=True, help="Batch API input JSONL (custom_id = request key)")
    p.add_argument("--config", required=True, help="JSON of the workflow config (corpus + llm sections)")
    p.add_argument("--stage", required=True, help="whose endpoint to use: gold, keyinfo, followup, ...")
    p.add_argument("--cache", required=True)
    p.add_argument("--export", help="write the cached answers as Batch API output JSONL here")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    with open(args.requests, encoding="utf-8") as fh:
        requests = [request_from_line(json.loads(line)) for line in fh if line.strip()]
    out = run_requests(
        requests,
        load_executor_config(json.loads(args.config), args.stage),
        args.cache,
        dry_run=args.dry_run,
        return_results=bool(args.export),
    )
    if args.dry_run:
        print(out.line())
        return
    if args.export:
        with Cache(args.cache) as cache, open(args.export, "w", encoding="utf-8") as fh:
            for key, r in cache.get_many(r.key for r in requests).items():
                body = {
                    "model": r.model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": r.finish_reason,
                            "message": {"role": "assistant", "content": r.content},
                        }
                    ],
                    "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
                }
                if r.status == "completed" or r.finish_reason == "content_filter":
                    line = {"custom_id": key, "response": {"status_code": 200, "body": body}, "error": None}
                else:
                    code = "content_filter" if r.status == "refused" else "failed"
                    line = {"custom_id": key, "response": None, "error": {"code": code, "message": r.error}}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
