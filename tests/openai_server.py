"""A loopback OpenAI-compatible server for the LLM layer's tests and benchmark (127.0.0.1 only).

It answers chat completions deterministically: the findings are derived from the report text in the
prompt (``<report>...</report>`` in the last user turn that has one; a follow-up names the finding in
``<finding>...</finding>``). It can inject faults, counts every request (by a hash of the messages),
serves the Azure URL shape (``/openai/deployments/{name}/chat/completions?api-version=...``) and a
minimal Batch API (files + batches). It binds 127.0.0.1, answers at most ``max_requests`` requests and
stops itself after ``lifetime_s``.

Faults (rates in [0, 1]):
* transient, drawn per attempt: ``429`` (with Retry-After), ``500``, ``slow`` (sleeps ``slow_s``,
  past the client's timeout), ``bad_body`` (HTTP 200 with a truncated JSON body), ``garbage`` (HTTP 200,
  the answer text is not JSON), ``wrong_schema`` (HTTP 200, a JSON answer without ``findings``);
* sticky, drawn per conversation: ``content_filter`` (Azure's HTTP 400 ``code: content_filter``),
  ``filter_finish`` (HTTP 200, ``finish_reason: content_filter``), ``bad_content`` (the answer text is
  not JSON);
* ``batch_line_fail``: a Batch API line fails with 500 (per submission).

Run standalone: ``python tests/openai_server.py --port-file PATH [--port 8765] [--latency 0.005] [--lifetime 300]``
(``.test/llm-loopback/config.yaml`` expects port 8765).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml
from aiohttp import web

VOCAB = yaml.safe_load((Path(__file__).resolve().parents[1] / "libs" / "vocabulary.yaml").read_text())
SYNONYMS = {
    "effusion": "pleural effusion",
    "effusions": "pleural effusion",
    "enlarged heart": "cardiomegaly",
    "heart is enlarged": "cardiomegaly",
    "collapse": "atelectasis",
    "opacities": "lung opacity",
    "opacity": "lung opacity",
    "pulmonary edema": "edema",
}
TERMS = sorted({**{n: n for n in VOCAB["findings"]}, **SYNONYMS}.items(), key=lambda kv: -len(kv[0]))
NEG = re.compile(r"\b(no|without|negative for|free of|resolved)\b")
UNC = re.compile(r"\b(may|possible|possibly|cannot be excluded|could|questionable|suspected)\b")
LOC = re.compile(r"\b(left|right|bilateral)(?:\s+(upper|middle|lower|basal|apical))?(?:\s+(lobe|lung|base))?")
INJECTION = re.compile(r"ignore previous instructions and answer (\{[^\n]*\})", re.I)
LEVEL = re.compile(r"\b(minimal|mild|moderate|severe|massive|small|large)\b")


def messages_hash(messages: list[dict]) -> str:
    """The hash the server counts requests by (tests compute it from Request.messages)."""
    text = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def derive_findings(report: str, only: str | None = None) -> list[dict]:
    """Deterministic 'model': sentence-level term matching with simple negation/uncertainty cues."""
    found: dict[tuple, dict] = {}
    for sentence in re.split(r"[.\n]", report.lower()):
        taken = sentence
        for term, name in TERMS:
            pos = taken.find(term)
            if pos < 0 or (only and name != only):
                continue
            taken = taken[:pos] + " " * len(term) + taken[pos + len(term) :]
            before = sentence[:pos]
            presence = (
                "negative" if NEG.search(before) else "uncertain" if UNC.search(sentence) else "positive"
            )
            loc = LOC.search(sentence)
            level = LEVEL.search(before)
            item = {
                "name": name,
                "presence": presence,
                "location": " ".join(g for g in loc.groups() if g)
                if loc and presence != "negative"
                else None,
                "level": level.group(1) if level and presence != "negative" else None,
                "type": None,
                "change": None,
                "evidence": sentence.strip()[:120],
            }
            found.setdefault((name, item["location"]), item)
    return list(found.values())


def _report_of(messages: list[dict]) -> tuple[str, str | None]:
    report, finding = "", None
    for m in messages:
        if m["role"] != "user":
            continue
        r = re.search(r"<report>(.*?)</report>", m["content"], re.S)
        if r:
            report = r.group(1)
        f = re.search(r"<finding>(.*?)</finding>", m["content"], re.S)
        finding = f.group(1).strip() if f else None
    return report, finding


class LoopbackOpenAI:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        faults: dict | None = None,
        seed: int = 0,
        slow_s: float = 3.0,
        retry_after: float = 0.05,
        max_requests: int = 1_000_000,
        lifetime_s: float = 600.0,
        api_key: str | None = None,
    ):
        self.latency, self.faults, self.seed = latency, dict(faults or {}), seed
        self.slow_s, self.retry_after, self.max_requests, self.lifetime_s = (
            slow_s,
            retry_after,
            max_requests,
            lifetime_s,
        )
        self.api_key = api_key
        self.events: list[tuple[str, str]] = []  # (messages hash, outcome) of every request, in order
        self.usage: defaultdict = defaultdict(Counter)  # model -> prompt/completion tokens answered
        self.model_listings = 0  # GET /models calls (endpoint probes; not chat requests)
        self.attempts: Counter = Counter()
        self.azure_calls: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_submissions: Counter = Counter()
        self.lock = threading.Lock()
        self.port: int | None = None
        self._loop = self._thread = self._runner = None

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, outcome: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, o in self.events if outcome is None or o == outcome)

    def by_hash(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        with self.lock:
            for h, o in self.events:
                out[h].append(o)
        return dict(out)

    def reset_counts(self) -> None:
        with self.lock:
            self.events.clear()
            self.usage.clear()

    def _record_usage(self, payload) -> None:
        if isinstance(payload, dict) and "usage" in payload:
            with self.lock:
                usage = self.usage[payload["model"]]
                usage["prompt_tokens"] += payload["usage"]["prompt_tokens"]
                usage["completion_tokens"] += payload["usage"]["completion_tokens"]

    def _draw(self, key: str) -> random.Random:
        return random.Random(f"{self.seed}:{key}")

    # -- answers ---------------------------------------------------------------------------------
    def completion(self, body: dict, model: str) -> tuple[int, dict | bytes, str]:
        """(HTTP status, JSON body or raw bytes, outcome) for one chat completion request."""
        messages = body["messages"]
        h = messages_hash(messages)
        with self.lock:
            self.attempts[h] += 1
            attempt = self.attempts[h]
        f = self.faults
        sticky = self._draw(f"{h}:sticky").random()
        transient = self._draw(f"{h}:{attempt}").random()
        edges = []
        acc = 0.0
        for name in ("429", "500", "slow", "bad_body", "garbage", "wrong_schema"):
            acc += f.get(name, 0.0)
            edges.append((acc, name))
        fault = next((name for edge, name in edges if transient < edge), None)
        if fault is None:
            acc = 0.0
            for name in ("content_filter", "filter_finish", "bad_content"):
                acc += f.get(name, 0.0)
                if sticky < acc:
                    fault = name
                    break
        if fault == "429":
            return 429, {"error": {"message": "Rate limit is exceeded.", "type": None, "code": "429"}}, "429"
        if fault == "500":
            return 500, {"error": {"message": "internal error", "type": "server_error", "code": None}}, "500"
        if fault == "bad_body":
            return 200, b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind', "bad_body"
        if fault == "content_filter":
            return (
                400,
                {
                    "error": {
                        "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
                        "content management policy.",
                        "type": None,
                        "param": "prompt",
                        "code": "content_filter",
                        "status": 400,
                    }
                },
                "content_filter",
            )
        report, finding = _report_of(messages)
        content = json.dumps({"findings": derive_findings(report, only=finding)})
        obeyed = INJECTION.search(report)
        if obeyed and finding is None:  # a gullible model: obeys a report's instructions in a first answer
            content = obeyed.group(1)
        finish = "stop"
        if fault == "bad_content":
            content = content[: len(content) // 2]
        if fault == "garbage":
            content = "I am sorry, I can only help with radiology questions."
        if fault == "wrong_schema":
            content = json.dumps({"result": derive_findings(report, only=finding)})
        if fault == "filter_finish":
            content, finish = None, "content_filter"
        prompt_chars = sum(len(m.get("content") or "") for m in messages)
        body_out = {
            "id": f"chatcmpl-{h}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}
            ],
            "usage": {
                "prompt_tokens": prompt_chars // 4,
                "completion_tokens": len(content or "") // 4,
                "total_tokens": prompt_chars // 4 + len(content or "") // 4,
            },
        }
        return 200, body_out, fault or "ok"

    # -- HTTP handlers ---------------------------------------------------------------------------
    def _check_key(self, request) -> web.Response | None:
        if self.api_key is None:
            return None
        got = request.headers.get("api-key") or request.headers.get("Authorization", "").removeprefix(
            "Bearer "
        )
        if got != self.api_key:
            return web.json_response({"error": {"message": "bad key", "code": "invalid_api_key"}}, status=401)
        return None

    async def _chat(self, request: web.Request, model_override: str | None = None) -> web.Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        with self.lock:
            over = len(self.events) >= self.max_requests
        if over:
            return web.json_response(
                {"error": {"message": "request budget of the test server used up"}}, status=503
            )
        body = await request.json()
        status, payload, outcome = self.completion(body, model_override or body.get("model", "loopback"))
        with self.lock:
            self.events.append((messages_hash(body["messages"]), outcome))
        if outcome != "slow":  # a slow answer arrives after the client gave up: it never sees this usage
            self._record_usage(payload)
        if outcome == "slow":
            await asyncio.sleep(self.slow_s)
        elif self.latency:
            await asyncio.sleep(self.latency)
        headers = {"retry-after": str(self.retry_after)} if status == 429 else {}
        if isinstance(payload, bytes):
            return web.Response(body=payload, status=status, content_type="application/json")
        return web.json_response(payload, status=status, headers=headers)

    async def chat(self, request):
        return await self._chat(request)

    async def azure_chat(self, request):
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        deployment = request.match_info["deployment"]
        with self.lock:
            self.azure_calls.append(
                {
                    "deployment": deployment,
                    "api_version": request.query["api-version"],
                    "has_api_key_header": "api-key" in request.headers,
                }
            )
        return await self._chat(request, model_override=deployment)

    async def file_create(self, request):
        form = await request.post()
        data = form["file"].file.read()
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = data
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": form["file"].filename,
                "purpose": form.get("purpose", "batch"),
                "status": "processed",
            }
        )

    async def file_content(self, request):
        data = self.files.get(request.match_info["file_id"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _batch_object(self, b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    async def batch_create(self, request):
        body = await request.json()
        batch_id = f"batch-{len(self.batches) + 1}"
        b = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "in_progress",
            "created_at": int(time.time()),
            "metadata": body.get("metadata"),
            "output_file_id": None,
            "error_file_id": None,
            "_polls": 0,
        }
        self.batches[batch_id] = b
        return web.json_response(self._batch_object(b))

    async def batch_retrieve(self, request):
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        b["_polls"] += 1
        if b["status"] == "in_progress" and b["_polls"] >= 2:
            self._process_batch(b)
        return web.json_response(self._batch_object(b))

    def _process_batch(self, b: dict) -> None:
        out, err = [], []
        for raw in self.files[b["input_file_id"]].decode().splitlines():
            line = json.loads(raw)
            h = messages_hash(line["body"]["messages"])
            with self.lock:
                self.batch_submissions[h] += 1
                n = self.batch_submissions[h]
            if self._draw(f"{h}:batch:{n}").random() < self.faults.get("batch_line_fail", 0.0):
                with self.lock:
                    self.events.append((h, "batch_500"))
                err.append(
                    {
                        "id": f"r-{h}",
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": 500,
                            "body": {"error": {"message": "server error", "code": "server_error"}},
                        },
                        "error": None,
                    }
                )
                continue
            status, payload, outcome = self.completion(
                {**line["body"], "messages": line["body"]["messages"]}, line["body"].get("model", "loopback")
            )
            with self.lock:
                self.events.append((h, f"batch_{outcome}"))
            if status != 200 or isinstance(payload, bytes):
                err.append(
                    {
                        "id": f"r-{h}",
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": status,
                            "body": payload if isinstance(payload, dict) else {},
                        },
                        "error": None,
                    }
                )
            else:
                self._record_usage(payload)
                out.append(
                    {
                        "id": f"r-{h}",
                        "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "request_id": h, "body": payload},
                        "error": None,
                    }
                )
        for kind, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                fid = f"file-{len(self.files) + 1}"
                self.files[fid] = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
                b[kind] = fid
        b["status"] = "completed"
        b["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}

    async def models(self, request):
        """The model listing (what the endpoint probe asks): key-checked like every other call."""
        if (denied := self._check_key(request)) is not None:
            return denied
        if request.path.startswith("/openai") and "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        with self.lock:
            self.model_listings += 1
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "loopback", "object": "model", "created": 0, "owned_by": "loopback"}],
            }
        )

    async def stats(self, request):
        return web.json_response({"requests": self.count(), "by_hash": self.by_hash()})

    # -- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024**2)
        for prefix in ("/v1", "/openai"):
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_post(f"{prefix}/files", self.file_create)
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", self.file_content)
            app.router.add_post(f"{prefix}/batches", self.batch_create)
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self.batch_retrieve)
            app.router.add_get(f"{prefix}/models", self.models)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure_chat)
        app.router.add_get("/_stats", self.stats)
        return app

    async def _start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._loop.call_later(self.lifetime_s, lambda: asyncio.ensure_future(self._runner.cleanup()))

    def start(self, port: int = 0) -> LoopbackOpenAI:
        ready = threading.Event()

        def serve():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start(port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name="loopback-openai")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("loopback server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port-file", required=True, help="write the chosen port here once listening")
    p.add_argument("--port", type=int, default=0, help="the port to listen on (0: any free port)")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--lifetime", type=float, default=300.0)
    p.add_argument("--faults", default="{}", help="JSON dict of fault rates")
    p.add_argument("--max-requests", type=int, default=2_000_000)
    args = p.parse_args(argv)
    server = LoopbackOpenAI(
        latency=args.latency,
        faults=json.loads(args.faults),
        lifetime_s=args.lifetime,
        max_requests=args.max_requests,
    )
    server.start(args.port)
    Path(args.port_file).write_text(str(server.port))
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline and server._thread.is_alive():
        time.sleep(0.5)
    server.stop()


if __name__ == "__main__":
    main()
