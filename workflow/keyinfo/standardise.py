"""Standardise LLM key information onto ``libs/``: names, presence and attributes, with an audit trail.

Two input shapes:

* ``fmt="findings"`` — our LLM JSON: ``{"findings": [{"name", "presence", "location", "level", "type",
  "change", "evidence"}]}``;
* ``fmt="vqa"`` — a Medical-CXR-VQA KeyInfo record (``entity`` / ``uncertain_entity`` / ``no_entity`` /
  ``opacity_vs_clear``), including the malformed shapes their models emit: categories given as a string or a
  list, list-valued entities, flattened ``{"description": ...}`` objects, entities nested inside entities,
  ``"k: v"`` attribute strings, attribute words inside names ("left-sided pleural effusion").

Names: exact canonical -> synonym (libs surface form) -> contained (the name is a phrase the rules matcher
reads, e.g. "small left apical pneumothorax" or "focal consolidation concerning for pneumonia", which gives
two rows) -> rapidfuzz ratio >= ``fuzzy_cutoff`` against every surface form -> ``unknown`` (kept, flagged).
Attributes: each value is read word by word with the same matcher; a word that belongs to another slot is
moved there ("patchy" given as a level becomes the type); a word no library knows is dropped from the value
and reported as an unknown term. Every change is an audit row (field, before, after, rule).
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import pyarrow as pa
from rapidfuzz import fuzz, process

from workflow.contract import AUDIT, UNKNOWN_TERMS, finding_row, findings_table
from workflow.keyinfo.extract import ATTRS, NEG, POS, UNC, extract_mentions, merge_rows
from workflow.keyinfo.libs import UNKNOWN, Libs, load_libs, norm_phrase

log = logging.getLogger(__name__)
DEFAULT_FUZZY_CUTOFF = 90.0

PRESENCE_WORDS = {
    "positive": POS, "present": POS, "yes": POS, "pos": POS, "true": POS, "definite": POS, "1": POS,
    "entity": POS, "abnormal": POS,
    "negative": NEG, "absent": NEG, "no": NEG, "neg": NEG, "false": NEG, "none": NEG, "0": NEG, "no_entity": NEG,
    "uncertain": UNC, "possible": UNC, "probable": UNC, "equivocal": UNC, "maybe": UNC, "-1": UNC,
    "uncertain_entity": UNC, "suspected": UNC, "indeterminate": UNC,
}  # fmt: skip
# filler words of attribute values that carry no meaning of their own
FILLER = frozenset(
    [
        "the",
        "a",
        "an",
        "of",
        "in",
        "at",
        "on",
        "and",
        "with",
        "to",
        "area",
        "areas",
        "region",
        "regions",
        "side",
        "sides",
        "zone",
        "zones",
        "field",
        "fields",
        "portion",
        "aspect",
        "part",
        "parts",
        "both",
        "sided",
        ",",
        "is",
        "are",
        "appears",
        "seen",
        "noted",
        "level",
        "degree",
        "grade",
        "size",
        "sized",
        "amount",
    ]
)
VQA_CATEGORIES = (("entity", POS), ("uncertain_entity", UNC), ("opacity_vs_clear", None), ("no_entity", NEG))


class Standardiser:
    """Holds the libraries and the fuzzy index; :func:`standardise` uses a cached default instance."""

    def __init__(self, libs: Libs | None = None, fuzzy_cutoff: float = DEFAULT_FUZZY_CUTOFF):
        self.libs = libs or load_libs()
        self.cutoff = float(fuzzy_cutoff)
        self.surfaces = list(self.libs.surface_to_name)
        self._name_cache: dict[str, tuple] = {}

    # ---- names -------------------------------------------------------------------------------------
    def map_name(self, raw: str) -> list[tuple[str, str, dict]]:
        """[(canonical or 'unknown', rule, attributes read from the name)] — usually one, several when a name
        holds several findings."""
        key = norm_phrase(raw)
        hit = self._name_cache.get(key)
        if hit is not None:
            return hit
        libs = self.libs
        if key in libs.findings:
            out = [(key, "exact", {})]
        elif key in libs.surface_to_name:
            name = libs.surface_to_name[key]
            out = [(name, "synonym", self._implied(key))]
        else:
            out = self._contained(key)
            if not out:
                best = process.extractOne(key, self.surfaces, scorer=fuzz.ratio, score_cutoff=self.cutoff)
                if best is not None:
                    out = [(libs.surface_to_name[best[0]], f"fuzzy:{best[1]:.0f}", {})]
                else:
                    out = [(UNKNOWN, "unknown", {})]
        self._name_cache[key] = out
        return out

    def _implied(self, key: str) -> dict:
        tok = self.libs.tokens.get(key)
        if tok is None or not tok.implied:
            return {}
        found = self._read_attr_text(key)
        return {k: v for k, v in found.items() if v}

    def _contained(self, key: str) -> list[tuple[str, str, dict]]:
        mentions = extract_mentions({"findings": key}, self.libs)
        out = []
        for m in mentions:
            attrs = {"location": m.location(self.libs), "level": m.level, "type": m.type, "change": m.change}
            attrs = {k: v for k, v in attrs.items() if v}
            if m.presence != POS:
                attrs["presence"] = m.presence
            out.append((m.name, "contained", attrs))
        return out

    # ---- attributes --------------------------------------------------------------------------------
    def _read_attr_text(self, text: str) -> dict:
        """slot -> canonical value(s) of the words of ``text``; '_unknown' lists words no library knows."""
        libs = self.libs
        norm = norm_phrase(text)
        found: dict = {
            "lat": [],
            "zones": [],
            "structs": [],
            "level": [],
            "type": [],
            "change": [],
            "_unknown": [],
        }
        last = 0
        for m in libs.matcher.finditer(norm):
            if m.lastgroup != "w":
                continue
            self._unknown_words(norm[last : m.start()], found)
            last = m.end()
            tok = libs.tokens[m.group()]
            if tok.is_loc:
                if tok.lat:
                    found["lat"].append(tok.lat)
                found["zones"] += [z for z in tok.zones if z not in found["zones"]]
                found["structs"] += [s for s in tok.structs if s not in found["structs"]]
            if tok.level:
                found["level"].append(tok.level)
            if tok.type and not tok.is_loc:
                found["type"].append(tok.type)
            if tok.change:
                found["change"].append(tok.change)
            if not (tok.is_attr or tok.prep or tok.conj or tok.finding) and tok.phrase not in FILLER:
                found["_unknown"].append(tok.phrase)
        self._unknown_words(norm[last:], found)
        location = self._location(found)
        return {
            "location": location,
            "level": found["level"][0] if found["level"] else None,
            "type": " ".join(dict.fromkeys(found["type"])) or None,
            "change": found["change"][0] if found["change"] else None,
            "_unknown": found["_unknown"],
        }

    def _location(self, found: dict) -> str | None:
        order = self.libs.location_order
        lats = set(found["lat"])
        lat = None
        if lats:
            lat = "bilateral" if "bilateral" in lats or {"left", "right"} <= lats else found["lat"][0]
        parts = (
            ([lat] if lat else [])
            + sorted(found["zones"], key=order.get)
            + sorted(found["structs"], key=order.get)
        )
        return " ".join(parts) or None

    @staticmethod
    def _unknown_words(gap: str, found: dict) -> None:
        words = [w.strip(".,;:()") for w in gap.split()]
        words = [w for w in words if w and w not in FILLER and not w.isdigit()]
        if words:
            found["_unknown"].append(" ".join(words))

    # ---- one finding -------------------------------------------------------------------------------
    def finding(self, item: dict, audit: list[dict], unknown: list[tuple[str, str]]) -> list[dict]:
        """Rows for one finding dict (name, presence, location, level, type, change, evidence)."""
        raw_name = _text(item.get("name"))
        if not raw_name:
            audit.append(_audit("name", json.dumps(item, default=str)[:200], None, "dropped_no_name"))
            return []
        presence_raw = _text(item.get("presence")) or "positive"
        presence = PRESENCE_WORDS.get(norm_phrase(presence_raw).replace(" ", "_"))
        if presence is None:
            presence = PRESENCE_WORDS.get(norm_phrase(presence_raw).split(" ")[0], UNC)
            audit.append(_audit("presence", presence_raw, presence, "presence_word"))
        elif presence != presence_raw:
            audit.append(_audit("presence", presence_raw, presence, "presence_word"))
        # attributes as given, read into slots
        given: dict[str, str | None] = {}
        collected: dict[str, list] = {k: [] for k in ATTRS}
        for field in ATTRS:
            value = _text(item.get(field))
            given[field] = value
            if not value:
                continue
            read = self._read_attr_text(value)
            for slot in ATTRS:
                if read[slot]:
                    collected[slot].append((read[slot], field))
            for word in read["_unknown"]:
                unknown.append((field, word))
                audit.append(_audit(field, value, None, "unknown_word:" + word))
        rows = []
        for name, rule, implied in self.map_name(raw_name):
            if rule != "exact":
                audit.append(_audit("name", raw_name, name, rule))
            if name == UNKNOWN:
                unknown.append(("name", norm_phrase(raw_name)))
            row_presence = presence
            if implied.get("presence") and presence == POS:
                row_presence = implied["presence"]
                audit.append(_audit("presence", presence, row_presence, "from_name"))
            row = {"name": name, "raw_name": _text(item.get("raw_name")) or raw_name, "presence": row_presence,
                   "evidence": _text(item.get("evidence")), "flags": "unknown_name" if name == UNKNOWN else None}  # fmt: skip
            for slot in ATTRS:
                values = collected[slot]
                value = values[0][0] if values else None
                source_field = values[0][1] if values else None
                if value is None and implied.get(slot):
                    value = implied[slot]
                    audit.append(_audit(slot, raw_name, value, "from_name"))
                elif value is not None and source_field != slot:
                    audit.append(_audit(slot, given[source_field], value, f"moved:{source_field}->{slot}"))
                elif value is not None and value != given[slot]:
                    audit.append(_audit(slot, given[slot], value, "normalised"))
                if given[slot] and not any(f == slot for _, f in values) and value is None:
                    pass  # the whole value was unknown words: already audited
                row[slot] = value
            if row_presence == NEG and row["change"] not in (None, "resolved"):
                audit.append(_audit("change", row["change"], None, "negative_finding"))
                row["change"] = None
            rows.append(row)
        return rows


def _text(value) -> str | None:
    """Flatten an attribute/name value of any JSON shape into one string (None when empty)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        parts = [_text(v) for v in value]
        return " ".join(p for p in parts if p) or None
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if k == "number":
                continue
            parts.append(
                _text(v)
                if k in ("location", "level", "type", "description", "value")
                else f"{k} {_text(v) or ''}"
            )
        return " ".join(p.strip() for p in parts if p and p.strip()) or None
    return str(value)


