"""The embedded rules extractor: findings + impression text -> rows of the ``findings`` table.

One pass per section: a single compiled longest-first matcher (``libs.load_libs().matcher``) yields every word
of interest in order; sentences and clauses are cut at punctuation and clause-boundary words; in each clause a
finding's presence comes from the nearest trigger before it (NegEx/ConText scopes that stop at scope breakers)
and from backward-looking triggers a few words after it; location, level, type and change are the attribute
words next to it in the same clause. Mentions are then merged per report into instances (left and right
effusion stay two rows; positive > uncertain > negative, attributes filled from mentions of the winning
presence). Presence conventions are documented in ``libs/README.md``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass

from workflow.keyinfo.libs import Libs, Tok, load_libs
from workflow.keyinfo.names import DEVICE, FALLBACK_SECTION, READ_SECTIONS

POS, UNC, NEG = "positive", "uncertain", "negative"
RANK = {POS: 2, UNC: 1, NEG: 0}
PRE_WORDS = 8  # attribute words before a finding
POST_WORDS = 8  # attribute words after a finding
POST_TRIGGER_WORDS = 8  # "X ... is not seen"
ABBREVIATIONS = ("vs", "dr", "e.g", "i.e", "approx", "no", "st", "mr", "mrs", "fig")

_COMMA = Tok(",")
_SLASH = Tok("/")
_SLASH.alt = _SLASH.scoped = True  # "atelectasis/scarring" reads as "atelectasis or scarring"
_DEID = re.compile(r"x{3,}|_{2,}|\[\*\*[^\]]*\*\*\]")
_RULE_OUT = re.compile(r"\br/o\b")


def normalise(text: str) -> str:
    """Lower-cased copy of ``text`` with the SAME length, so match offsets index the original text."""
    low = text.lower()
    if len(low) != len(text):  # a few Unicode capitals lower to two characters
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    if "xxx" in low or "__" in low or "[**" in low:  # substring tests are far cheaper than the regex scan
        low = _DEID.sub(lambda m: " " * len(m.group()), low)
    if "/" in low:
        low = _RULE_OUT.sub("r o", low)
    # (str.replace is several times faster than str.translate)
    return low.replace("-", " ").replace("\n", " ").replace("\t", " ").replace("\r", " ").replace("_", " ")


class Mention:
    """A finding named in a clause, with what the clause says about it (offsets in the normalised text)."""

    __slots__ = ("name", "raw", "presence", "lat", "zones", "structs", "level", "type", "change", "start", "end",
                 "section", "from_anchor", "also", "ev_start", "ev_end", "evidence")  # fmt: skip

    def __init__(self, name, raw, start, end, section):
        self.name, self.raw, self.start, self.end, self.section = name, raw, start, end, section
        self.presence = POS
        self.lat: set[str] = set()
        self.zones: list[str] = []
        self.structs: list[str] = []
        self.level = self.type = self.change = None
        self.from_anchor = False
        self.also: tuple[str, ...] = ()
        # the finding's noun phrase with the attribute words it took ("small left pleural effusion")
        self.ev_start, self.ev_end = start, end
        self.evidence: str | None = None

    def add_loc(self, tok: Tok) -> None:
        if tok.lat:
            self.lat.add(tok.lat)
        for zone in tok.zones:
            if zone not in self.zones:
                self.zones.append(zone)
        for struct in tok.structs:
            if struct not in self.structs:
                self.structs.append(struct)

    def laterality(self) -> str | None:
        if not self.lat:
            return None
        if "bilateral" in self.lat or {"left", "right"} <= self.lat:
            return "bilateral"
        return next(iter(self.lat))

    def location(self, libs: Libs) -> str | None:
        if self.name == "support device":
            return None  # where a device sits is not a finding location
        order = libs.location_order
        parts = (
            ([self.laterality()] if self.lat else [])
            + sorted(self.zones, key=order.get)
            + sorted(self.structs, key=order.get)
        )
        return " ".join(parts) or None


# What a clause holds as a whole, OR-ed over its tokens by the scan (:func:`_scan`), so that the readings that
# only matter when a clause holds some role (a scope trigger, a list comma, a mimic, ...) are skipped
# without walking the clause again.
HEAD, SCOPED, LIST, CAUSAL, CHANGE, MIMIC, ALT = 1, 2, 4, 8, 16, 32, 64


def _marks(tok: Tok) -> int:
    return (
        (HEAD if tok.finding or tok.anchors else 0)
        | (SCOPED if tok.scoped else 0)
        | (LIST if tok is _COMMA else 0)
        | (CAUSAL if tok.causal else 0)
        | (CHANGE if tok.change is not None else 0)
        | (MIMIC if tok.mimic else 0)
        | (ALT if tok.alt else 0)
    )


# how the scan treats a match: a word of interest or a list mark (, /), a phrase that may hide a finding, a
# clause boundary word, a period, other sentence or clause punctuation (; : ! ?)
_WORD, _HIDES, _HARD, _PERIOD, _STOP = range(5)
_SCAN_TABLE: list = [None, None]  # the Libs of the last table built, and the table


def _scan_table(libs: Libs) -> dict[str, tuple[int, int, Tok]]:
    """Every phrase (with single spaces) and punctuation mark the matcher yields -> (how the scan treats
    it, its marks, its Tok); built when the Libs differs from the last one's."""
    if _SCAN_TABLE[0] is libs:
        return _SCAN_TABLE[1]
    table = {
        phrase: (_HIDES if tok.hides else _HARD if tok.hard else _WORD, _marks(tok), tok)
        for phrase, tok in libs.tokens.items()
    }
    table[","] = (_WORD, _marks(_COMMA), _COMMA)
    table["/"] = (_WORD, _marks(_SLASH), _SLASH)
    table["."] = (_PERIOD, 0, None)
    for ch in ";:!?":
        table[ch] = (_STOP, 0, None)
    _SCAN_TABLE[:] = [libs, table]
    return table


