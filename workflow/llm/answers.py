"""JSON schemas of the answers we ask for, and their parsing (a step separate from asking).

The findings answer is the shape agreed with the key-information stage::

    {"findings": [{"name", "presence": "positive|negative|uncertain", "location", "level", "type",
                   "change", "evidence"}]}

``FINDINGS_SCHEMA`` is strict-mode compatible (every property required, nullable instead of optional,
no length keywords: what Azure/OpenAI structured outputs accept). ``bounded_schema()`` adds
``maxLength``/``maxItems`` for local constrained decoding (vLLM), where an unbounded string lets a weak
model write until ``max_tokens``.
"""

from __future__ import annotations

import copy
import json
import re

from workflow.contract import PRESENCE

_NULLABLE = {"type": ["string", "null"]}

FINDING_ITEM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "presence", "location", "level", "type", "change", "evidence"],
    "properties": {
        "name": {"type": "string", "description": "the finding, e.g. 'pleural effusion'"},
        "presence": {"type": "string", "enum": list(PRESENCE)},
        "location": {**_NULLABLE, "description": "laterality, zone, structure: 'left lower lobe'"},
        "level": {**_NULLABLE, "description": "severity: minimal, mild, moderate, severe, massive"},
        "type": {**_NULLABLE, "description": "e.g. patchy, layering, linear, chronic"},
        "change": {**_NULLABLE, "description": "new, improved, worsened, unchanged, resolved"},
        "evidence": {**_NULLABLE, "description": "the words of the report that state it"},
    },
}

FINDINGS_SCHEMA = {
    "title": "keyinfo_findings",
    "type": "object",
    "additionalProperties": False,
    "required": ["findings"],
    "properties": {"findings": {"type": "array", "items": FINDING_ITEM}},
}

# A follow-up answer has the same shape, restricted by the prompt to the finding asked about.
FOLLOWUP_SCHEMA = {**copy.deepcopy(FINDINGS_SCHEMA), "title": "followup_findings"}

REWRITE_SCHEMA = {
    "title": "rg4_rewrite",
    "type": "object",
    "additionalProperties": False,
    "required": ["findings", "impression"],
    "properties": {"findings": _NULLABLE, "impression": _NULLABLE},
}


def bounded_schema(schema: dict, max_string: int = 80, max_items: int = 24) -> dict:
    """A copy of ``schema`` with every string and array bounded (for local constrained decoding)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            types = node.get("type")
            types = types if isinstance(types, list) else [types]
            if "string" in types and "enum" not in node:
                node.setdefault("maxLength", max_string)
            if "array" in types:
                node.setdefault("maxItems", max_items)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


def extract_json(content: str | None) -> tuple[dict | None, str | None]:
    """Parse a model's answer into a JSON object; ``(None, reason)`` when it is not one.

    Tolerates what models do around JSON: code fences and prose before/after the outermost braces.
    """
    if content is None or not content.strip():
        return None, "empty_answer"
    text = _FENCE.sub("", content.strip())
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            return None, "no_json_object"
        try:
            value = json.loads(text[start : end + 1])
        except json.JSONDecodeError as exc:
            return None, f"invalid_json: {exc.msg} at {exc.pos}"
    if not isinstance(value, dict):
        return None, "answer_not_an_object"
    return value, None


def findings_of(answer: dict) -> tuple[list[dict], list[str]]:
    """The finding items of a parsed answer, each coerced to the agreed fields; plus problems found.

    Missing attributes become None, an unknown presence is kept as written (standardisation maps or
    flags it), a non-object item is reported, never silently dropped.
    """
    items = answer.get("findings")
    problems: list[str] = []
    if items is None:
        return [], ["no_findings_key"]
    if not isinstance(items, list):
        return [], ["findings_not_a_list"]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            problems.append(f"item_{i}_without_name")
            continue
        row = {k: item.get(k) for k in FINDING_ITEM["properties"]}
        for k, v in row.items():
            if v is not None and not isinstance(v, str):
                row[k] = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
        row["presence"] = (row["presence"] or "positive").strip().lower()
        out.append(row)
    return out, problems
