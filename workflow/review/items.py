"""Reviewable items of one study, from the finished tables (nothing here recomputes a stage).

A study becomes a JSON-ready dict: its report sections cut into highlight segments (each finding's
evidence span, so the page needs no offset arithmetic), and its items — one per finding instance, per
question–answer pair and per distinct RG4 rewrite — each with a stable id, so verdicts from different
reviewers and from a later build of the same tables line up:

- ``f:<study>:<name>:<section>:<start>`` — a key-information row (name, presence, location, level, type);
- ``q:<qa_id>`` — a Medical-CXR-VQA question with its answer;
- ``rg4:<study>:<scenarios>`` — an RG4 target; scenarios whose rewrite is identical share one item.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping

from workflow.contract import RG4_SCENARIOS, SECTION_NAMES
from workflow.keyinfo.extract import FALLBACK_SECTION, READ_SECTIONS
from workflow.rg4.rewrite import detect, joined, load_rules

# Report sections in reading order (the contract's); `history` is shown only where it says more than the
# indication. Evidence spans index the sections the key-information stage reads.
SHOWN_SECTIONS = SECTION_NAMES
SPAN_SECTIONS = (*READ_SECTIONS, FALLBACK_SECTION)
CATEGORY_NAMES = {
    "pc": "prior comparison",
    "pp": "prior procedure",
    "comm": "communication",
    "view": "views not provided",
    "none": "unchanged",
    "other": "other change",  # the rewrite differs but the detector names no category (LLM rewording)
}
SCENARIO_NAMES = {
    "sn": "single view, no prior",
    "sw": "single view, with prior",
    "mn": "multi-view, no prior",
    "mw": "multi-view, with prior",
}


def _text(value) -> str | None:
    """A table cell as text, None for null/NaN/empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value)
    return value if value.strip() else None