def _scan(norm: str, libs: Libs) -> list[tuple[int, list[tuple[int, int, Tok]]]]:
    """Clauses of (start, end, Tok), each with its marks (``HEAD | SCOPED | ...`` of its tokens): the
    matcher's tokens cut at sentence ends, ';', ':' and boundary words.

    The matcher takes the leftmost phrase, longest first; a finding phrase that starts inside a longer
    non-finding phrase and ends after it would be hidden ("no enlargement" + "of the cardiomediastinal
    silhouette" hides "enlargement of the cardiomediastinal silhouette"), so such a phrase (``Tok.hides``)
    is cut where the finding starts: its head is matched again on its own ("no") and the scan resumes at
    the finding.
    """
    table = _SCAN_TABLE[1] if _SCAN_TABLE[0] is libs else _scan_table(libs)
    # the matches from ``split`` (gap, match, gap, ..., gap), their offsets summed from the lengths: no
    # match object per match. Every match is one character at least, so they are finditer's; a text cut
    # where a phrase starts (``norm[pos:]``, ``norm[s:cut]``) reads the same from there, as ``\b`` saw no
    # word character before it either.
    split = libs.splitter.split
    clauses: list[tuple[int, list[tuple[int, int, Tok]]]] = []
    cur: list[tuple[int, int, Tok]] = []
    marks = 0
    pos: int | None = 0
    while pos is not None:
        resume = None
        parts = iter(split(norm[pos:]) if pos else split(norm))
        at = pos + len(next(parts))  # (pos is a phrase's start when the scan resumes)
        for g, gap in zip(parts, parts, strict=False):  # (the matches and the gaps after them)
            s = at
            e = s + len(g)
            at = e + len(gap)
            entry = table.get(g)
            if entry is None:  # a phrase matched over a run of spaces
                entry = table[" ".join(g.split())]
            kind, tok_marks, tok = entry
            if not kind:  # _WORD
                cur.append((s, e, tok))
                marks |= tok_marks
                continue
            if kind == _PERIOD:
                nxt = norm[e : e + 1]
                if nxt and not nxt.isspace():
                    continue  # decimal point, "x.ray", abbreviation without space
                word = norm[max(0, s - 6) : s].rsplit(" ", 1)[-1]
                if word in ABBREVIATIONS and not (word == "no" and nxt == ""):
                    continue
            elif kind == _HIDES:
                cut = _finding_start_inside(norm, s, e, libs)
                if cut is not None:
                    # the head holds words only (phrases have no punctuation); it is not cut again
                    head = iter(split(norm[s:cut]))
                    h_at = s + len(next(head))
                    for h, h_gap in zip(head, head, strict=False):
                        htok = _tok(h, libs.tokens)
                        if htok.hard:
                            if cur:
                                clauses.append((marks, cur))
                                cur, marks = [], 0
                        else:
                            cur.append((h_at, h_at + len(h), htok))
                            marks |= _marks(htok)
                        h_at += len(h) + len(h_gap)
                    resume = cut
                    break
                if not tok.hard:
                    cur.append((s, e, tok))
                    marks |= tok_marks
                    continue
            if cur:  # a sentence end, a clause punctuation mark or a boundary word
                clauses.append((marks, cur))
                cur, marks = [], 0
        pos = resume
    if cur:
        clauses.append((marks, cur))
    return clauses


def _tok(g: str, tokens: dict[str, Tok]) -> Tok:
    return tokens.get(g) or tokens[" ".join(g.split())]


def _finding_start_inside(norm: str, s: int, e: int, libs: Libs) -> int | None:
    """Offset of the first word inside the phrase at ``[s, e)`` where a finding phrase starts that ends after ``e``."""
    for inner in _INNER_WORD.finditer(norm, s, e):
        start = inner.end()
        # (a punctuation mark inside the phrase would end at e at the latest: a match past e is a phrase)
        hit = libs.splitter.match(norm, start)
        if hit is not None and hit.end() > e and _tok(hit.group(), libs.tokens).finding:
            return start
    return None


_INNER_WORD = re.compile(r" +(?=\S)")


def _words(norm: str, a: int, b: int) -> int:
    """Words between two offsets, plus one (runs of spaces left by de-identification count once)."""
    return len(norm[a:b].split()) + 1 if b > a else 0


def _beyond(norm: str, a: int, b: int, limit: int) -> bool:
    """``_words(norm, a, b) > limit``, counted only when it can be: ``b - a`` characters hold at most
    ``(b - a + 1) // 2`` words, so a gap of fewer than ``2 * limit - 1`` characters is never beyond."""
    return b - a >= 2 * limit - 1 and b > a and len(norm[a:b].split()) + 1 > limit


ABSENT = "absent"  # a request or a mimic: the mention is no finding at all


@dataclass(frozen=True)
class Conventions:
    """The documented, configurable readings (``keyinfo.alternatives`` / ``keyinfo.hedges`` in config.yaml).

    ``alternatives``: "X or Y" in a plain statement → both ``uncertain`` (CheXpert's reading, the default)
    or both ``positive`` (NegBio's). ``hedges``: "possible X", "X cannot be excluded" → ``uncertain`` (the
    default) or ``positive`` (U-Ones at the source). Negations are never affected.
    """

    alternatives: str = "uncertain"
    hedges: str = "uncertain"

    def __post_init__(self):
        for key in ("alternatives", "hedges"):
            if getattr(self, key) not in (UNC, POS):
                raise ValueError(
                    f"keyinfo.{key} must be 'uncertain' or 'positive', not {getattr(self, key)!r}"
                )


DEFAULT_CONVENTIONS = Conventions()


