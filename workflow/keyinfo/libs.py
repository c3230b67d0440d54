"""Load the term libraries in ``libs/`` and compile them into one longest-first matcher.

Everything the rules extractor and the standardiser know about words lives in ``libs/`` as data:
``findings.csv`` (canonical names, Medical-CXR-VQA names, CheXpert classes, surface forms), ``blockers.csv``,
``locations.csv``, ``levels.csv``, ``types.csv``, ``changes.csv``, ``triggers.yaml``, ``anchors.yaml``.
Canonical values must be those of ``libs/vocabulary.yaml``; :func:`load_libs` refuses anything else.

All phrases (findings, attributes, triggers, anchors, predicates, scope words) go into ONE regex built from a
character trie: a single left-to-right scan of a section finds every word of interest, the longest phrase
winning at each position ("pericardial effusion" before "effusion", "no change" before "no").
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from workflow.keyinfo.names import DEVICE

LIBS_DIR = Path(__file__).resolve().parents[2] / "libs"

SIDE_VARIANTS = ("", "left ", "right ", "bilateral ", "both ")
UNKNOWN = "unknown"


class Tok:
    """Every role one matched phrase can play (a phrase may play several: "large" is a level and a predicate)."""

    __slots__ = (
        "phrase",
        "finding",
        "anchors",
        "lat",
        "zones",
        "structs",
        "level",
        "type",
        "change",
        "neg_pre",
        "neg_post",
        "unc_pre",
        "unc_post",
        "soft",
        "hard",
        "alt",
        "prep",
        "conj",
        "pred",
        "implied",
        "is_loc",
        "adverbial",
        "hides",
        "also",
        "causal",
        "request",
        "mimic",
        "scoped",
    )

    def __init__(self, phrase: str):
        self.phrase = phrase
        self.finding: str | None = None
        self.anchors: tuple[str, ...] = ()
        self.lat: str | None = None
        self.zones: tuple[str, ...] = ()
        self.structs: tuple[str, ...] = ()
        self.level = self.type = self.change = None
        self.neg_pre = self.neg_post = self.unc_pre = self.unc_post = False
        self.soft = self.hard = self.alt = self.prep = self.conj = False
        self.pred: str | None = None
        self.implied: dict | None = None  # attributes written inside a finding phrase ("left hemidiaphragm")
        self.is_loc = False
        self.adverbial = False
        # a non-finding phrase one of whose tails starts a longer finding phrase ("no enlargement" and
        # "enlargement of the cardiomediastinal silhouette"): the scan checks whether it hides that finding
        self.hides = False
        self.also: tuple[str, ...] = ()  # further findings one phrase names ("calcified nodule": + granuloma)
        self.causal = False  # a scope breaker that a hedge reaches through ("may be secondary to")
        self.request = False  # "evaluation for", "correlate clinically for": what follows is not a finding
        self.mimic = False  # "nipple shadow", "artifact": explains a finding written before it away
        self.scoped = False  # any role the presence scopes read (set once all roles are known)

    @property
    def is_attr(self) -> bool:
        return self.is_loc or self.level is not None or self.type is not None or self.change is not None


PUNCTUATION = "[.;:!?,/]"  # the sentence and clause marks the matcher yields besides phrases


@dataclass(frozen=True)
class Libs:
    """The compiled libraries; get it from :func:`load_libs` (cached)."""

    findings: tuple[str, ...]
    vqa_name: dict[str, str]
    chexpert: dict[str, str]
    cxr14: dict[str, str]  # canonical name -> ChestX-ray14 class ('' for none)
    surface_to_name: dict[str, str]  # every normalised finding surface form -> canonical name
    blockers: frozenset[str]
    tokens: dict[str, Tok]
    # every phrase (``\b``-bounded, longest first) and punctuation mark as the one group of a pattern, for
    # ``splitter.split``: the text between matches and the matches in one list, no match object per match
    # (the extractor's scan); :attr:`matcher` names the two kinds
    splitter: re.Pattern
    anchor_preds: dict[str, dict[str, str]]  # anchor group -> predicate phrase -> presence
    anchor_window: int
    vocabulary: dict
    location_order: dict[str, int]
    normal_statements: re.Pattern | None = None  # "no acute cardiopulmonary process", "normal chest", ...
    slot_words: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # level/type/change phrase -> canonical

    @functools.cached_property
    def matcher(self) -> re.Pattern:
        """The splitter's matches as group ``w`` (a phrase) or ``p`` (a punctuation mark); compiled when
        first asked for (standardisation, grounding): the rule jobs split only, and a compile of the
        phrases costs ~30 ms."""
        phrases = self.splitter.pattern.removeprefix("(").removesuffix(f"|{PUNCTUATION})")
        return re.compile(rf"(?P<w>{phrases})|(?P<p>{PUNCTUATION})")


def norm_phrase(text: str) -> str:
    """The key a phrase is stored under: lower case, hyphens/slashes/underscores as spaces, single spaces."""
    text = text.lower().replace("-", " ").replace("/", " ").replace("_", " ")
    return " ".join(text.split())


def plural_forms(phrase: str) -> list[str]:
    """Plural of the last word of a finding phrase (regular English and the Latin/Greek endings radiology uses)."""
    head, _, last = phrase.rpartition(" ")
    if last.endswith("sis"):
        forms = [last[:-3] + "ses"]
    elif last.endswith("ax"):
        forms = [last[:-2] + "aces", last + "es"]
    elif last.endswith("y") and not last.endswith(("ay", "ey", "oy")):
        forms = [last[:-1] + "ies"]
    elif last.endswith(("s", "x", "ch", "sh")):
        forms = [last + "es"] if not last.endswith("s") else []
    elif last.endswith("ma"):
        forms = [last + "s", last + "ta"]
    else:
        forms = [last + "s"]
    return [f"{head} {f}".strip() for f in forms]


def _csv(name: str) -> list[dict]:
    with open(LIBS_DIR / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _yaml(name: str, strings: bool = False) -> dict:
    """Parse a libs YAML file; ``strings=True`` keeps every scalar a string (YAML 1.1 reads ``no`` as False)."""
    with open(LIBS_DIR / name, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_STRING_LOADER if strings else _SAFE_LOADER)


# libyaml's loaders where PyYAML was built with it: the same documents, ~9x faster (~20 ms of every job that
# loads the libraries); tests/test_keyinfo.py checks that both read each libs file alike
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STRING_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def trie_regex(phrases) -> str:
    """A regex alternation equivalent to ``phrases`` but shaped as a trie (fast), greedy, so the longest wins.

    A space in a phrase matches one or more spaces in the text.
    """
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        ends_here = "" in node
        branches = []
        for ch in sorted(k for k in node if k):
            esc = " +" if ch == " " else re.escape(ch)
            branches.append(esc + build(node[ch]))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends_here:
            # optional continuation, greedy: the longer phrase is tried first
            return body + "?" if len(branches) == 1 and len(body) == 1 else "(?:" + body + ")?"
        return body

    return build(trie)


def _add(tokens: dict[str, Tok], phrase: str) -> Tok:
    key = norm_phrase(phrase)
    tok = tokens.get(key)
    if tok is None:
        tok = tokens[key] = Tok(key)
    return tok


def _check(value, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"libs: {what} value {value!r} is not in libs/vocabulary.yaml")


def _parse_implied(text: str, attr_tokens: dict[str, Tok]) -> dict:
    """Attributes written inside a finding phrase ("elevated left hemidiaphragm", "calcified nodule")."""
    words = text.split()
    found: dict = {"lat": [], "zones": [], "structs": [], "level": None, "type": None}
    i = 0
    while i < len(words):
        for j in range(len(words), i, -1):
            tok = attr_tokens.get(" ".join(words[i:j]))
            if tok is not None:
                if tok.is_loc:
                    if tok.lat:
                        found["lat"].append(tok.lat)
                    found["zones"] += tok.zones
                    found["structs"] += tok.structs
                found["level"] = found["level"] or tok.level
                found["type"] = found["type"] or tok.type
                i = j
                break
        else:
            i += 1
    return found if any(found.values()) else {}


def _load_locations(tokens: dict[str, Tok], loc_vocab: dict) -> None:
    """locations.csv: location phrases with their laterality, zones and structure."""
    for row in _csv("locations.csv"):
        tok = _add(tokens, row["phrase"])
        tok.is_loc = True
        if row["laterality"]:
            _check(row["laterality"], loc_vocab["laterality"], "laterality")
            tok.lat = row["laterality"]
        tok.zones = tuple(row["zone"].split(" ")) if row["zone"] else ()
        for z in tok.zones:
            _check(z, loc_vocab["zone"], "zone")
        tok.structs = (row["structure"],) if row["structure"] else ()
        for s in tok.structs:
            _check(s, loc_vocab["structure"], "structure")
        tok.adverbial = tok.phrase.endswith("ly") or tok.phrase.startswith("on the")


def _load_slot_words(tokens: dict[str, Tok], fname: str, slot: str, allowed) -> dict[str, str]:
    """levels.csv, types.csv or changes.csv: phrase -> canonical value of that slot."""
    words = {}
    for row in _csv(fname):
        _check(row[slot], allowed, slot)
        tok = _add(tokens, row["phrase"])
        setattr(tok, slot, row[slot])
        words[tok.phrase] = row[slot]
        if slot == "change" and tok.phrase.startswith("no "):
            # "without interval change" says what "no interval change" says (a change word, no negation)
            twin = _add(tokens, "without " + tok.phrase[3:])
            twin.change = row[slot]
            words[twin.phrase] = row[slot]
    return words


@dataclass(frozen=True)
class _FindingsLib:
    """What findings.csv says per canonical finding, and every surface form it names."""

    vqa_name: dict[str, str]
    chexpert: dict[str, str]
    cxr14: dict[str, str]
    surface_to_name: dict[str, str]  # normalised surface form (explicit or generated plural) -> finding
    explicit: dict[str, list[str]]  # surface form -> every finding that lists it explicitly


def _read_findings(names: tuple[str, ...]) -> _FindingsLib:
    """findings.csv: names, classes and surface forms (``{side}`` expanded, regular plurals generated)."""
    vqa_name, chexpert, cxr14, surface_to_name = {}, {}, {}, {}
    explicit: dict[str, list[str]] = {}
    for row in _csv("findings.csv"):
        name = row["name"]
        _check(name, names, "finding")
        vqa_name[name] = row["vqa_name"] or ""
        chexpert[name] = row["chexpert"] or ""
        cxr14[name] = row["cxr14"] or ""
        for syn in row["synonyms"].split(";"):
            syn = syn.strip()
            if not syn:
                continue
            variants = [syn.replace("{side}", s) for s in SIDE_VARIANTS] if "{side}" in syn else [syn]
            for v in variants:
                names_of = explicit.setdefault(norm_phrase(v), [])
                if name not in names_of:
                    names_of.append(name)
                for form in [v, *plural_forms(norm_phrase(v))]:
                    key = norm_phrase(form)
                    if key in surface_to_name and surface_to_name[key] != name:
                        continue  # first listing wins (explicit beats generated plural)
                    surface_to_name[key] = name
    missing = [n for n in names if n not in vqa_name]
    if missing:
        raise ValueError(f"libs/findings.csv lacks canonical findings {missing}")
    return _FindingsLib(vqa_name, chexpert, cxr14, surface_to_name, explicit)


def _add_finding_tokens(tokens: dict[str, Tok], lib: _FindingsLib, attr_tokens: dict[str, Tok]) -> None:
    """One token per surface form, with the attributes its own words imply ("left hemidiaphragm")."""
    for key, name in lib.surface_to_name.items():
        tok = _add(tokens, key)
        tok.finding = name
        implied = _parse_implied(key, attr_tokens)
        if implied:
            # words of the canonical name are not attributes ("interstitial markings" has no type)
            name_words = set(name.split())
            # a structure or zone written in a finding's own name is part of the name ("widening of the
            # mediastinum", "hilar congestion", "elevation of the left hemidiaphragm"): laterality only
            implied["structs"] = []
            implied["zones"] = []
            if implied["type"] and (implied["type"] in name_words or implied["type"] in name):
                implied["type"] = None
            if not any(implied.values()):
                implied = {}
        tok.implied = implied or None
        # a surface form listed under two findings names both ("calcified nodule": nodule and granuloma)
        tok.also = tuple(n for n in lib.explicit.get(key, ()) if n != name)


def _load_blockers(tokens: dict[str, Tok]) -> frozenset[str]:
    """blockers.csv: phrases matched so they hide the findings inside them, naming nothing themselves."""
    blockers = frozenset(
        form
        for r in _csv("blockers.csv")
        for form in (norm_phrase(r["phrase"]), *plural_forms(norm_phrase(r["phrase"])))
    )
    for b in blockers:
        tok = tokens.get(b)
        if tok is not None and tok.finding is not None:
            continue  # a blocker that is itself another finding's synonym ("pericardial effusion")
        tok = _add(tokens, b)
        tok.finding = None  # matched so it hides its sub-phrases, but it names nothing
    return blockers


# triggers.yaml section -> the Tok flag its phrases set
_TRIGGER_FLAGS = {
    "negation_preceding": "neg_pre",
    "negation_following": "neg_post",
    "uncertainty_preceding": "unc_pre",
    "uncertainty_following": "unc_post",
    "clause_boundaries": "hard",
    "scope_breakers": "soft",
    "alternatives": "alt",
    "prepositions": "prep",
}


def _load_triggers(tokens: dict[str, Tok]) -> dict:
    """triggers.yaml: negation, uncertainty and scope words; returns the file (normal statements are read later)."""
    trig = _yaml("triggers.yaml", strings=True)
    for section, attr in _TRIGGER_FLAGS.items():
        for phrase in trig[section]:
            setattr(_add(tokens, str(phrase)), attr, True)
    for phrase in trig["causal_links"]:
        tok = _add(tokens, phrase)
        tok.soft = tok.causal = True
    for phrase in trig["request_preceding"]:
        _add(tokens, phrase).request = True
    for phrase in trig["explanations"]:
        _add(tokens, phrase).mimic = True
    for head in ("clear of", "free of"):  # "grossly clear of", "hypoinflated but clear of"
        for modifier in trig["negation_modifiers"]:
            _add(tokens, f"{modifier} {head}").neg_pre = True
    for phrase in (*trig["pseudo"], *trig["normal_statements"]):
        _add(tokens, phrase)  # plain words; hide the triggers inside them
    for phrase in ("and", "as well as", "plus"):
        _add(tokens, phrase).conj = True
    return trig


def _load_anchors(tokens: dict[str, Tok], names: tuple[str, ...]) -> tuple[dict[str, dict[str, str]], int]:
    """anchors.yaml: anchor phrases ("heart", "silhouette") and their predicates per presence; the window."""
    anchors = _yaml("anchors.yaml", strings=True)
    anchor_preds: dict[str, dict[str, str]] = {}
    for group, spec in anchors["groups"].items():
        _check(group, names, "anchor finding")
        for phrase in spec["phrases"]:
            tok = _add(tokens, phrase)
            tok.anchors = (*tok.anchors, group)
        preds = {}
        for presence in ("positive", "uncertain", "negative"):
            for phrase in spec.get(presence) or []:
                key = norm_phrase(phrase)
                for copula in ("is ", "are "):  # "heart is enlarged": the copula is not part of the predicate
                    if key.startswith(copula):
                        key = key[len(copula) :]
                # "the silhouette is otherwise normal": "otherwise" is a clause boundary, not before a predicate
                for form in (key, f"otherwise {key}") if presence == "negative" else (key,):
                    preds.setdefault(form, presence)
                    _add(tokens, form).pred = form
        anchor_preds[group] = preds
    return anchor_preds, int(anchors.get("window", 9))


@functools.cache
def load_libs() -> Libs:
    """Read and compile ``libs/`` once per process: every file adds its phrases' roles to one token table."""
    vocab = _yaml("vocabulary.yaml")
    names = tuple(vocab["findings"])
    loc_vocab = vocab["location"]
    tokens: dict[str, Tok] = {}

    # attributes first: finding phrases are parsed with them for implied attributes
    _load_locations(tokens, loc_vocab)
    slot_words = {
        slot: _load_slot_words(tokens, fname, slot, vocab[slot])
        for fname, slot in (("levels.csv", "level"), ("types.csv", "type"), ("changes.csv", "change"))
    }
    attr_tokens = dict(tokens)
    findings = _read_findings(names)
    _add_finding_tokens(tokens, findings, attr_tokens)
    blockers = _load_blockers(tokens)
    trig = _load_triggers(tokens)
    anchor_preds, anchor_window = _load_anchors(tokens, names)

    for tok in tokens.values():
        if tok.finding is not None and tok.anchors:
            tok.anchors = ()  # a finding phrase is never also an anchor
    for tok in tokens.values():
        tok.scoped = any(
            (tok.neg_pre, tok.neg_post, tok.unc_pre, tok.unc_post, tok.request, tok.soft, tok.alt)
        )
    _mark_hiding(tokens, blockers)
    phrases = r"\b(?:" + trie_regex(sorted(tokens)) + r")\b"

    location_order = {}
    for i, v in enumerate(loc_vocab["laterality"] + loc_vocab["zone"] + loc_vocab["structure"]):
        location_order.setdefault(v, i)
    return Libs(
        findings=names,
        vqa_name=findings.vqa_name,
        chexpert=findings.chexpert,
        cxr14=findings.cxr14,
        surface_to_name=findings.surface_to_name,
        blockers=blockers,
        tokens=tokens,
        splitter=re.compile(rf"({phrases}|{PUNCTUATION})"),
        anchor_preds=anchor_preds,
        anchor_window=anchor_window,
        vocabulary=vocab,
        location_order=location_order,
        slot_words=slot_words,
        normal_statements=re.compile(
            r"\b(?:" + trie_regex(sorted({norm_phrase(p) for p in trig["normal_statements"]})) + r")\b"
        ),
    )