def _audit(field: str, before, after, rule: str) -> dict:
    return {"field": field, "before": None if before is None else str(before),
            "after": None if after is None else str(after), "rule": rule}  # fmt: skip


# ---- Medical-CXR-VQA record shapes -----------------------------------------------------------------------
def _parse_kv_string(value: str):
    """'location: left, level: small' -> dict; anything else unchanged."""
    if ":" not in value:
        return value
    out = {}
    for part in value.split(","):
        k, sep, v = part.partition(":")
        if not sep:
            return value.replace(":", " ")
        out[k.strip().lower()] = v.strip() or None
    return out


def vqa_items(record: dict, audit: list[dict]) -> list[dict]:
    """Finding dicts (our shape) of one Medical-CXR-VQA KeyInfo record, whatever shape its categories have."""
    items: list[dict] = []
    for cat, presence in VQA_CATEGORIES:
        value = record.get(cat)
        if value is None or value == {} or value == []:
            continue
        if (
            value == "error"
            or isinstance(value, str)
            and cat != "no_entity"
            and value.strip().lower() == "error"
        ):
            audit.append(_audit("shape", f"{cat}=error", None, "llm_error"))
            continue
        if cat == "no_entity":
            items += _no_entity_items(value, audit)
            continue
        if isinstance(value, str):
            audit.append(_audit("shape", f"{cat}={value!r}", "entity dict", "string_category"))
            value = {value: {}}
        if isinstance(value, list):
            audit.append(_audit("shape", f"{cat}=list", "entity dict", "list_category"))
            value = _list_to_entities(value)
        if not isinstance(value, dict):
            audit.append(_audit("shape", f"{cat}={type(value).__name__}", None, "dropped_bad_category"))
            continue
        if "description" in value and isinstance(value["description"], str):
            audit.append(_audit("shape", f"{cat}.description", value["description"], "description_object"))
            value = {value["description"]: {k: v for k, v in value.items() if k != "description"}}
        for name, attrs in _entities(value, audit):
            if cat == "opacity_vs_clear":
                key = norm_phrase(name)
                if key == "clear":
                    items.append({"name": "lung opacity", "raw_name": "clear", "presence": NEG, **attrs})
                    continue
                if key != "opacity":
                    audit.append(
                        _audit("shape", f"opacity_vs_clear.{name}", name, "entity_in_opacity_vs_clear")
                    )
                items.append({"name": name, "presence": POS, **attrs})
                continue
            items.append({"name": name, "presence": presence, **attrs})
    return items