class Scope:
    """Presence of every mention of one clause from the triggers around it, in linear time.

    Backward: the nearest forward-looking trigger before a mention decides, walking back over list items;
    the walk stops at a scope breaker and at a new noun phrase after a comma (``No pneumothorax, small
    left effusion``) unless a coordinator closes the list (``No consolidation, large effusion, or
    pneumothorax`` is one negated list). A causal link (``due to``) stops a negation but not a hedge.
    Forward: a backward-looking trigger a few words after a mention, or after the list it ends
    (``Consolidation, atelectasis, and effusion ... have cleared``), overrides.

    Both walks are memoised per clause position (each step's answer is the next step's), so a clause of
    any length costs O(tokens): one malformed run-on report cannot stall the stage.
    """

    __slots__ = ("clause", "norm", "toks", "closed", "_back", "_back_unc", "_fwd")

    def __init__(self, clause, norm: str, marks: int):
        self.clause = clause
        self.norm = norm
        self.toks = toks = [c[2] for c in clause]
        n = len(clause)
        self.closed = self._closed_lists() if marks & LIST else None
        self._back: list[str | None] = [None] * n
        self._back_unc: list[str | None] = [None] * n
        self._fwd: list[str | None] = [None] * n
        back, back_unc = self._back, self._back_unc
        causal = marks & CAUSAL  # the hedge-only walk is read only past a causal link
        for k in range(n):  # left to right: f(k) needs f(k - 1) only
            back[k] = self._step(k, False)
            if causal:
                back_unc[k] = self._step(k, True)
        fwd = self._fwd
        for k in range(n - 1, -1, -1):  # right to left: g(k) needs g at the next finding only
            if toks[k].finding or toks[k].anchors:
                fwd[k] = self._forward(k)

    def _closed_lists(self) -> list[bool]:
        """closed[k]: the comma at k sits in a list that a coordinator (or / nor / and) closes.

        Read right to left: a comma is closed when, before anything else than list items (findings,
        attribute words, prepositions, commas), an ``or`` / ``nor`` / ``and`` follows and the item after it
        does not open a new positive noun phrase of its own (``..., small effusion and mild atelectasis``)."""
        toks = self.toks
        n = len(toks)
        closed = [False] * n
        state = False  # is there a closing coordinator ahead, reachable over list items only?
        for k in range(n - 1, -1, -1):
            tok = toks[k]
            if tok is _COMMA:
                closed[k] = state
            elif tok.alt or tok.phrase == "nor":
                state = True
            elif tok.conj:
                nxt = toks[k + 1] if k + 1 < n else None
                state = nxt is not None and nxt.level is None and nxt.change is None
            elif tok.finding or tok.anchors or tok.is_attr or tok.prep:
                pass
            else:
                state = False
        return closed

    def _step(self, k: int, unc_only: bool) -> str | None:
        """The walk's answer examining position k and then leftwards (None: nothing governs, positive)."""
        toks = self.toks
        memo = self._back_unc if unc_only else self._back
        prev = memo[k - 1] if k > 0 else None
        tok = toks[k]
        if tok is _COMMA:
            nxt = toks[k + 1] if k + 1 < len(toks) else None
            if nxt is not None and (nxt.level is not None or nxt.change is not None) and not self.closed[k]:  # type: ignore[index]
                return None  # ", small left effusion": a new noun phrase, outside the negation
            return prev
        if tok.neg_pre:
            return None if unc_only else NEG
        if tok.unc_pre:
            return UNC
        if tok.request:
            return ABSENT
        if tok.soft:
            if tok.causal:
                return self._back_unc[k - 1] if k > 0 else None
            return None
        if tok.alt and k + 1 < len(toks) and toks[k + 1].neg_pre:
            return None
        return prev

    def _forward(self, k: int) -> str | None:
        """NEG / UNC from a backward-looking trigger after position k (chained over following list items)."""
        clause, norm = self.clause, self.norm
        end = clause[k][1]
        for j in range(k + 1, len(clause)):
            s, _, tok = clause[j]
            if _beyond(norm, end, s, POST_TRIGGER_WORDS):
                return None
            if tok.neg_post:
                return NEG
            if tok.unc_post:
                if tok.unc_pre and _finding_follows(clause, j):
                    return None  # "possible" before the next finding belongs to it
                return UNC
            if tok.neg_pre or tok.unc_pre or tok.soft or tok.request:
                return None
            if tok.finding:
                return self._fwd[j]  # the list goes on: what follows it speaks for the whole list
        return None

    def presence(self, i: int, conv: Conventions = DEFAULT_CONVENTIONS) -> str:
        """positive / uncertain / negative, or ABSENT for a mention a request names."""
        toks = self.toks
        if i == 0:
            before = None
        elif toks[i - 1] is _COMMA:  # the comma right before a mention never opens a new phrase
            before = self._back[i - 2] if i > 1 else None
        else:
            before = self._back[i - 1]
        presence = before or POS
        if presence == ABSENT:
            return ABSENT
        after = self._fwd[i]
        if after == NEG:
            presence = NEG
        elif after == UNC and presence == POS:
            presence = UNC
        if presence == UNC and conv.hedges == POS:
            presence = POS
        return presence


def _finding_follows(clause, j: int) -> bool:
    """A finding (or anchor) follows the trigger at j within the few tokens a hedge reaches forward."""
    for k in range(j + 1, min(len(clause), j + 1 + POST_TRIGGER_WORDS)):
        tok = clause[k][2]
        if tok.finding or tok.anchors:
            return True
        if tok.soft or tok is _COMMA or tok.neg_pre:
            return False
    return False


def _anchor_predicate(clause, i: int, norm: str, libs: Libs, group: str):
    """(presence, level, predicate token index, negated) for an anchor, or None when nothing is said about it.

    ``negated``: a negation stands between the anchor and a positive or uncertain predicate, over degree
    words ("the heart is not significantly enlarged")."""
    preds = libs.anchor_preds[group]
    start = clause[i][0]
    end = clause[i][1]
    level = None
    negated = False
    for j in range(i + 1, len(clause)):
        s, _, tok = clause[j]
        if _beyond(norm, end, s, libs.anchor_window):
            break
        found = _pred_lookup(preds, tok.pred) if tok.pred else None
        if found and not (tok.finding or _attr_of_next_finding(clause, j)):
            first = libs.tokens.get(tok.pred.split(" ", 1)[0])
            return found, level or (first.level if first else None), j, negated and found != NEG
        if tok.finding or tok.soft and not tok.pred:
            break
        if tok.neg_pre and not tok.pred:
            negated = True
        if tok.level is not None:
            level = tok.level
    for j in range(i - 1, -1, -1):
        s, e, tok = clause[j]
        if _beyond(norm, e, start, 4):
            break
        found = _pred_lookup(preds, tok.pred) if tok.pred else None
        if found:
            return found, tok.level, j, False
        if tok is _COMMA and j > 0 and clause[j - 1][2].anchors:
            continue  # "normal cardiac size, mediastinum, and vasculature": one predicate, a list of anchors
        if tok.finding or tok is _COMMA:
            break  # other anchors are passed over: "normal heart size and mediastinal contours"
    return None


def _pred_lookup(preds: dict[str, str], phrase: str) -> str | None:
    """Presence of a predicate phrase for one anchor group; predicates are matched globally (longest
    first), so a group may only know a shorter head of the phrase ("normal in size [and contour]")."""
    while phrase:
        hit = preds.get(phrase)
        if hit is not None:
            return hit
        phrase = phrase.rpartition(" ")[0]
    return None


