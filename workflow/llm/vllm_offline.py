"""Offline vLLM executor: OpenAI Batch-API request JSONL in, Batch-API output JSONL out.

Runs in the vLLM environment (``.venv-vllm`` or a cluster conda env), never in the core one::

    .venv-vllm/bin/python -m workflow.llm.vllm_offline --requests IN.jsonl --output OUT.jsonl \\
        --model BASE_DIR [--lora student=ADAPTER_DIR] [--tensor-parallel-size 4] [--max-model-len 8192]

Input lines: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {model, messages,
max_tokens, temperature, response_format: {type: json_schema, json_schema: {schema}}}}``.
A request whose ``body.model`` names a ``--lora NAME=PATH`` adapter is generated with that adapter
(``LoRARequest``); a bare ``--lora PATH`` serves every request; otherwise the base model answers. ``response_format`` json_schema becomes constrained
decoding (engine-wide ``guidance`` backend without free whitespace, so a weak model cannot pad the JSON
with blanks until ``max_tokens``). Prefix caching is on: every KeyInfo prompt shares its long system
prefix.

Output lines: ``{"custom_id", "response": {"status_code": 200, "body": <chat.completion>}, "error": null}``,
or ``{"custom_id", "response": null, "error": {"code", "message"}}`` for a request vLLM refused (prompt
longer than the context, bad schema...). Whether the text is valid JSON is NOT judged here: parsing is the
LLM layer's separate step, which records garbage as a parse failure with its reason.

Output is appended chunk by chunk (flushed + fsynced); a rerun skips custom_ids already in the output, so
a killed run resumes where it stopped.

Only the standard library and vllm are imported, so the module also runs as a plain file
(``python workflow/llm/vllm_offline.py ...``) in an environment without the core stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("vllm_offline")

# Sampling fields of an OpenAI chat request that map 1:1 onto vllm.SamplingParams.
# `--lora PATH` without a name: the adapter answers every request, whatever its body.model says.
ANY_MODEL = "*"

SAMPLING_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop", "n")


def read_requests(path: Path) -> Iterator[dict]:
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not a JSON line ({exc})") from exc


def done_ids(path: Path) -> set[str]:
    """custom_ids already answered in an existing output file (a partial last line is ignored)."""
    if not path.exists():
        return set()
    ids = set()
    with path.open() as handle:
        for line in handle:
            try:
                ids.add(json.loads(line)["custom_id"])
            except (json.JSONDecodeError, KeyError):
                continue
    return ids


def parse_lora(values: Iterable[str]) -> dict[str, str]:
    """``NAME=PATH`` adapters by name; a bare ``PATH`` serves every request (key ``*``); ``""`` is none."""
    adapters = {}
    for value in values:
        if not value:
            continue  # an empty `{adapter}` substitution: base model only
        name, sep, path = value.partition("=")
        if not sep:
            name, path = ANY_MODEL, value
        if not name or not path:
            raise SystemExit(f"--lora expects NAME=PATH or PATH, got {value!r}")
        adapters[name] = path
    return adapters


def adapter_chat_template(adapter_dirs: Iterable[str]) -> str | None:
    """LLaMA-Factory saves its training template as chat_template.jinja next to the adapter: serve with it."""
    for directory in adapter_dirs:
        candidate = Path(directory) / "chat_template.jinja"
        if candidate.exists():
            return str(candidate)
    return None


# The ranks vLLM accepts for max_lora_rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_needed(adapter_dirs: Iterable[str]) -> int:
    """The smallest max_lora_rank vLLM accepts that fits every adapter's rank (adapter_config.json ``r``)."""
    rank = 1
    for directory in adapter_dirs:
        config = Path(directory) / "adapter_config.json"
        if config.exists():
            rank = max(rank, int(json.loads(config.read_text()).get("r", 1)))
    return next((r for r in LORA_RANKS if r >= rank), rank)