def _no_entity_items(value, audit) -> list[dict]:
    if isinstance(value, str):
        audit.append(_audit("shape", "no_entity=str", "list", "string_category"))
        value = [v for v in value.split(",")]
    elif isinstance(value, dict):
        audit.append(_audit("shape", "no_entity=dict", "list", "dict_no_entity"))
        value = [k for k in value if k not in ("location", "level", "type")]
    out = []
    for v in value if isinstance(value, list) else []:
        if isinstance(v, dict):
            v = v.get("description") or v.get("name") or v.get("entity") or next(iter(v), None)
        name = _text(v)
        if name:
            out.append({"name": name, "presence": NEG})
    return out


def _list_to_entities(items: list) -> dict:
    out: dict = {}
    for item in items:
        if isinstance(item, str):
            out.setdefault(item, {})
        elif isinstance(item, dict):
            name = item.get("description") or item.get("name") or item.get("entity")
            rest = {k: v for k, v in item.items() if k not in ("description", "name", "entity")}
            if name is None and "type" in item:
                name, rest = item["type"], {k: v for k, v in rest.items() if k != "type"}
            if name is None and len(item) == 1:
                name, rest = next(iter(item.items()))
                rest = rest if isinstance(rest, dict) else {"location": rest}
            if name is not None:
                out.setdefault(_text(name), rest)
    return out