def _attr_of_next_finding(clause, j: int) -> bool:
    nxt = clause[j + 1][2] if j + 1 < len(clause) else None
    return bool(nxt is not None and nxt.finding)


def _clause_mentions(
    marks: int, clause, norm: str, text: str, section: str, libs: Libs, conv: Conventions
) -> list[Mention]:
    """The finding mentions of one clause of (start, end, Tok), in text order.

    Phases: the mentions themselves (findings, and anchors a predicate speaks about) with their presence;
    the attribute words after each mention, then before it (the post-window first: it claims "in the
    right lower lobe" before the next finding's pre-window looks); a change word shared by the whole
    clause; alternatives; and the final clean-up (mimics, negated changes, evidence, extra names, devices).
    """
    if not marks & HEAD:
        return []
    claimed = [False] * len(clause)  # clause positions whose words a mention has taken
    mentions, heads = _head_mentions(marks, clause, norm, text, section, libs, conv, claimed)
    for k, i in enumerate(heads):
        stop = heads[k + 1] if k + 1 < len(heads) else len(clause)
        if i + 1 < stop:
            _take_post_window(clause, norm, mentions[k], i, stop, claimed)
    _take_pre_windows(clause, norm, mentions, heads, claimed)
    if marks & CHANGE:
        _share_change(clause, heads, mentions)
    if marks & ALT:
        _mark_alternatives(clause, heads, mentions, conv)
    return _finish(marks, clause, text, heads, mentions)


def _head_mentions(
    marks: int, clause, norm: str, text: str, section: str, libs: Libs, conv: Conventions, claimed: list[bool]
) -> tuple[list[Mention], list[int]]:
    """(mentions, clause index of each): one per finding phrase and one per anchor group a predicate speaks
    about ("the heart is enlarged"), with the presence the scopes around it give."""
    # a clause without any trigger, breaker or list word ("Small left pleural effusion") is positive throughout
    scope = Scope(clause, norm, marks) if marks & SCOPED else None
    mentions: list[Mention] = []
    heads: list[int] = []
    for i, (s, e, tok) in enumerate(clause):
        if tok.finding:
            m = _finding_mention(tok, text, s, e, section)
            m.presence = scope.presence(i, conv) if scope else POS
            mentions.append(m)
            heads.append(i)
            claimed[i] = True
        elif tok.anchors:
            context = scope.presence(i, conv) if scope else POS
            for group in tok.anchors:
                found = _anchor_predicate(clause, i, norm, libs, group)
                if found is not None:
                    mentions.append(_anchor_mention(clause, i, group, found, context, text, section))
                    heads.append(i)
            claimed[i] = True
    return mentions, heads


def _finding_mention(tok: Tok, text: str, s: int, e: int, section: str) -> Mention:
    """A finding phrase's mention, with the attributes its own words imply ("left hemidiaphragm")."""
    m = Mention(tok.finding, text[s:e], s, e, section)
    m.also = tok.also
    if tok.implied:
        for lat in tok.implied["lat"]:
            m.lat.add(lat)
        m.zones.extend(tok.implied["zones"])
        m.structs.extend(tok.implied["structs"])
        m.level = tok.implied["level"]
        m.type = tok.implied["type"]
    return m


def _anchor_mention(clause, i: int, group: str, found, context: str, text: str, section: str) -> Mention:
    """The mention an anchor at ``i`` and its predicate (``found``, from :func:`_anchor_predicate`) make, in
    the scope presence ``context``; it spans the anchor and the predicate."""
    pred_presence, level, j, negated = found
    lo, hi = min(i, j), max(i, j)
    m = Mention(group, text[clause[lo][0] : clause[hi][1]], clause[lo][0], clause[hi][1], section)
    m.from_anchor = True
    if negated:  # "the heart is not significantly enlarged"
        m.presence = NEG
    elif context == ABSENT:
        m.presence = ABSENT
    elif pred_presence == POS:
        m.presence = context
    elif pred_presence == UNC:
        m.presence = NEG if context == NEG else UNC
    else:
        m.presence = NEG
    if pred_presence == POS:
        m.level = level
    return m


def _take_post_window(clause, norm: str, m: Mention, i: int, stop: int, claimed: list[bool]) -> None:
    """The attribute words after the mention at ``i`` (before ``stop``, the next mention) that describe it:
    locations after a preposition or right after it, level, type, change; a trailing ", unchanged"."""
    end = clause[i][1]
    prep_seen = False
    for j in range(i + 1, stop):
        s, e, tok = clause[j]
        if claimed[j] and not (tok.anchors and tok.is_loc):
            break
        if _beyond(norm, end, s, POST_WORDS):
            break
        if tok is _COMMA:
            _take_trailing_change(clause, j, m, claimed)
            break
        if (
            tok.conj
            or tok.alt
            or tok.neg_pre
            or tok.finding
            or tok.unc_pre
            and not tok.unc_post
            or tok.soft
            and not tok.prep
        ):
            break
        if tok.prep:
            prep_seen = True
        # (right after it: no word between, i.e. _words(norm, end, s) <= 1)
        near = prep_seen or tok.adverbial or s <= end or norm[end:s].isspace()
        if not m.from_anchor and _take_attributes(m, tok, near):
            claimed[j] = True
            m.ev_end = max(m.ev_end, e)


def _take_trailing_change(clause, j: int, m: Mention, claimed: list[bool]) -> None:
    """ "There is a small effusion, new since the prior study." / "..., unchanged.": the change word right
    after the comma at ``j`` is the mention's, unless a finding follows it."""
    nxt = clause[j + 1][2] if j + 1 < len(clause) else None
    if (
        nxt is not None
        and nxt.change is not None
        and not nxt.finding
        and m.change is None
        and not _finding_follows(clause, j + 1)
    ):
        m.change = nxt.change
        claimed[j + 1] = True


def _take_attributes(m: Mention, tok: Tok, location_reaches: bool) -> bool:
    """Give the mention the attributes of a word after it that it lacks; whether it took any."""
    took = False
    if tok.is_loc and location_reaches:
        m.add_loc(tok)
        took = True
    if tok.level is not None and m.level is None:
        m.level = tok.level
        took = True
    if tok.type is not None and m.type is None and not tok.is_loc:
        m.type = tok.type
        took = True
    if tok.change is not None and m.change is None:
        m.change = tok.change
        took = True
    return took