def json_schema_of(body: dict) -> dict | None:
    """The JSON schema of an OpenAI ``response_format`` (json_schema or json_object), else None."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        return spec.get("schema", spec)
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    return None


def sampling_params(body: dict, default_max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    kwargs["max_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    schema = json_schema_of(body)
    if schema is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(json=schema)
    return SamplingParams(**kwargs)


def valid_utf8(text: str) -> str:
    """A random or confused model can emit half a surrogate pair; keep the line encodable downstream."""
    return text.encode("utf-8", "replace").decode("utf-8")


def completion_body(model: str, output, created: int) -> dict:
    """A chat.completion object (OpenAI shape) from one vLLM RequestOutput."""
    choices = []
    completion_tokens = 0
    for index, choice in enumerate(output.outputs):
        completion_tokens += len(choice.token_ids)
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": valid_utf8(choice.text)},
                "finish_reason": choice.finish_reason or "stop",
                "logprobs": None,
            }
        )
    prompt_tokens = len(output.prompt_token_ids or [])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def ok_line(custom_id: str, body: dict) -> dict:
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}


def error_line(custom_id: str, code: str, message: str) -> dict:
    return {"custom_id": custom_id, "response": None, "error": {"code": code, "message": message[:500]}}


class OfflineExecutor:
    """One vLLM engine (base model + optional LoRA adapters) answering chat requests in chunks."""

    def __init__(self, args: argparse.Namespace):
        from vllm import LLM

        self.args = args
        self.adapters = parse_lora(args.lora)
        self._lora_requests: dict[str, object] = {}
        template = args.chat_template or adapter_chat_template(self.adapters.values())
        self.chat_template = Path(template).read_text() if template else None
        if template:
            log.info("chat template: %s", template)
        engine_args = dict(
            model=args.model,
            tokenizer=args.tokenizer or args.model,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enable_prefix_caching=True,
            enforce_eager=args.enforce_eager,
            seed=args.seed,
            structured_outputs_config={"backend": args.structured_backend, "disable_any_whitespace": True},
        )
        if args.gpu_memory_utilization is not None:
            engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
        if self.adapters:
            args.max_lora_rank = max(args.max_lora_rank, lora_rank_needed(self.adapters.values()))
            engine_args.update(
                enable_lora=True, max_lora_rank=args.max_lora_rank, max_loras=len(self.adapters)
            )
        log.info(
            "starting vLLM: %s", {k: v for k, v in engine_args.items() if k != "structured_outputs_config"}
        )
        self.llm = LLM(**engine_args)

    def lora_request(self, model_name: str):
        name = model_name if model_name in self.adapters else ANY_MODEL
        if name not in self.adapters:
            return None
        if name not in self._lora_requests:
            from vllm.lora.request import LoRARequest

            lora_id = len(self._lora_requests) + 1
            lora_name = Path(self.adapters[name]).name if name == ANY_MODEL else name
            self._lora_requests[name] = LoRARequest(lora_name, lora_id, self.adapters[name])
        return self._lora_requests[name]

    def _chat(self, requests: list[dict]) -> list:
        return self.llm.chat(
            [r["body"]["messages"] for r in requests],
            sampling_params=[sampling_params(r["body"], self.args.default_max_tokens) for r in requests],
            lora_request=[self.lora_request(r["body"].get("model", "")) for r in requests],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            use_tqdm=True,
        )

    def answer(self, requests: list[dict]) -> list[dict]:
        """Output lines for ``requests``; one bad request fails alone, not its whole chunk."""
        created = int(time.time())
        try:
            outputs = self._chat(requests)
        except Exception as exc:  # a request vLLM rejects (too long, bad schema) fails the whole call
            if len(requests) == 1:
                log.warning("request %s failed: %s", requests[0]["custom_id"], type(exc).__name__)
                return [error_line(requests[0]["custom_id"], type(exc).__name__, str(exc))]
            log.warning("chunk of %d failed (%s); retrying one by one", len(requests), type(exc).__name__)
            return [line for r in requests for line in self.answer([r])]
        return [
            ok_line(r["custom_id"], completion_body(r["body"].get("model", self.args.model), out, created))
            for r, out in zip(requests, outputs, strict=True)
        ]


def invalid_reason(request: dict) -> str | None:
    if not isinstance(request.get("custom_id"), str):
        return "missing custom_id"
    if request.get("url", "/v1/chat/completions") != "/v1/chat/completions":
        return f"unsupported url {request.get('url')!r}"
    body = request.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return "body.messages missing"
    return None


def run(args: argparse.Namespace) -> dict[str, int]:
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    finished = done_ids(output)
    pending, invalid = [], []
    for request in read_requests(Path(args.requests)):
        if request.get("custom_id") in finished:
            continue
        reason = invalid_reason(request)
        if reason:
            invalid.append(error_line(str(request.get("custom_id")), "invalid_request", reason))
        else:
            pending.append(request)
    counts = {"skipped": len(finished), "pending": len(pending), "ok": 0, "error": len(invalid)}
    log.info(
        "%d requests pending, %d already answered, %d invalid", len(pending), len(finished), len(invalid)
    )
    with output.open("a") as handle:

        def write(lines: list[dict]) -> None:
            for line in lines:
                handle.write(json.dumps(line, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        write(invalid)
        if pending:
            executor = OfflineExecutor(args)
            for start in range(0, len(pending), args.chunk_size):
                lines = executor.answer(pending[start : start + args.chunk_size])
                counts["ok"] += sum(line["error"] is None for line in lines)
                counts["error"] += sum(line["error"] is not None for line in lines)
                write(lines)
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Offline vLLM executor for OpenAI Batch-API chat request JSONL")
    p.add_argument("--requests", required=True, help="input JSONL (Batch API request lines)")
    p.add_argument(
        "--output", required=True, help="output JSONL (Batch API output lines; appended, resumable)"
    )
    p.add_argument("--model", required=True, help="base (or merged) model directory or name")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapter served for requests whose body.model is NAME (repeatable)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="jinja chat template file (default: an adapter's chat_template.jinja written by LLaMA-Factory)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument(
        "--enforce-eager", action="store_true", help="skip graph capture / torch.compile (fast start)"
    )
    p.add_argument("--structured-backend", default="guidance", choices=["guidance", "xgrammar", "outlines"])
    p.add_argument("--default-max-tokens", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=512, help="requests per vLLM call (and per fsync)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    counts = run(args)
    log.info(
        "summary stage=vllm_offline requests_in=%d ok=%d error=%d skipped=%d",
        counts["pending"] + counts["skipped"],
        counts["ok"],
        counts["error"],
        counts["skipped"],
    )


if __name__ == "__main__":
    main()
