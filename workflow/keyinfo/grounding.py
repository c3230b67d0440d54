"""Grounding: trace every LLM finding to the report text and compare it with the rules backend.

Three flags (``FINDINGS.flags``, ';'-joined):

* ``unsupported`` — an LLM finding with no lexical support in the findings/impression text: no surface form
  of its canonical name occurs there (negated or not), its raw name is not found either (rapidfuzz
  ``partial_ratio`` >= ``support_cutoff`` against the text), and its ``evidence`` quote, if any, is not found;
* ``presence_disagrees`` — the LLM's report-level presence of a name differs from the rules';
* ``missed_by_llm`` — a finding the rules found that the LLM output does not name at all (these come back
  as extra rows with ``source='rules'``; they are what the follow-up rounds ask the LLM about).

Flags never change the LLM's values: the follow-up rounds decide.
"""

from __future__ import annotations

from rapidfuzz import fuzz

from workflow.keyinfo.extract import READ_SECTIONS, merge_presence, normalise
from workflow.keyinfo.libs import UNKNOWN, load_libs, norm_phrase

UNSUPPORTED, DISAGREES, MISSED = "unsupported", "presence_disagrees", "missed_by_llm"


def _add_flag(row: dict, flag: str) -> None:
    flags = [f for f in (row.get("flags") or "").split(";") if f]
    if flag not in flags:
        flags.append(flag)
    row["flags"] = ";".join(flags)


def lexical_names(sections: dict[str, str | None]) -> tuple[set[str], str]:
    """(canonical names with a surface form or anchor in findings/impression, the normalised text)."""
    libs = load_libs()
    texts = [sections.get(s) or "" for s in READ_SECTIONS]
    if not any(texts):
        texts = [sections.get("last_paragraph") or ""]
    norm = normalise(" . ".join(texts))
    names: set[str] = set()
    for m in libs.matcher.finditer(norm):
        if m.lastgroup != "w":
            continue
        g = m.group()
        tok = libs.tokens.get(g) or libs.tokens[" ".join(g.split())]
        if tok.finding:
            names.add(tok.finding)
        names.update(tok.anchors)
    return names, " ".join(norm.split())


def ground(llm_rows: list[dict], rules_rows: list[dict], sections: dict[str, str | None], *,
           support_cutoff: float) -> list[dict]:  # fmt: skip
    """LLM rows of ONE study with grounding flags, followed by the rules rows the LLM missed (flagged).

    ``support_cutoff`` (config ``keyinfo.support_cutoff``) is the rapidfuzz ``partial_ratio`` a raw name or
    evidence quote must reach against the text to count as support.
    Input rows are not modified; copies are returned.
    """
    names, text = lexical_names(sections)
    rules_presence = merge_presence((r["name"], r["presence"]) for r in rules_rows)
    llm_presence = merge_presence((r["name"], r["presence"]) for r in llm_rows)
    out = []
    for row in llm_rows:
        row = dict(row)
        if not _supported(row, names, text, support_cutoff):
            _add_flag(row, UNSUPPORTED)
        rp = rules_presence.get(row["name"])
        if rp is not None and rp != llm_presence[row["name"]]:
            _add_flag(row, DISAGREES)
        out.append(row)
    for row in rules_rows:
        if row["name"] not in llm_presence:
            row = dict(row)
            row["source"] = "rules"
            _add_flag(row, MISSED)
            out.append(row)
    return out


def _supported(row: dict, names: set[str], text: str, cutoff: float) -> bool:
    if row["name"] != UNKNOWN and row["name"] in names:
        return True
    for quote in (row.get("raw_name"), row.get("evidence")):
        if quote:
            q = norm_phrase(quote)
            if q and (q in text or fuzz.partial_ratio(q, text) >= cutoff):
                return True
    return False