def _take_pre_windows(
    clause, norm: str, mentions: list[Mention], heads: list[int], claimed: list[bool]
) -> None:
    """The attribute words between the previous mention (or its claimed post-window) and each finding;
    "small left and moderate right effusion": each lateral segment is an instance of its own (inserted
    into ``mentions`` / ``heads`` before the mention)."""
    extra: list[tuple[int, Mention]] = []
    for k, i in enumerate(heads):
        m = mentions[k]
        if m.from_anchor or i == 0 or claimed[i - 1]:
            continue  # (nothing before it to take)
        segments = _pre_segments(clause, norm, i, m, claimed)
        if not segments:
            continue
        if len(segments) == 1:
            _apply_pre(m, segments[0])
            continue
        if all(any(t.lat for t in seg) for seg in segments):
            for seg in segments[1:]:
                twin = Mention(m.name, m.raw, m.start, m.end, m.section)
                twin.presence = m.presence
                _apply_pre(twin, seg)
                extra.append((k, twin))
            segments = segments[:1]
        _apply_pre(m, [t for seg in segments for t in seg])
    for k, twin in reversed(extra):
        mentions.insert(k, twin)
        heads.insert(k, heads[k])


def _pre_segments(clause, norm: str, i: int, m: Mention, claimed: list[bool]) -> list[list[Tok]]:
    """The unclaimed attribute words before the finding at ``i`` (nearest first), split at "and" into
    segments; claims them and widens the evidence over the first segment."""
    start = clause[i][0]
    first: list[Tok] = []
    segments = [first]
    seg = first
    for j in range(i - 1, -1, -1):
        s, e, tok = clause[j]
        if (
            claimed[j]
            or tok is _COMMA
            or tok.soft
            or tok.alt
            or tok.finding
            or tok.anchors
            and not tok.is_loc
        ):
            break
        if _beyond(norm, e, start, PRE_WORDS * len(segments)):
            break
        if tok.conj:
            seg = []
            segments.append(seg)
            continue
        seg.append(tok)
        claimed[j] = True
        if seg is first and s < m.ev_start:
            m.ev_start = s
    if len(segments) == 1:
        return segments if first else []
    return [seg for seg in segments if seg]


def _share_change(clause, heads: list[int], mentions: list[Mention]) -> None:
    """A change word before the first mention or after the last one applies to every mention of the clause."""
    if not mentions:
        return
    first, last = heads[0], heads[-1]
    shared = [t.change for _, _, t in clause[:first] if t.change is not None]
    shared += [t.change for _, _, t in clause[last + 1 :] if t.change is not None]
    if len(set(shared)) == 1:
        for m in mentions:
            if m.change is None:
                m.change = shared[0]


def _mark_alternatives(clause, heads: list[int], mentions: list[Mention], conv: Conventions) -> None:
    """ "atelectasis or pneumonia": two positive mentions joined by "or" are uncertain (by the convention)."""
    for k in range(len(heads) - 1):
        a, b = heads[k], heads[k + 1]
        between = [clause[j][2] for j in range(a + 1, b)]
        if mentions[k].name == mentions[k + 1].name:
            continue  # "pacemaker/defibrillator": one thing named twice, not two alternatives
        if any(t.alt for t in between) and all(t.alt or t.is_attr or t.prep or t.conj for t in between):
            for m in (mentions[k], mentions[k + 1]):
                if m.presence == POS and conv.alternatives == UNC:
                    m.presence = UNC


def _finish(marks: int, clause, text: str, heads: list[int], mentions: list[Mention]) -> list[Mention]:
    """The clause's final mentions: those a mimic explains away dropped, no change on a negated mention
    (except "resolved"), evidence text set, extra names a phrase carries added, one device per clause."""
    if marks & MIMIC:
        for k in _explained_away(clause, heads, mentions):
            mentions[k].presence = ABSENT
    absent = also = False
    devices = 0
    for m in mentions:  # (the evidence of a mention about to be dropped is never read)
        presence = m.presence
        if presence == ABSENT:
            absent = True
            continue
        if presence == NEG and m.change != "resolved":
            m.change = None
        m.evidence = text[m.ev_start : m.ev_end]
        if m.also:
            also = True
        if m.name == DEVICE:
            devices += 1
    if absent:
        mentions = [m for m in mentions if m.presence != ABSENT]
    if also:
        mentions = [x for m in mentions for x in (m, *(_renamed(m, name) for name in m.also))]
        devices = sum(m.name == DEVICE for m in mentions)
    if devices > 1:
        mentions = _merge_devices(mentions)
    return mentions


def _explained_away(clause, heads: list[int], mentions: list[Mention]) -> list[int]:
    """Mentions a mimic after them explains away ("Nodular opacity ... consistent with a nipple shadow").

    From each mimic, walk left over attribute words, links and hedges to the nearest finding; a
    coordinator, a negation or a clause boundary in between means the mimic is a finding's neighbour, not
    its explanation."""
    out = []
    head_of = {i: k for k, i in enumerate(heads)}
    for j, (_, _, tok) in enumerate(clause):
        if not tok.mimic:
            continue
        for i in range(j - 1, -1, -1):
            t = clause[i][2]
            if i in head_of:
                m = mentions[head_of[i]]
                if not m.from_anchor and m.presence in (POS, UNC):
                    out.append(head_of[i])
                break
            if t.conj or t.alt or t.neg_pre or t.neg_post or t.finding or t.mimic:
                break  # (another mimic: each walk stops where the previous one started, so it stays linear)
    return out


def _renamed(m: Mention, name: str) -> Mention:
    twin = Mention(name, m.raw, m.start, m.end, m.section)
    for slot in ("presence", "level", "type", "change", "from_anchor"):
        setattr(twin, slot, getattr(m, slot))
    twin.lat, twin.zones, twin.structs = set(m.lat), list(m.zones), list(m.structs)
    twin.evidence, twin.ev_start, twin.ev_end = m.evidence, m.ev_start, m.ev_end
    return twin


GENERIC_DEVICE_WORDS = frozenset(
    [
        "lead",
        "leads",
        "device",
        "devices",
        "wire",
        "wires",
        "tube",
        "tubes",
        "catheter",
        "catheters",
        "line",
        "lines",
        "clip",
        "clips",
        "electrodes",
        "hardware",
        "drain",
        "drains",
        "port",
    ]
)