ATTR_KEYS = ("location", "level", "type")


def _entities(value: dict, audit: list[dict]):
    """(name, {location, level, type}) pairs of an entity dict, lifting nested entities to the top level."""
    queue = list(value.items())
    while queue:
        name, attrs = queue.pop(0)
        if name is None or norm_phrase(str(name)) in (
            "location",
            "level",
            "type",
            "left lung",
            "right lung",
            "",
        ):
            audit.append(_audit("shape", str(name), None, "dropped_attribute_as_entity"))
            continue
        if isinstance(attrs, str):
            attrs = _parse_kv_string(attrs)
            if isinstance(attrs, str):
                audit.append(_audit("shape", f"{name}={attrs!r}", "attributes", "string_value"))
                attrs = {"location": attrs}
        elif isinstance(attrs, list):
            audit.append(_audit("shape", f"{name}=list", "attributes", "list_value"))
            merged: dict = {k: [] for k in ATTR_KEYS}
            for a in attrs:
                if isinstance(a, dict):
                    for k in ATTR_KEYS:
                        if a.get(k):
                            merged[k].append(a[k])
                elif a is not None:
                    merged["location"].append(a)
            attrs = merged
        elif not isinstance(attrs, dict):
            attrs = {}
        flat = {}
        lifted = 0
        for k, v in attrs.items():
            kl = str(k).lower()
            if kl in ATTR_KEYS or kl == "change":
                if isinstance(v, str):
                    v = _parse_kv_string(v)
                flat[kl] = v
            elif isinstance(v, dict):
                audit.append(_audit("shape", f"{name}.{k}", str(k), "lifted_nested_entity"))
                queue.append((k, v))
                lifted += 1
            elif kl in ("description", "name"):
                continue
            elif v is not None:
                audit.append(_audit("shape", f"{name}.{k}", "type", "unknown_attribute_key"))
                flat.setdefault("type", [])
                flat["type"] = [*([flat["type"]] if isinstance(flat["type"], str) else flat["type"]), str(v)]
        if lifted and not any(flat.values()):
            audit.append(_audit("shape", str(name), None, "dropped_empty_parent"))
            continue
        yield str(name), flat


# ---- public API --------------------------------------------------------------------------------------------
_DEFAULT: dict[float, Standardiser] = {}


