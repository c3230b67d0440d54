"""LLM requests rendered from the jinja2 templates in ``prompts/``, keyed by content.

A template renders a whole conversation; a line ``=== system ===``, ``=== user ===`` or
``=== assistant ===`` starts a message of that role. Keeping the fixed part (instructions, few-shot
turns) first and the per-study text last makes the shared prefix maximal, so servers with prefix
caching (vLLM, Azure/OpenAI prompt caching) reuse it for every report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
ROLE_LINE = re.compile(r"^=== (system|user|assistant) ===[ \t]*$", re.MULTILINE)


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=8)
def _environment(prompts_dir: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(prompts_dir),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, not an empty string
        keep_trailing_newline=False,
        autoescape=False,
    )


def _env(prompts_dir: str | Path | None) -> jinja2.Environment:
    return _environment(str(prompts_dir or PROMPTS_DIR))


@lru_cache(maxsize=64)
def _prompt_hash(prompts_dir: str, template: str) -> str:
    env = _environment(prompts_dir)
    seen: dict[str, str] = {}
    todo = [template]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        source = env.loader.get_source(env, name)[0]
        seen[name] = source
        todo.extend(t for t in jinja2.meta.find_referenced_templates(env.parse(source)) if t)
    return sha256_text(canonical_json(seen))[:16]


def prompt_hash(template: str, prompts_dir: str | Path | None = None) -> str:
    """Content hash of a template and every template it includes (provenance of every output row)."""
    return _prompt_hash(str(prompts_dir or PROMPTS_DIR), template)


@lru_cache(maxsize=256)
def _shared(text: str) -> str:
    """One string object per distinct recent message text: the fixed prefix (instructions, few-shot
    turns) of thousands of requests is held once in memory, not once per request."""
    return text


def render_messages(template: str, prompts_dir: str | Path | None = None, **variables) -> list[dict]:
    """Render ``template`` and split it into chat messages at the role lines."""
    text = _env(prompts_dir).get_template(template).render(**variables)
    parts = ROLE_LINE.split(text)
    if parts[0].strip():
        raise ValueError(f"prompt {template}: text before the first role line")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": role, "content": _shared(content.strip("\n"))})
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"prompt {template}: must end with a user message")
    return messages


@dataclass(frozen=True)
class Request:
    """One chat request. ``meta`` (study id, finding, ...) travels with it but is not part of the key."""

    key: str
    model: str
    messages: list[dict]
    params: dict
    schema: dict | None
    schema_name: str | None
    template: str
    prompt_hash: str
    adapter: str | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def body(self) -> dict:
        """The chat completion request body (same for the online call, Batch API and vLLM)."""
        body = {"model": self.model, "messages": self.messages, **self.params}
        if self.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": self.schema_name or "answer", "schema": self.schema, "strict": True},
            }
        return body

    def batch_line(self) -> dict:
        return {"custom_id": self.key, "method": "POST", "url": "/v1/chat/completions", "body": self.body()}

    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


def request_key(body: dict, adapter: str | None = None) -> str:
    keyed = dict(body)
    if adapter:
        keyed["adapter"] = adapter
    return sha256_text(canonical_json(keyed))


def build_request(
    template: str,
    model: str,
    params: dict | None = None,
    schema: dict | None = None,
    *,
    schema_name: str | None = None,
    adapter: str | None = None,
    meta: dict | None = None,
    prompts_dir: str | Path | None = None,
    **variables,
) -> Request:
    """Render ``prompts/<template>`` with ``variables`` into a :class:`Request` keyed by content."""
    messages = render_messages(template, prompts_dir, **variables)
    params = copy.deepcopy(params or {})
    req = Request(
        key="",
        model=model,
        messages=messages,
        params=params,
        schema=schema,
        schema_name=schema_name or (schema or {}).get("title") if schema else None,
        template=template,
        prompt_hash=prompt_hash(template, prompts_dir),
        adapter=adapter,
        meta=dict(meta or {}),
    )
    object.__setattr__(req, "key", request_key(req.body(), adapter))
    return req


def request_from_line(
    line: dict, template: str = "", prompt_hash_: str = "", meta: dict | None = None
) -> Request:
    """A :class:`Request` back from a Batch API request line (its key is recomputed and checked)."""
    body = dict(line["body"])
    fmt = body.pop("response_format", None)
    model = body.pop("model")
    messages = body.pop("messages")
    schema = schema_name = None
    if fmt and fmt.get("type") == "json_schema":
        schema = fmt["json_schema"]["schema"]
        schema_name = fmt["json_schema"].get("name")
    req = Request(
        "", model, messages, body, schema, schema_name, template, prompt_hash_, None, dict(meta or {})
    )
    object.__setattr__(req, "key", request_key(req.body()))
    if line.get("custom_id") and line["custom_id"] != req.key:
        raise ValueError("custom_id does not match the request body's key")
    return req