def _merge_devices(mentions: list[Mention]) -> list[Mention]:
    """One device per clause: "pacemaker ... with leads", "median sternotomy wires", "dual-lead pacemaker device"."""
    devices = [m for m in mentions if m.name == DEVICE]
    specific = [m for m in devices if " ".join(normalise(m.raw).split()) not in GENERIC_DEVICE_WORDS]
    keep = (specific or devices)[0]
    for m in devices:
        if keep.change is None and m.change is not None:
            keep.change = m.change
    return [m for m in mentions if m.name != DEVICE or m is keep]


def _apply_pre(m: Mention, toks: list[Tok]) -> None:
    """Attribute words before a finding (nearest first)."""
    for tok in toks:
        if tok.is_loc:
            m.add_loc(tok)
        if tok.level is not None and m.level is None:
            m.level = tok.level
        if tok.type is not None and m.type is None and not tok.is_loc:
            m.type = tok.type
        if tok.change is not None and m.change is None:
            m.change = tok.change


def sections_read(sections: dict[str, str | None]) -> tuple[str, ...]:
    """The sections the extractor reads: findings and impression, or the last paragraph when a report has
    neither (the MIT-LCP / CheXpert fallback)."""
    for section in READ_SECTIONS:
        if sections.get(section):
            return READ_SECTIONS
    return (FALLBACK_SECTION,)


def extract_mentions(
    sections: dict[str, str | None], libs: Libs | None = None, conventions: Conventions | None = None
) -> list[Mention]:
    """Every finding mention of the findings and impression sections, in text order.

    Indication, history and comparison are never read. A report with neither findings nor impression is read
    from its ``last_paragraph`` (the MIT-LCP / CheXpert fallback).
    """
    libs = libs or load_libs()
    conv = conventions or DEFAULT_CONVENTIONS
    out: list[Mention] = []
    for section in sections_read(sections):
        text = sections.get(section)
        if not text:
            continue
        norm = normalise(text)
        for marks, clause in _scan(norm, libs):
            out.extend(_clause_mentions(marks, clause, norm, text, section, libs, conv))
    return out


# Squeezed sentence -> its mention rows and where a normal statement sits in it, per reading convention.
# What a sentence says depends on its own normalised words only (clauses never cross a sentence end; case,
# line breaks, hyphens and runs of spaces change no reading: the matcher takes " +" between words and word
# counts split on white space), and reports repeat sentences ("The lungs are clear.", "No pneumothorax.")
# across a corpus, so each distinct squeezed sentence is read once per process; offsets are mapped back and
# raw text sliced from the report. Bounded.
_SENTENCE_ROWS: dict[Conventions, dict[str, tuple[tuple[tuple, ...], tuple[int, int] | None]]] = {}
_SENTENCE_ROWS_MAX = 200_000
_SPACE_RUN = re.compile(r" {2,}")


def forget_sentences() -> None:
    """Empty the sentence cache (its entries are the bulk of a run's objects the collector tracks)."""
    _SENTENCE_ROWS.clear()


def _not_after_abbreviation() -> str:
    """Lookbehinds that fail after any of ABBREVIATIONS (after a space or at the text's start; the six
    characters long ones anywhere), one per length (a lookbehind's alternatives are of one width): each
    period tries 5 of them, not 19."""
    by_length: dict[int, list[str]] = {}
    for a in ABBREVIATIONS:
        by_length.setdefault(len(a), []).append(re.escape(a))
    out = []
    for n, words in sorted(by_length.items()):
        any_of = "|".join(words)
        out.append(rf"(?<!(?:{any_of})\.)" if n >= 6 else rf"(?<! (?:{any_of})\.)(?<!^(?:{any_of})\.)")
    return "".join(out)


# A sentence-ending period (and the spaces after it): before white space, after a word that is no
# abbreviation, i.e. the text after the last space in the six characters before the period is none of
# ABBREVIATIONS -- the test :func:`_scan` makes at every period.
_SENTENCE_END = re.compile(r"\." + _not_after_abbreviation() + r"(?: +|(?=\s))")


# _SENTENCE_END with the spaces after the period as a group, for ``split``: it cuts a section into its
# sentences (each without its period) and the spaces between them in one call, with no match object per
# sentence (``finditer`` made them: ~20 % of the splitting's CPU)
_SENTENCE_SPLIT = re.compile(_SENTENCE_END.pattern.removesuffix(r"(?: +|(?=\s))") + r"( +|(?=\s))")


def sentences(norm: str) -> list[tuple[int, str]]:
    """(offset, text) of the sentences of a normalised section, without the spaces around them: cut
    exactly where :func:`_scan` ends a sentence at a period (at each :data:`_SENTENCE_END`)."""
    # the leading spaces cut off first: the lookbehinds see the text's start where they saw spaces
    text = norm.lstrip(" ")
    parts = _SENTENCE_SPLIT.split(text)  # sentence, spaces, sentence, ..., the text after the last end
    last = parts.pop().rstrip(" ")
    start = len(norm) - len(text)
    out = []
    pieces = iter(parts)
    for piece in pieces:
        out.append((start, piece + "."))
        start += len(piece) + 1 + len(next(pieces))  # the spaces after it
    if last:
        out.append((start, last))
    return out


def squeeze(sentence: str) -> tuple[str, list[int], list[int]]:
    """``sentence`` with every run of spaces as one, and the way back: ``starts`` (ascending squeezed
    offsets) and ``dropped`` (spaces removed before each); the character at squeezed offset ``c`` is at
    ``c + dropped[k]`` in ``sentence``, ``k`` the last start ≤ ``c``."""
    first = sentence.find("  ")
    if first < 0:
        return sentence, [0], [0]
    end = len(sentence) - len(sentence[first:].lstrip(" "))
    if sentence.find("  ", end) < 0:  # one run, as a wrapped line leaves (most): no scan
        return sentence[: first + 1] + sentence[end:], [0, first + 1], [0, end - first - 1]
    starts, dropped, pieces = [0], [0], []
    kept = 0  # the end of the text copied so far
    for run in _SPACE_RUN.finditer(sentence, first):
        s, e = run.span()
        pieces.append(sentence[kept : s + 1])
        kept = e
        dropped.append(dropped[-1] + e - s - 1)
        starts.append(e - dropped[-1])
    pieces.append(sentence[kept:])
    return "".join(pieces), starts, dropped