def get_standardiser(fuzzy_cutoff: float = DEFAULT_FUZZY_CUTOFF) -> Standardiser:
    if fuzzy_cutoff not in _DEFAULT:
        _DEFAULT[fuzzy_cutoff] = Standardiser(fuzzy_cutoff=fuzzy_cutoff)
    return _DEFAULT[fuzzy_cutoff]


def standardise(record: dict, fmt: str = "findings", fuzzy_cutoff: float = DEFAULT_FUZZY_CUTOFF,
                merge: bool = True) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(finding rows, audit rows) of one LLM answer; rows carry name, raw_name, presence, location, level,
    type, change, evidence, flags ('unknown_name' when the name maps to nothing). Ids are the caller's.

    ``merge`` merges rows of the same finding and side like the rules backend (left and right stay two).
    """
    std = get_standardiser(fuzzy_cutoff)
    audit: list[dict] = []
    unknown: list[tuple[str, str]] = []
    if fmt == "findings":
        items = record.get("findings") if isinstance(record, dict) else record
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            audit.append(_audit("shape", type(items).__name__, None, "no_findings_list"))
            items = []
    elif fmt == "vqa":
        items = vqa_items(record, audit)
    else:
        raise ValueError(f"fmt must be 'findings' or 'vqa', not {fmt!r}")
    rows: list[dict] = []
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            audit.append(_audit("shape", repr(item)[:200], None, "dropped_not_an_object"))
            continue
        rows += std.finding(item, audit, unknown)
    if merge:
        n = len(rows)
        rows = merge_rows(rows)
        if len(rows) < n:
            audit.append(_audit("shape", f"{n} rows", f"{len(rows)} rows", "merged_duplicates"))
    return rows, audit


def unknown_terms(audit: pa.Table | list[dict], fuzzy_index: Standardiser | None = None) -> pa.Table:
    """The unknown-terms report (contract.UNKNOWN_TERMS), most frequent first, from audit rows."""
    rows = audit.to_pylist() if isinstance(audit, pa.Table) else audit
    counts: Counter = Counter()
    studies: dict[tuple, set] = {}
    for r in rows:
        rule = r["rule"]
        if rule == "unknown" and r["field"] == "name":
            key = ("name", norm_phrase(r["before"] or ""))
        elif rule.startswith("unknown_word:"):
            key = (r["field"], rule.split(":", 1)[1])
        else:
            continue
        counts[key] += 1
        studies.setdefault(key, set()).add(r.get("study_id"))
    std = fuzzy_index or get_standardiser()
    attr_values = {slot: sorted({*std.libs.slot_words.get(slot, {})}) for slot in ("level", "type", "change")}
    loc_words = sorted(t.phrase for t in std.libs.tokens.values() if t.is_loc)
    out = {f.name: [] for f in UNKNOWN_TERMS}
    for (kind, term), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        choices = (
            std.surfaces if kind == "name" else loc_words if kind == "location" else attr_values.get(kind, [])
        )
        best = process.extractOne(term, choices, scorer=fuzz.ratio) if choices else None
        out["kind"].append(kind)
        out["term"].append(term)
        out["count"].append(n)
        out["n_studies"].append(len(studies[(kind, term)]))
        out["closest"].append(best[0] if best else None)
        out["closest_score"].append(float(best[1]) if best else None)
    return pa.Table.from_pydict(out, schema=UNKNOWN_TERMS)


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """A contract table from row dicts; a column a row lacks is null."""
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)


def standardise_many(records, fmt: str, fuzzy_cutoff: float = DEFAULT_FUZZY_CUTOFF, source: str = "llm",
                     round_: int | None = None):  # fmt: skip
    """Standardise (subject_id, study_id, record) triples -> (FINDINGS, AUDIT, UNKNOWN_TERMS) tables."""
    all_rows, all_audit = [], []
    for subject_id, study_id, record in records:
        rows, audit = standardise(record, fmt, fuzzy_cutoff)
        ids = {"subject_id": subject_id, "study_id": study_id}
        all_rows += [finding_row(**row, **ids, source=source, round=round_) for row in rows]
        all_audit += [{**a, **ids} for a in audit]
    return findings_table(all_rows), rows_table(all_audit, AUDIT), unknown_terms(all_audit)