def _int(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


# --- evidence spans ------------------------------------------------------------------------------------


def locate(
    section_texts: Mapping[str, str | None], section, start, end, evidence
) -> tuple[str, int, int] | None:
    """(section, start, end) of a finding's evidence in the report, or None when it cannot be found.

    The stored span is used when it lies inside its section's text; otherwise (LLM rows carry a quote,
    not offsets) the quote is searched, case-insensitively, in its section and then in the others.
    """
    section, start, end, evidence = _text(section), _int(start), _int(end), _text(evidence)
    text = section_texts.get(section) if section else None
    if text and start is not None and end is not None and 0 <= start < end <= len(text):
        return section, start, end
    if not evidence:
        return None
    needle = evidence.lower()
    order = ([section] if section in section_texts else []) + [s for s in SPAN_SECTIONS if s != section]
    for name in order:
        text = section_texts.get(name)
        at = text.lower().find(needle) if text else -1
        if at >= 0:
            return name, at, at + len(evidence)
    return None


def segments(text: str, spans: Iterable[tuple[int, int, int]]) -> list[list]:
    """``text`` cut at every span boundary: ``[piece, covering item numbers, numbers ending here]``.

    Spans may overlap or coincide ("no effusion or pneumothorax" can carry two findings); a piece lists
    every span covering it, so the page colours it and labels each span once, at its end.
    """
    spans = [(s, e, n) for s, e, n in spans if 0 <= s < e <= len(text)]
    cuts = sorted({0, len(text), *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    out: list[list] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        covering = [n for s, e, n in spans if s <= a and e >= b]
        ending = [n for s, e, n in spans if e == b]
        if out and not covering and not out[-1][1]:
            out[-1][0] += text[a:b]  # join plain text
        else:
            out.append([text[a:b], covering, ending])
    return out


def finding_items(study_id: int, sections: Mapping[str, str | None], findings: Iterable[Mapping]):
    """(finding items in report order, numbered 1..n; spans per section as (start, end, number))."""
    located = {}
    for row in findings:
        where = locate(sections, row["section"], row["start"], row["end"], row["evidence"])
        section = where[0] if where else _text(row["section"])
        item_id = f"f:{study_id}:{row['name']}:{section or '-'}:{where[1] if where else '-'}"
        if item_id in located:  # the same name twice at the same place is one judgement
            continue
        item = {
            "id": item_id,
            "kind": "finding",
            "study_id": study_id,
            "name": row["name"],
            "raw_name": _text(row["raw_name"]),
            "presence": row["presence"],
            "location": _text(row["location"]),
            "level": _text(row["level"]),
            "type": _text(row["type"]),
            "change": _text(row["change"]),
            "section": section,
            "evidence": _text(row["evidence"]),
            "source": _text(row["source"]),
            "flags": [f for f in (_text(row["flags"]) or "").split(";") if f],
            "located": where is not None,
        }
        located[item_id] = (item, where)
    order = sorted(
        located.values(),
        key=lambda iw: (
            SHOWN_SECTIONS.index(iw[0]["section"]) if iw[0]["section"] in SHOWN_SECTIONS else 99,
            iw[1][1] if iw[1] else 0,
        ),
    )
    items, spans = [], {}
    for n, (item, where) in enumerate(order, start=1):
        item["n"] = n
        items.append(item)
        if where:
            spans.setdefault(where[0], []).append((where[1], where[2], n))
    return items, spans


def report_sections(section_row: Mapping[str, object], spans: Mapping[str, list]) -> list[dict]:
    texts = {name: _text(section_row.get(name)) for name in SHOWN_SECTIONS}
    out = []
    for name in SHOWN_SECTIONS:
        text = texts[name]
        if not text:
            continue
        if name == "history" and texts["indication"] and text.strip() == texts["indication"].strip():
            continue
        if (
            name == "last_paragraph"
            and not spans.get(name)
            and text.strip()
            in {
                (texts["findings"] or "").strip(),
                (texts["impression"] or "").strip(),
            }
        ):
            continue
        out.append({"name": name, "segments": segments(text, spans.get(name, []))})
    return out


# --- questions ---------------------------------------------------------------------------------------------


def question_items(study_id: int, questions: Iterable[Mapping], views: Mapping[str, str]) -> list[dict]:
    return [
        {
            "id": f"q:{row['qa_id']}",
            "kind": "question",
            "study_id": study_id,
            "question_type": row["question_type"],
            "question": row["question"],
            "answer": row["answer"],
            "template_id": row["template_id"],
            "dicom_id": row["dicom_id"],
            "view": views.get(row["dicom_id"]) or None,
        }
        for row in sorted(questions, key=lambda r: r["qa_id"])
    ]


# --- RG4 rewrites ----------------------------------------------------------------------------------------


def word_diff(before: str | None, after: str | None) -> tuple[list[list], list[list]]:
    """Word-level diff of a target: (original pieces, rewritten pieces), each ``[words, mark]``.

    Original marks: "" kept, "del" removed, "rep" rephrased (replaced by other words); rewritten marks:
    "" kept, "add" new wording.
    """
    a, b = (before or "").split(), (after or "").split()
    left: list[list] = []
    right: list[list] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if i2 > i1:
            left.append([" ".join(a[i1:i2]), {"equal": "", "delete": "del", "replace": "rep"}.get(op, "")])
        if j2 > j1:
            right.append([" ".join(b[j1:j2]), "" if op == "equal" else "add"])
    return left, right


def rg4_items(study_id: int, records: Mapping[str, Mapping]) -> list[dict]:
    """One item per distinct rewrite of the study's targets over the scenarios it is in."""
    rules = load_rules()
    groups: dict[tuple, list[str]] = {}
    rows = {}
    for scenario in RG4_SCENARIOS:
        row = records.get(scenario)
        if row is None:
            continue
        key = (_text(row["finding"]), _text(row["impression"]))
        groups.setdefault(key, []).append(scenario)
        rows[scenario] = row
    items = []
    for (finding, impression), scenarios in groups.items():
        row = rows[scenarios[0]]
        orig_f, orig_i = _text(row["original_finding"]), _text(row["original_impression"])
        changed = (orig_f, orig_i) != (finding, impression)
        removes = frozenset().union(*(rules.scenario_removes[s] for s in scenarios))
        found = detect(joined(orig_f, orig_i), removes, rules) if changed else set()
        categories = [c for c in CATEGORY_NAMES if c in found] or (["none"] if not changed else ["other"])
        fields = []
        for name, before, after in (("finding", orig_f, finding), ("impression", orig_i, impression)):
            if before or after:
                left, right = word_diff(before, after)
                fields.append({"name": name, "original": left, "rewritten": right})
        items.append(
            {
                "id": f"rg4:{study_id}:{'+'.join(scenarios)}",
                "kind": "rg4",
                "study_id": study_id,
                "scenarios": scenarios,
                "categories": categories,
                "changed": changed,
                "rewriter": _text(row.get("rewriter")),
                "has_prior": _int(row.get("last_study_id")) is not None,
                "fields": fields,
            }
        )
    return items


# --- the rules' reading where an LLM backend disagrees with it -------------------------------------------


def disagreements(llm: Iterable[Mapping], rules: Iterable[Mapping]) -> list[dict]:
    """Finding names whose presence differs between the LLM's rows and the rules' (either may lack it)."""

    def readings(rows):
        seen: dict[str, set] = {}
        for row in rows:
            seen.setdefault(row["name"], set()).add(row["presence"])
        return {name: "/".join(sorted(p)) for name, p in seen.items()}

    a, b = readings(llm), readings(rules)
    return [
        {"name": name, "llm": a.get(name), "rules": b.get(name)}
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name)
    ]