def _unsqueeze(starts: list[int], dropped: list[int], c: int) -> int:
    return c + dropped[bisect.bisect_right(starts, c) - 1]


def _unsqueeze_span(starts: list[int], dropped: list[int], start: int, end: int) -> tuple[int, int]:
    """A span of a squeezed sentence in the sentence (:func:`squeeze`); the end is mapped through its last
    character, as spaces may have been dropped after it."""
    if len(starts) == 2:  # one run: the offsets past it move by the spaces it lost
        cut, shift = starts[1], dropped[1]
        return start + shift if start >= cut else start, end + shift if end > cut else end
    return _unsqueeze(starts, dropped, start), _unsqueeze(starts, dropped, end - 1) + 1


# A cached row (:func:`_sentence_rows`): the fields of a findings row the text does not give (name, presence,
# location, level, type, change), the raw words' and the evidence's offsets in the squeezed sentence, and the
# row's instance key (:func:`row_laterality`).

# The extractor's rows are lists in the findings table's column order (extract_sections gives them as dicts):
# a study's rows are merged in place, no dict per row, and a batch's values go into one flat list whose
# slices are its columns (run_rules.rules_findings_table).
ROW_COLUMNS = ("name", "raw_name", "presence", "location", "level", "type", "change", "section", "start", "end",
               "evidence")  # fmt: skip
_AT = {name: k for k, name in enumerate(ROW_COLUMNS)}


def _sentence_rows(squeezed: str, libs: Libs, conv: Conventions) -> tuple[tuple, ...]:
    """The mentions of one squeezed sentence as cached rows."""
    rows = []
    for marks, clause in _scan(squeezed, libs):
        for m in _clause_mentions(marks, clause, squeezed, squeezed, "", libs, conv):
            location = m.location(libs)
            # the raw words are normalised already: row_laterality's key without normalising again
            key = device_key(squeezed[m.start : m.end]) if m.name == DEVICE else location_side(location)
            rows.append((m.name, m.presence, location, m.level, m.type, m.change,
                         m.start, m.end, m.ev_start, m.ev_end, key))  # fmt: skip
    return tuple(rows)


def _sentence_cache(conv: Conventions) -> dict[str, tuple[tuple[tuple, ...], tuple[int, int] | None]]:
    """The sentence cache of one set of conventions (:data:`_SENTENCE_ROWS`)."""
    cache = _SENTENCE_ROWS.get(conv)
    if cache is None:
        cache = _SENTENCE_ROWS[conv] = {}
    return cache


def _sentence_entry(cache: dict, squeezed: str, libs: Libs, conv: Conventions):
    """A squeezed sentence's cached rows and the span of its first normal statement, read once (bounded)."""
    entry = cache.get(squeezed)
    if entry is None:
        entry = (_sentence_rows(squeezed, libs, conv), _normal_span(libs.normal_statements, squeezed))
        if len(cache) >= _SENTENCE_ROWS_MAX:
            cache.clear()
        cache[squeezed] = entry
    return entry


def _normal_span(pattern: re.Pattern | None, sentence: str) -> tuple[int, int] | None:
    """Where the first normal statement of ``sentence`` is: its phrases hold no period and ``\\b`` sees the
    same at a sentence's edges, so a section's first one is in its first sentence that has one, at the
    same offset there."""
    m = pattern.search(sentence) if pattern is not None else None
    return m.span() if m else None


def _section_rows(
    text: str, section: str, libs: Libs, conv: Conventions, rows: list[list], keys: list[str | None]
) -> str | None:
    """Append the mention rows of one section (offsets in ``text``) to ``rows`` and their instance keys to
    ``keys``; the section's first normal statement as written (libs/triggers.yaml ``normal_statements``), or
    None."""
    cache = _sentence_cache(conv)
    normal = None
    for a, sentence in sentences(normalise(text)):
        spaced = "  " in sentence
        squeezed, starts, dropped = squeeze(sentence) if spaced else (sentence, None, None)
        cached, said = cache.get(squeezed) or _sentence_entry(cache, squeezed, libs, conv)
        if said is not None and normal is None:
            # the cache knows whether the sentence has one; where it is in the sentence as written, the
            # written sentence tells
            said = _normal_span(libs.normal_statements, sentence) if spaced else said
            if said is not None:
                normal = text[a + said[0] : a + said[1]]
        for name, presence, location, level, type_, change, raw_start, raw_end, start, end, key in cached:
            if spaced:
                raw_start, raw_end = _unsqueeze_span(starts, dropped, raw_start, raw_end)
                start, end = _unsqueeze_span(starts, dropped, start, end)
            raw = text[a + raw_start : a + raw_end]
            start += a
            end += a
            rows.append([name, raw, presence, location, level, type_, change, section, start, end,
                         text[start:end] or raw])  # fmt: skip
            keys.append(key)
    return normal


LATERALITY = ("left", "right", "bilateral")


def device_key(raw_words: str) -> str:
    """The instance key of a device row: which device ("device:pacemaker"), from its normalised raw words."""
    return "device:" + " ".join(raw_words.split())


def location_side(location: str | None) -> str | None:
    """The instance key of a non-device row: the laterality its location starts with."""
    if not location:
        return None
    first = location.split(" ", 1)[0]
    return first if first in LATERALITY else None


def row_laterality(row: dict) -> str | None:
    """The instance key of a row besides its name: laterality (devices: which device)."""
    if row["name"] == DEVICE:
        return device_key(normalise(row.get("raw_name") or ""))
    return location_side(row.get("location"))


ATTRS = ("location", "level", "type", "change")
_BY_NAME = {name: name for name in ROW_COLUMNS}  # merge_rows' dict rows: a field is row[name]


def merge_rows(rows: list[dict]) -> list[dict]:
    """Merge finding rows of one report into instances: one per (name, laterality).

    Left and right stay two instances; a row without laterality joins the only instance of its name (or the
    one without laterality). Presence: positive > uncertain > negative; attributes are filled from rows that
    share the winning presence; the evidence of the first winning row is kept. The rows (each with a name,
    presence and ATTRS, as the standardiser writes them) are not changed: the instances are copies.
    """
    copies = [dict(row) for row in rows]
    return _merge_instances(copies, [row_laterality(row) for row in copies], _BY_NAME)