def _mark_hiding(tokens: dict[str, Tok], blockers: frozenset[str]) -> None:
    """Set ``Tok.hides`` on every multi-word non-finding phrase a tail of which ("enlargement" of "no
    enlargement") is followed, in some finding phrase, by more words ("enlargement of the ...").

    Blockers are left out: they exist to veto the findings inside them ("chest wall mass lesion")."""
    heads = set()  # every proper word prefix of a finding phrase
    for key, tok in tokens.items():
        if tok.finding is not None:
            words = key.split(" ")
            heads.update(" ".join(words[:k]) for k in range(1, len(words)))
    for key, tok in tokens.items():
        if tok.finding is None and " " in key and key not in blockers:
            words = key.split(" ")
            tok.hides = any(" ".join(words[k:]) in heads for k in range(1, len(words)))


NO_FINDING_RULES = ("any", "chexpert")


def no_finding(pairs, rule: str = "any") -> bool:
    """The "No Finding" rule, in one place: no (name, presence) pair that blocks it is positive or uncertain.

    ``any`` (ours: the IU labels, keyinfo/studies.parquet, evaluation): every finding blocks except devices —
    a granuloma or a scoliosis is not a normal study. ``chexpert`` (the CheXpert labeler's, where we write
    files it would have written: the synthetic mimic-cxr chexpert.csv, RaDialog's labels): only findings with
    a CheXpert class other than Support Devices block.
    """
    if rule not in NO_FINDING_RULES:
        raise ValueError(f"no_finding rule must be one of {NO_FINDING_RULES}, not {rule!r}")
    chexpert = load_libs().chexpert
    for name, presence in pairs:
        if presence not in ("positive", "uncertain") or name == DEVICE:
            continue
        if rule == "any" or chexpert.get(name, "") not in ("", "Support Devices"):
            return False
    return True


def vqa_name(name: str) -> str:
    """The Medical-CXR-VQA name of a canonical finding ('' for findings that dataset leaves out, e.g. devices)."""
    libs = load_libs()
    return libs.vqa_name.get(name, name)