def _instance_to_join(insts: list[list], lat: str | None) -> list | None:
    """Which of a name's instances ([row, laterality]) a row with laterality ``lat`` joins (None: a new
    one); a lateral row that joins the only, non-lateral instance gives it its side."""
    # (loops, not next() over a generator: it runs for every row of a name named twice in a report)
    if lat is not None:
        for inst in insts:
            if inst[1] == lat:
                return inst
        if len(insts) == 1 and insts[0][1] is None:
            target = insts[0]
            target[1] = lat
            return target
        return None
    if len(insts) == 1:
        return insts[0]
    for inst in insts:
        if inst[1] is None:
            return inst
    return None


def _merge_instances(rows: list, keys: list[str | None], at: Mapping[str, object] = _AT) -> list:
    """:func:`merge_rows` of rows whose fields are ``row[at[name]]`` (the extractor's list rows in ROW_COLUMNS
    order by default; dicts with ``_BY_NAME``), each row's :func:`row_laterality` given (``keys``); the rows
    are merged in place (nobody else holds them, nor the list: it is returned when no name repeats)."""
    name_at, presence_at, location_at = at["name"], at["presence"], at["location"]
    if len({row[name_at] for row in rows}) == len(rows):
        return rows  # every name once (most reports): every row is an instance of its own, unchanged
    attrs_at = [at[name] for name in ATTRS]
    by_name: dict[str, list[list]] = {}
    order: list[list] = []
    for row, lat in zip(rows, keys, strict=True):
        name = row[name_at]
        insts = by_name.get(name)
        if insts is None:  # most names are named once in a report
            inst = [row, lat]
            order.append(inst)
            by_name[name] = [inst]
            continue
        target = _instance_to_join(insts, lat)
        if target is None:
            insts.append([row, lat])
            order.append(insts[-1])
            continue
        merged = target[0]
        rank, merged_rank = RANK[row[presence_at]], RANK[merged[presence_at]]
        if rank > merged_rank:  # the row replaces the instance's fields (its location kept when it has none)
            if row[location_at] is None and lat is None:
                row[location_at] = merged[location_at]
            target[0] = row
            target[1] = lat or target[1]
        elif rank == merged_rank:
            for k in attrs_at:
                if merged[k] is None and row[k] is not None:
                    merged[k] = row[k]
    return [inst[0] for inst in order]


def study_rows(
    sections: dict[str, str | None], conventions: Conventions | None = None
) -> tuple[list[list], str | None]:
    """The findings rows of one study as lists in ROW_COLUMNS order, and its first normal statement as
    written (the first match of ``normal_statements`` in the sections read, keyinfo_studies' text half),
    both from one reading of its sections."""
    libs = load_libs()
    conv = conventions or DEFAULT_CONVENTIONS
    rows: list[list] = []
    keys: list[str | None] = []
    normal = None
    for section in sections_read(sections):
        text = sections.get(section)
        if text:
            said = _section_rows(text, section, libs, conv, rows, keys)
            normal = normal if normal is not None else said
    return _merge_instances(rows, keys), normal


def extract_sections(sections: dict[str, str | None], conventions: Conventions | None = None) -> list[dict]:
    """Findings rows (name, raw_name, presence, location, level, type, change, section, start, end) of one study.

    Reads only ``findings`` and ``impression``.
    """
    return [dict(zip(ROW_COLUMNS, row, strict=True)) for row in study_rows(sections, conventions)[0]]


# A header in any case at a line start ("Findings:", "IMPRESSION :"): MIT-LCP's parser knows upper case only.
_LENIENT_HEADER = re.compile(
    r"(?im)^[ \t]*(findings?\s*(?:and|/|&)\s*impressions?|findings?|impressions?|conclusions?|opinion)[ \t]*:"
)


def lenient_sections(report: str) -> dict[str, str | None]:
    """findings / impression of a report by headers in any case; None where a section is absent.

    For corpora whose headers are not MIMIC's capitals; the last section of a name wins (as MIT-LCP)."""
    out: dict[str, str | None] = {"findings": None, "impression": None}
    matches = list(_LENIENT_HEADER.finditer(report))
    if not matches:
        return out
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        head = m.group(1).lower()
        name = "findings" if head.startswith("finding") and "impression" not in head else "impression"
        body = report[m.end() : nxt.start() if nxt else len(report)]
        # a following header that the lenient pattern does not know ends the section too
        body = re.split(r"(?m)^[ \t]*[A-Za-z][A-Za-z /]{2,40}:", body, maxsplit=1)[0].strip()
        if body:
            out[name] = body
    return out


def sections_for_reading(sections: dict[str, str | None], report: str | None) -> dict[str, str | None]:
    """The sections the key-information stage reads: the MIT-LCP-compatible ones when they hold findings
    or an impression; else, when the report has headers in another case, those (``Findings:``)."""
    if any(sections.get(s) for s in READ_SECTIONS) or not report:
        return sections
    lenient = lenient_sections(report)
    if not any(lenient.values()):
        return sections
    return {**sections, **lenient}


def merge_presence(pairs) -> dict[str, str]:
    """name -> merged presence (positive > uncertain > negative) of (name, presence) pairs."""
    out: dict[str, str] = {}
    for name, presence in pairs:
        if name not in out or RANK[presence] > RANK[out[name]]:
            out[name] = presence
    return out


def label_vector(text: str) -> dict[str, str]:
    """Report-level canonical name -> merged presence for a free text (e.g. a rewritten report): the
    merged presence of the mentions :func:`extract_mentions` finds in ``text`` read as findings, each of
    its sentences read once per process through the sentence cache :func:`study_rows` reads (a sentence
    says the same however it is cased or spaced; the rg4 build asks for the labels of ~100k texts per
    shard, and half of their sentences recur)."""
    libs = load_libs()
    cache = _sentence_cache(DEFAULT_CONVENTIONS)
    pairs: list[tuple[str, str]] = []
    for _, sentence in sentences(normalise(text)):
        squeezed = _SPACE_RUN.sub(" ", sentence) if "  " in sentence else sentence
        rows, _ = _sentence_entry(cache, squeezed, libs, DEFAULT_CONVENTIONS)
        pairs += [(row[0], row[1]) for row in rows]  # a cached row: name, presence, ...
    return merge_presence(pairs)
