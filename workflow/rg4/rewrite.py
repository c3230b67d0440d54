"""Removing input-agnostic content from MIMIC-RG4 targets: the detector and the ``rules`` rewriter.

A target sentence is input-agnostic for a scenario when the model could not infer it from that
scenario's inputs (LLM-RG4's four DiscBERT heads): a comparison with, or a procedure since, a prior
study when no prior report is an input (``pc``, ``pp``: removed in sn/mn); communication of results
(``comm``: removed everywhere); mentions of views that are not inputs (``view``: removed in sn/sw).

The data (detector patterns, scenario → removed categories, rephrasing rules) live in
``libs/rg4_rules.yaml``. The rules rewriter works sentence by sentence: a sentence the detector flags
with a removed category is rephrased by that category's rules ("stable mild cardiomegaly" → "mild
cardiomegaly", "The effusion has resolved" → "No effusion.", "Moderate cardiomegaly is unchanged" →
"Moderate cardiomegaly is present."); if the detector still fires, or nothing with content is left,
the sentence is removed. Every rewrite — rules or llm — then passes :func:`check`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from operator import add, itemgetter
from pathlib import Path

log = logging.getLogger(__name__)
RULES_PATH = Path(__file__).resolve().parents[2] / "libs" / "rg4_rules.yaml"
CATEGORIES = ("pc", "pp", "comm", "view")
# Order in which a sentence's categories are rephrased: clause-level cuts first, word-level last.
_RULE_ORDER = ("comm", "view", "pp", "pc")

# Sentence ends: . ! ? followed by space and a capital/digit/quote/placeholder, except after common
# abbreviations and after a bare list number ("1. ").
_SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\bDr\.)(?<!\bDrs\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)(?<!\bvs\.)(?<!\be\.g\.)"
    r"(?<!\bi\.e\.)(?<!\bapprox\.)(?<!\bSt\.)(?<!\bNo\.)(?<!\s\d\.)(?<!^\d\.)(?<!\s\d\d\.)\s+(?=[A-Z0-9_\"'(\[])"
)
# The same ends for the splitter, as a match from the end mark on (kept by its group): a pattern that starts
# with a character set, which the regex engine scans for in C (one starting with a lookbehind is tried at
# every position)
_SENTENCE_BREAK = re.compile(r"([.!?])" + _SENTENCE_END.pattern.removeprefix(r"(?<=[.!?])"))
_LIST_MARKER = re.compile(r"^(\d{1,2})[.)]\s+")
# What a sentence starts with that is not its content: a section heading left inside the text ("IMPRESSION:",
# when a report's sections were not split) and/or a list number. The rules, many anchored at the sentence
# start, see the sentence without it; it is put back in front of the rephrased sentence.
_SENTENCE_PREFIX = re.compile(r"^(?:[A-Z][A-Z ]{2,30}:\s*)?(?:\d{1,2}[.)]\s+)?")


@dataclass(frozen=True, slots=True)
class Rule:
    category: str
    kind: str  # sub / predicate / negate
    pattern: re.Pattern
    replacement: str = ""
    # the rule is tried only where one of these (lower-case) substrings occurs (cheap; speed only)
    guard: frozenset[str] = frozenset()
    number: int = 0  # position in its category's list in libs/rg4_rules.yaml (for error messages)

    @property
    def name(self) -> str:
        return f"rephrase.{self.category}[{self.number}]"


# A match may neither start nor end inside a word: "exam" must not match the start of "examination"
# (that left "is stableination"). Wrapping every rephrase pattern in this assertion makes the regex
# engine backtrack to a longer alternative or give up, whatever the alternation order in the YAML.
_NOT_MID_WORD = r"(?:(?<!\w)|(?!\w))"


def whole_words(pattern: str) -> str:
    """``pattern`` constrained to start and end at word boundaries (or next to non-word characters)."""
    if anchored_at_start(pattern):
        # the start of the text is no mid-word; a pattern that begins with "^" lets the regex engine try the
        # start only (behind the assertion, it tried every position of the text and failed at "^" ~10 µs a
        # sentence on the predicate rules)
        return f"^(?:{pattern[1:]}){_NOT_MID_WORD}"
    return f"{_NOT_MID_WORD}(?:{pattern}){_NOT_MID_WORD}"


def anchored_at_start(pattern: str) -> bool:
    """Whether ``pattern`` (without re.MULTILINE) matches only at the start of a text: it begins with "^"
    and has no "|" outside groups and character classes (``^a|b`` matches "b" anywhere)."""
    if not pattern.startswith("^"):
        return False
    depth, k, in_class = 0, 1, False
    while k < len(pattern):
        c = pattern[k]
        if c == "\\":
            k += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[k + 1 : k + 2] == "^":
                k += 1
            if pattern[k + 1 : k + 2] == "]":  # a "]" first in a class is a member
                k += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return False
        k += 1
    return True


class RewriteCorruption(RuntimeError):
    """A rules rewrite produced a token that is neither a word of the input nor of the rule's replacement
    (e.g. a fragment glued to a word): a bug in libs/rg4_rules.yaml; the rule must fail."""


@dataclass(frozen=True)
class RuleSet:
    detect: dict[str, re.Pattern]  # category -> one alternation of its patterns
    any_trigger: re.Pattern  # union of every category (fast path: most sentences match nothing)
    rules: dict[str, tuple[Rule, ...]]
    guards: dict[str, Guards]  # category -> which of its rules a sentence lets the rewriter try
    scenario_removes: dict[str, frozenset[str]]
    finding_words: re.Pattern
    glue_words: frozenset[str]


_LETTER_RUN = re.compile(r"[a-z]+")


class Guards:
    """Which rules of a category the rewriter tries on a sentence: a rule whose guard (``when``) has no
    substring in the lower-cased sentence is not tried. A guard substring of letters only occurs within one
    run of letters, so the rules such substrings let through are looked up per word (and remembered: a
    corpus has few distinct words), instead of searching the sentence for each substring. Sets of rules are
    bit masks (rule k: bit k), and each mask's rules in order are remembered too (few distinct masks)."""

    __slots__ = ("_by_word", "_letters", "_order", "_others", "_unguarded")

    def __init__(self, rules: tuple[Rule, ...]):
        mask_of: dict[str, int] = {}  # guard substring -> the rules it lets through
        for k, rule in enumerate(rules):
            for w in rule.guard:
                mask_of[w] = mask_of.get(w, 0) | 1 << k
        groups = sorted(mask_of.items())
        self._letters = [(w, mask) for w, mask in groups if _LETTER_RUN.fullmatch(w)]
        self._others = [(w, mask) for w, mask in groups if not _LETTER_RUN.fullmatch(w)]
        self._unguarded = sum(1 << k for k, rule in enumerate(rules) if not rule.guard)
        # run of letters -> the rules its substrings let through
        self._by_word: dict[str, int] = {}
        # rules (a mask) -> their numbers in order
        self._order: dict[int, tuple[int, ...]] = {}

    def _word(self, word: str) -> int:
        mask = 0
        for w, rules in self._letters:
            if w in word:
                mask |= rules
        self._by_word[word] = mask
        return mask

    def candidates(self, lower: str, start: int = 0, words: Iterable[str] | None = None) -> tuple[int, ...]:
        """In order, the rules from the ``start``-th on to try on the lower-cased sentence ``lower``.
        ``words``: its runs of letters, or any words of it that hold them (such as its ``tokens``: a guard
        of letters that occurs in ``lower`` occurs within one of its runs of word characters)."""
        by_word = self._by_word
        mask = self._unguarded
        for word in _LETTER_RUN.findall(lower) if words is None else words:
            rules = by_word.get(word)
            mask |= self._word(word) if rules is None else rules
        for w, rules in self._others:
            if w in lower:
                mask |= rules
        mask = mask >> start << start
        order = self._order.get(mask)
        if order is None:
            order = self._order[mask] = tuple(k for k in range(mask.bit_length()) if mask >> k & 1)
        return order


def _union(patterns: list[str]) -> str:
    """One alternation, matched against lower-cased text (no re.IGNORECASE: several times faster)."""
    return "|".join(f"(?:{p})" for p in patterns)


@cache
def load_rules(path: str | None = None) -> RuleSet:
    import yaml  # here: importers of this module that read no rules (the rg4 merge) need no YAML parser

    data = yaml.safe_load(Path(path or RULES_PATH).read_text())
    detect = {cat: re.compile(_union(data["detect"][cat])) for cat in CATEGORIES}
    rules = {
        cat: tuple(
            Rule(
                cat,
                r["kind"],
                re.compile(whole_words(r["find"]), re.IGNORECASE),
                r.get("to", ""),
                frozenset(w.lower() for w in r.get("when") or ()),
                number,
            )
            for number, r in enumerate(data["rephrase"].get(cat, []))
        )
        for cat in CATEGORIES
    }
    words = data["finding_words"]
    return RuleSet(
        detect=detect,
        any_trigger=re.compile(_union([p for cat in CATEGORIES for p in data["detect"][cat]])),
        rules=rules,
        guards={cat: Guards(rules[cat]) for cat in CATEGORIES},
        scenario_removes={s: frozenset(c) for s, c in data["scenario_removes"].items()},
        finding_words=re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE),
        glue_words=frozenset(data["glue_words"]),
    )


# --- sentences --------------------------------------------------------------------------------------------


def normalise_space(text: str) -> str:
    """MIMIC wraps lines with ``"\\n "``; targets are single-spaced text."""
    # a text already single-spaced is returned as it is (most are: the rg4 build reads them normalised):
    # every white space character but " " is unprintable, so a printable text's only white space is " "
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """``text``'s sentences: ``_SENTENCE_END.split`` of the single-spaced text, without empty pieces."""
    return _split_single_spaced(normalise_space(text))


def _split_single_spaced(text: str) -> list[str]:
    """:func:`split_sentences` of a text that :func:`normalise_space` returns as it is."""
    if not text:
        return []
    # [sentence without its end mark, end mark, ..., last sentence]; no piece is empty (an end follows an
    # end mark and precedes a capital, a digit, ...)
    parts = _SENTENCE_BREAK.split(text)
    if len(parts) == 1:
        return parts
    sentences = list(map(add, parts[0:-1:2], parts[1::2]))
    sentences.append(parts[-1])
    return sentences


def detect(text: str, categories=CATEGORIES, rules: RuleSet | None = None) -> set[str]:
    """The input-agnostic categories (among ``categories``) that ``text`` still contains."""
    rules = rules or load_rules()
    lower = text.lower()
    first = rules.any_trigger.search(lower)
    if first is None:
        return set()
    # no category matches left of the union's first match, so each is searched from there on (a search
    # from a position still sees the text before it, for \b and lookbehinds; "^" matches at 0 only)
    start = first.start()
    return {cat for cat in categories if rules.detect[cat].search(lower, start)}


# White space before punctuation (the punctuation is looked at, not replaced: a literal replacement, which
# the regex engine applies without a template).
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[,.;:!?)])")
_DOUBLE_PUNCT = re.compile(r"([,;:])\s*([,;:.])")
_LEADING_JUNK = re.compile(r"^[\s,;:.)-]+|^(?:and|but|however|then|also|with)\b[\s,]*", re.IGNORECASE)
_DANGLING_WORDS = "and|or|but|with|of|in|on|at|to|from|by|as|is|are|was|were|has|have|the|a|an|which|that"
_TRAILING_DANGLER = re.compile(rf"(?:\s+(?:{_DANGLING_WORDS}))+\s*([.!?]?)$", re.IGNORECASE)
_DANGLING = frozenset(_DANGLING_WORDS.split("|"))
# A group of a match (Pattern.sub with a function: a template such as r"\2" costs a Python call per sub)
_GROUP_2 = itemgetter(2)


def _may_dangle(body: str) -> bool:
    """False where ``_TRAILING_DANGLER`` cannot match ``body``: where its last word, after white space and
    an end mark, is not preceded by white space or is an ASCII word that no dangling word is (the regex,
    case-insensitive, is left to judge a non-ASCII word)."""
    tail = body.rstrip().rstrip(".!?").rstrip()
    word = tail.rsplit(None, 1)[-1] if tail else ""
    if not word or len(word) == len(tail):
        return False
    return not word.isascii() or word.lower() in _DANGLING


# --- articles: a removal can leave "a" before a vowel ("a new endotracheal tube" -> "a endotracheal
# tube") or "an" before a consonant ("an unchanged nasogastric tube"), or two articles in a row

# An article and the space after it, before a word. Only lower-case "a" / "an", or capitalised at the start
# or in upper-case text, are articles: "A" inside a sentence mostly is not ("type A dissection").
_ARTICLE = re.compile(r"(?:^|(?<=\s))(a|an|A|An|AN)\s+(?=[\w(])")
_LEADING_ARTICLE = re.compile(r"^(?:the|an?)\s+", re.IGNORECASE)
_DOUBLED_ARTICLE = re.compile(r"\b(a|an|the)\s+(?:a|an|the)\s+(?=\w)", re.IGNORECASE)
# Letters whose names start with a vowel sound: "an NG tube", "an ET tube", "an SVC", "an RLL opacity".
_VOWEL_LETTER_NAMES = frozenset("aefhilmnorsx")
# Vowel letters read with a consonant sound: "a unilateral", "a ureteral", "a European", "a one-time";
# "un-" + a vowel-initial stem stays "an" ("an unidentified", "an uninterrupted").
_CONSONANT_SOUND = re.compile(r"^(?:uni(?!d[ei]|n|mp|mm)|us[eu]|ur[eio]|ut[ei]|uv|eu|ewe|one\b|once\b)")
# Silent h: "an hour", "an honest".
_VOWEL_SOUND_H = re.compile(r"^(?:hour|honest|honou?r|heir)")
# Acronyms read as a word rather than letter by letter.
_ACRONYM_WORDS = frozenset({"lima", "rima", "picc", "cabg", "nos", "ards", "copd"})


def takes_an(word: str, all_caps_text: bool = False) -> bool:
    """Whether the indefinite article before ``word`` is "an" (by sound, not spelling): "an effusion",
    "a unilateral", "an NG tube", "an 8 mm nodule", "an 11 cm", "a 1.5 cm", "an x-ray"."""
    if word[0].isdigit():
        number = re.match(r"\d+", word).group()
        # "eight", "eighty", "eight hundred"; "eleven", "eighteen" (and their hundreds: "an 1100 cc")
        return number[0] == "8" or number[:2] in ("11", "18") and len(number) in (2, 4)
    lower = word.lower()
    # letter by letter: an acronym ("NG", "ET", "RLL") or a single letter ("an S-shaped", "an x-ray")
    letters = (
        len(word) == 1
        or word[1] == "-"
        or (not all_caps_text and word.isupper() and len(word) <= 5 and lower not in _ACRONYM_WORDS)
    )
    if letters:
        return lower[0] in _VOWEL_LETTER_NAMES
    if lower[0] in "aeiou":
        return not _CONSONANT_SOUND.match(lower)
    return bool(_VOWEL_SOUND_H.match(lower))


def _first_and_space(m: re.Match) -> str:
    return m[1] + " "


def fix_articles(sentence: str) -> str:
    """Articles agreeing with the word after them, and one article where a removal left two in a row
    ("an interval placement of a catheter" -> "an catheter" -> "a catheter")."""
    s = _DOUBLED_ARTICLE.sub(_first_and_space, sentence)
    if s.isascii():  # every ASCII letter is cased: "all letters upper case" is str.isupper
        all_caps = s.isupper()
    else:
        letters = [c for c in s if c.isalpha()]
        all_caps = bool(letters) and all(c.isupper() for c in letters)

    def agree(m: re.Match) -> str:
        article = m.group(1)
        if article[0].isupper() and m.start() and not all_caps:
            return m.group()
        word = re.match(r"\(?([\w-]+)", s[m.end() :]).group(1)
        if word[0] == "_":  # a de-identified word (MIMIC "___"): its sound is unknown
            return m.group()
        an = takes_an(word, all_caps)
        if (article.lower() == "an") == an:
            return m.group()
        new = "an" if an else "a"
        if article.isupper() and (len(article) > 1 or all_caps):
            new = new.upper()
        elif article[0].isupper():
            new = new.capitalize()
        return new + m.group()[len(article) :]

    return _ARTICLE.sub(agree, s)


def tidy(sentence: str) -> str:
    """Repair what a removal leaves: spaces, doubled punctuation, dangling words, articles, capital,
    full stop."""
    s = " ".join(sentence.split())
    s = s.replace("()", "").replace("( )", "")
    s = _SPACE_BEFORE_PUNCT.sub("", s)
    s = _DOUBLE_PUNCT.sub(_GROUP_2, s)
    s = _LEADING_JUNK.sub("", s).strip()
    s = fix_articles(s)
    s = s.rstrip(" ,;:")
    body = s.rstrip(".!?")
    end = s[len(body) :] or "."
    if _may_dangle(body):
        body = _TRAILING_DANGLER.sub("", body)
    body = body.rstrip(" ,;:")
    if not body:
        return ""
    return body[0].upper() + body[1:] + end[0]


_CONTENT_WORD = re.compile(r"[A-Za-z]{3,}")


def has_content(sentence: str, rules: RuleSet | None = None) -> bool:
    """At least one word that is not glue ("There is." or "Patient is." say nothing)."""
    glue = (rules or load_rules()).glue_words
    return not glue.issuperset(map(str.lower, _CONTENT_WORD.findall(sentence)))


# --- the rules rewriter -----------------------------------------------------------------------------------


_TOKEN = re.compile(r"\w+")
_ARTICLES = frozenset({"a", "an"})


def tokens(text: str | None) -> set[str]:
    return set(_TOKEN.findall(text.lower())) if text else set()


def carries_finding(phrase: str, rules: RuleSet, names_finding: Callable[[str], bool] | None = None) -> bool:
    """Whether ``phrase`` names a finding: the extractor labels it, or it holds one of ``finding_words``
    (findings the extractor has no label for, e.g. an eventration, still count)."""
    return bool(rules.finding_words.search(phrase)) or bool(names_finding and names_finding(phrase))


def _apply(
    rule: Rule, text: str, rules: RuleSet, names_finding: Callable[[str], bool] | None = None
) -> tuple[str, str]:
    """(new text, the text the rule inserted); the inserted text is what the token check allows besides
    the input's words."""
    if rule.kind == "sub":
        inserted: list[str] = []
        if "\\" not in rule.replacement:  # no group reference: the replacement as written (no template parse)
            new, n = rule.pattern.subn(rule.replacement, text)
            return new, " ".join([rule.replacement] * n)

        def replace(m: re.Match) -> str:
            new = m.expand(rule.replacement)
            inserted.append(new)
            return new

        return rule.pattern.sub(replace, text), " ".join(inserted)
    m = rule.pattern.search(text.rstrip(".").strip())
    if not m:
        return text, ""
    subject = m.group("subject").strip(" ,")
    if rule.kind == "negate":  # "A right chest tube has been removed." -> "No right chest tube."
        subject = _LEADING_ARTICLE.sub("", subject) or subject
        return (
            f"No {subject[0].lower() + subject[1:] if subject[:2] != subject[:2].upper() else subject}.",
            "no",
        )
    # predicate: keep the subject only when it names a finding ("Heart size is unchanged." says nothing)
    if not carries_finding(subject, rules, names_finding):
        return "", ""
    verb = m.group("verb").lower()
    plural = verb in ("are", "have", "remain", "appear", "look", "persist") or verb.startswith("continue ")
    return f"{subject} {'are' if plural else 'is'} present.", "are is present"


@dataclass(frozen=True, slots=True)
class SentenceEdit:
    text: str | None  # None: removed
    categories: frozenset[str]  # removed categories the original sentence contained
    action: str  # kept / rephrased / removed
    residual: frozenset[str] = frozenset()  # every category the detector still finds in ``text``
    foreign: tuple[str, str] | None = None  # (token, rule name): a token no input or replacement holds
    lost_finding: bool = False  # removed although it names a finding the rules could not keep


def _rephrase(
    body: str,
    order: tuple[str, ...],
    at: int,
    start: int,
    rules: RuleSet,
    names_finding: Callable[[str], bool] | None,
    memo: dict,
    body_tokens: set[str] | None = None,  # tokens(body), when known
) -> tuple[str, tuple[str, str] | None]:
    """(``body`` rephrased by the rules of the categories ``order[at:]``, from the ``start``-th rule of
    ``order[at]`` on; "" when a rule left nothing), and the first corrupting token (with the rule's name)
    those rules made, or None. Each category's rules are tried in order where their guards let them; after
    a change, the guards are asked again for the rules after the one that made it.

    The rephrasing from a given body on is the same whichever sentence it came from, so it is remembered
    in ``memo`` for each body reached (sentences differing in what a first rule cuts, "Compared to the prior
    study, X" and "In comparison with the study of ___, X", go on from the same "X")."""
    key = (body, order, at, start)
    done = memo.get(key)
    if done is not None:
        return done
    lower = body.lower()
    if body_tokens is None:
        body_tokens = set(_TOKEN.findall(lower))
    for c in range(at, len(order)):
        cat = order[c]
        cat_rules = rules.rules[cat]
        for k in rules.guards[cat].candidates(lower, start if c == at else 0, body_tokens):
            rule = cat_rules[k]
            new, inserted = _apply(rule, body, rules, names_finding)
            if new == body:
                continue
            new_tokens = tokens(new)
            extra = new_tokens - body_tokens
            if extra and inserted:
                extra -= tokens(inserted)
            foreign = (min(extra), rule.name) if extra else None
            if not new.strip():
                done = ("", foreign)
            else:
                rest, later = _rephrase(new, order, c, k + 1, rules, names_finding, memo, new_tokens)
                done = (rest, foreign or later)
            memo[key] = done
            return done
    done = memo[key] = (body, None)
    return done


def _tidied(before: str, rules: RuleSet, memo: dict) -> tuple[str, tuple[str, str] | None]:
    """(the rephrased body tidied, "" when nothing with content is left; the first token tidying made that
    it may not make, or None), remembered in ``memo``."""
    key = ("tidy", before)
    done = memo.get(key)
    if done is not None:
        return done
    body = tidy(before)
    # tidying deletes, re-cases and turns "a" into "an" (or back): any other new token means it glued two
    # words
    before_tokens = tokens(before)
    extra = tokens(body) - before_tokens
    if before_tokens & _ARTICLES:
        extra -= _ARTICLES
    foreign = (min(extra), "tidy") if extra else None
    if body and not has_content(body, rules):
        body = ""
    done = memo[key] = (body, foreign)
    return done


def rewrite_sentence(
    sentence: str,
    removes: frozenset[str],
    rules: RuleSet | None = None,
    names_finding: Callable[[str], bool] | None = None,
    found: frozenset[str] | None = None,
    memo: dict | None = None,
    detected: dict[str, frozenset[str]] | None = None,
) -> SentenceEdit:
    """Rephrase or remove one sentence for a scenario removing ``removes``; ``names_finding(phrase)``
    decides whether "<phrase> is unchanged" keeps "<phrase> is present." (default: ``finding_words``).
    ``found``: ``detect(sentence, removes)``, when the caller knows it already. ``memo``: what rephrasing
    learnt from earlier sentences with the same ``rules`` and ``names_finding`` (a dict the caller keeps).
    ``detected``: text -> ``frozenset(detect(text))`` of texts detected already (looked up and added to)."""
    rules = rules or load_rules()
    if found is None:
        found = frozenset(detect(sentence, removes, rules))
    if not found:
        return SentenceEdit(sentence, found, "kept")
    if memo is None:
        memo = {}
    if detected is None:
        detected = {}
    prefix = _SENTENCE_PREFIX.match(sentence).group()
    order = _order_of(found)
    body, foreign = _rephrase(sentence[len(prefix) :], order, 0, 0, rules, names_finding, memo)
    if body:
        body, tidy_foreign = _tidied(body, rules, memo)
        foreign = foreign or tidy_foreign
    if body:
        text = prefix + body
        # the prefix too: a heading may say "lateral"
        residual = detected.get(text)
        if residual is None:
            residual = detected[text] = frozenset(detect(text, CATEGORIES, rules))
        if residual.isdisjoint(removes):
            return SentenceEdit(text, found, "rephrased", residual, foreign)
    # a sentence naming a finding that the rules could not rephrase: the caller drops the target rather than
    # lose the finding silently (communication sentences carry none worth keeping)
    lost = found != {"comm"} and carries_finding(sentence, rules, names_finding)
    return SentenceEdit(None, found, "removed", foreign=foreign, lost_finding=lost)


@cache
def _order_of(found: frozenset[str]) -> tuple[str, ...]:
    return tuple(c for c in _RULE_ORDER if c in found)


def _renumber(sentences: list[str]) -> list[str]:
    """Keep a numbered impression numbered 1, 2, 3 after items were removed."""
    out, n = [], 0
    for s in sentences:
        m = _LIST_MARKER.match(s)
        if m:
            n += 1
            s = f"{n}. {s[m.end() :]}"
        out.append(s)
    return out


NO_COUNTS: Counter = Counter()  # shared, never mutated
_NO_CATEGORIES: frozenset[str] = frozenset()
RECENT_TEXT_EDITS = 8  # see RulesRewriter._text_edits


@dataclass(slots=True)  # one per distinct text is cached (see RulesRewriter.text)
class TextEdit:
    text: str | None  # None when every sentence was removed
    sentences: int
    removed: Counter  # category -> sentences removed
    rephrased: Counter
    changed: list[tuple[str, str | None]] = field(default_factory=list)  # (original, new) sentences
    residual: frozenset[str] = frozenset()  # categories the detector finds in rephrased sentences
    foreign: tuple[str, str] | None = None  # (token, rule name) of the first corrupting edit
    lost_finding: bool = False  # a removed sentence named a finding
    # whether every changed sentence keeps its label vector, as the label checks made so far say (None: one
    # was not checked yet; check_edits asks its sentence_labels_equal)
    labels_kept: bool | None = None


NO_TEXT = TextEdit(None, 0, NO_COUNTS, NO_COUNTS)  # the edit of no text (shared, never mutated)


def _flagged(sentences: list[str], found: tuple[frozenset[str], ...]) -> tuple:
    """:attr:`_Text.flagged` of a text's ``sentences`` and their categories ``found``."""
    return tuple((k, s, cats) for k, (s, cats) in enumerate(zip(sentences, found, strict=True)) if cats)


@dataclass(slots=True)
class _Text:
    """What the rewriter knows of a text: its sentences, their categories (all of them, not only those a
    scenario removes), their union, and its edit when nothing is removed from it (made once needed)."""

    sentences: list[str]
    # normalise_space(text): the text itself where it is single-spaced already (most are), else " ".join of
    # the sentences (they were split from it at spaces)
    spaced: str
    # (position, sentence, its categories) of the sentences with categories, in order
    flagged: tuple[tuple[int, str, frozenset[str]], ...] = ()
    categories: frozenset[str] = frozenset()  # the union of its sentences' categories
    as_written: TextEdit | None = None


class RulesRewriter:
    """The embedded rewriter: deterministic; detection is cached per sentence and edits per (sentence,
    categories to remove that the sentence contains), so scenarios share the work."""

    name = "rules"

    def __init__(
        self,
        rules: RuleSet | None = None,
        label_vector: Callable[[str], dict] | None = None,
        learn_findings: bool = True,
    ):
        self.rules = rules or load_rules()
        self._found: dict[str, frozenset[str]] = {}
        self._edits: dict[tuple[str, frozenset], SentenceEdit] = {}
        self._texts: dict[str, _Text] = {}
        self._labels_equal: dict[tuple[str, str | None], bool] = {}
        # the categories of the sentences removed / rephrased in a text, in order -> their counts (few distinct:
        # one shared Counter each, never mutated, like NO_COUNTS)
        self._counts: dict[tuple[str, ...], Counter] = {}
        # (text, the categories removed from it) -> its edit, for the last few texts: a study's scenarios ask
        # for the edits of its two texts in turn (sn, sw, mn, mw remove different categories); kept few, as
        # a TextEdit with its counters costs about a kilobyte
        self._text_edits: dict[tuple[str, frozenset], TextEdit] = {}
        # what rephrasing learnt (see rewrite_sentence)
        self._rephrased: dict = {}
        # text -> whether its label vector names a finding, learnt from the label checks of the edits (kept
        # after the run: the token weights' emphasis asks the same of the same sentences); not learnt without
        # ``learn_findings`` (a build without token weights has no use for it)
        self.finding_in: dict[str, bool] = {}
        self.learn_findings = learn_findings
        # with the findings extractor, "X is unchanged" keeps X when X carries a positive or uncertain
        # label (or a finding word: see carries_finding)
        self.names_finding = (
            (lambda phrase: any(v != "negative" for v in label_vector(phrase).values()))
            if label_vector
            else None
        )

    def clear_caches(self) -> None:
        self._found, self._edits, self._texts, self._labels_equal = {}, {}, {}, {}
        self._counts, self._text_edits, self._rephrased = {}, {}, {}

    def prepare(self, items, workers: int = 1, label_vector: Callable[[str], dict] | None = None) -> None:
        """Fill the caches for ``items`` ((text, removes) pairs) before rewriting them one by one: the
        distinct sentences are detected, and the distinct (sentence, categories) edits made and
        label-checked, on ``workers`` processes (fork), so no work is repeated or serial."""
        # the distinct (text, removes) pairs, in order (a study's text comes once per scenario)
        items = dict.fromkeys(items)
        intern: dict[str, str] = {}
        texts: dict[str, _Text] = self._texts
        new_texts: list[_Text] = []
        for text in dict.fromkeys(map(itemgetter(0), items)):
            if text and text not in texts:
                spaced = normalise_space(text)
                sentences = _split_single_spaced(spaced)
                texts[text] = record = _Text(list(map(intern.setdefault, sentences, sentences)), spaced)
                new_texts.append(record)
        t0 = time.perf_counter()
        todo = [x for x in intern if x not in self._found]
        # one object per distinct set of categories (a handful): compact, and compared by identity
        shared: dict[frozenset[str], frozenset[str]] = {}
        found = _pool_map(_detect_worker, todo, workers, self, label_vector)
        self._found.update(zip(todo, [shared.setdefault(c, c) for c in found], strict=True))
        found_of = self._found.__getitem__
        for record in new_texts:
            found = tuple(map(found_of, record.sentences))
            categories = frozenset().union(*found)
            record.categories = shared.setdefault(categories, categories)
            if categories:
                record.flagged = _flagged(record.sentences, found)
        # the (sentence, categories to remove that it contains) edits the items ask for: the sentences of the
        # texts are gathered by the categories removed from them (few distinct sets), each visited once per set
        edits = self._edits
        meet: dict[tuple[frozenset, frozenset], frozenset] = {}  # (text's categories, removes) -> both
        # categories removed -> the sentences of the texts they are removed from
        asked: dict[frozenset, set[str]] = {}
        for text, removes in items:
            if text:
                record = texts[text]
                categories = record.categories
                if categories and not categories.isdisjoint(removes):
                    eff = meet.get((categories, removes))
                    if eff is None:
                        eff = meet[(categories, removes)] = categories & removes
                    sentences = asked.get(eff)
                    if sentences is None:
                        sentences = asked[eff] = set()
                    sentences.update(record.sentences)
        keys: dict[tuple[str, frozenset], None] = {}
        for eff, sentences in asked.items():
            for x in sentences:
                found = found_of(x)
                if found and not found.isdisjoint(eff):
                    if not found <= eff:
                        found &= eff
                    if (x, found) not in edits:
                        keys[(x, found)] = None
        todo_keys = list(keys)
        t1 = time.perf_counter()
        for key, (edit, same, finding_before, finding_after) in zip(
            todo_keys, _pool_map(_edit_worker, todo_keys, workers, self, label_vector), strict=True
        ):
            self._edits[key] = edit
            if same is not None:
                self._labels_equal[(key[0], edit.text)] = same
                if finding_before is not None:
                    self.finding_in[key[0]] = finding_before
                    if edit.text:
                        self.finding_in[edit.text] = finding_after
        log.info(
            "rules rewriter: %d texts, %d distinct sentences (detected in %.1f s), %d edits (%.1f s)",
            len(new_texts),
            len(todo),
            t1 - t0,
            len(todo_keys),
            time.perf_counter() - t1,
        )

    def labels_equal(self, before: str, after: str | None, label_vector: Callable[[str], dict]) -> bool:
        """Whether a sentence and its rewrite carry the same findings labels (cached)."""
        key = (before, after)
        same = self._labels_equal.get(key)
        if same is None:
            same = self._labels_equal[key] = label_vector(before) == label_vector(after or "")
        return same

    def labels_check(self, label_vector: Callable[[str], dict]) -> Callable[[str, str | None], bool]:
        """:meth:`labels_equal` with ``label_vector`` as a function of (before, after): the label checks
        :meth:`prepare` made are looked up in it directly (a call through a ``functools.partial`` with a
        keyword cost twice as much, a few hundred thousand times a run)."""
        checked, labels_equal = self._labels_equal, self.labels_equal

        def same(before: str, after: str | None) -> bool:
            known = checked.get((before, after))
            return labels_equal(before, after, label_vector) if known is None else known

        return same

    def found(self, sentence: str) -> frozenset[str]:
        cats = self._found.get(sentence)
        if cats is None:
            cats = self._found[sentence] = frozenset(detect(sentence, CATEGORIES, self.rules))
        return cats

    def sentence(self, sentence: str, removes: frozenset[str]) -> SentenceEdit:
        found = self.found(sentence) & removes
        if not found:
            return SentenceEdit(sentence, found, "kept")
        key = (sentence, found)
        edit = self._edits.get(key)
        if edit is None:
            edit = self._edits[key] = rewrite_sentence(
                sentence, found, self.rules, self.names_finding, found, self._rephrased, self._found
            )
        return edit

    def _text(self, text: str) -> _Text:
        """What is known of ``text`` (cached: a study's text is rewritten for each of its scenarios)."""
        record = self._texts.get(text)
        if record is None:
            spaced = normalise_space(text)
            record = self._texts[text] = _Text(_split_single_spaced(spaced), spaced)
            found = tuple(map(self.found, record.sentences))
            record.categories = frozenset().union(*found)
            record.flagged = _flagged(record.sentences, found)
        return record

    def split(self, text: str) -> list[str]:
        """Sentences of ``text``."""
        return self._text(text).sentences

    def _counter(self, categories: list[str]) -> Counter:
        key = tuple(categories)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = Counter(key)
        return counts

    def text(self, text: str | None, removes: frozenset[str]) -> TextEdit:
        """The edit of ``text`` for a scenario removing ``removes`` (cached: the same object for the same text
        and categories to remove from it; never mutate it)."""
        if not text:
            return NO_TEXT
        record = self._texts.get(text) or self._text(text)
        sentences = record.sentences
        categories = record.categories
        if categories.isdisjoint(removes):  # nothing to remove: the text as written (single-spaced, so the
            # sentences joined)
            same = record.as_written
            if same is None:
                # the text itself where it is single-spaced already (one object: no copy per scenario)
                same = record.as_written = TextEdit(record.spaced, len(sentences), NO_COUNTS, NO_COUNTS)
            return same
        eff = categories if categories <= removes else categories & removes
        key = (text, eff)
        cached = self._text_edits.get(key)
        if cached is not None:
            return cached
        # the sentences as written, those with categories to remove replaced by their edits (None: removed);
        # only the flagged sentences are visited, and their label checks looked up as they are met (once per
        # edit of a text: check_edits asks for them for each target the edit is in, and a study's scenarios
        # share it)
        kept = list(sentences)
        removed, rephrased, changed, residual = [], [], [], set()
        foreign, lost, dropped = None, False, False
        labels_kept: bool | None = True
        edits, checked = self._edits, self._labels_equal
        for k, s, found in record.flagged:
            if found.isdisjoint(eff):  # kept as written (what self.sentence would say, without the edit)
                continue
            edit = edits.get((s, found if found <= eff else found & eff)) or self.sentence(s, eff)
            if edit.foreign and not foreign:
                foreign = edit.foreign
            kept[k] = new = edit.text
            if new is None:  # removed
                lost = lost or edit.lost_finding
                removed += edit.categories
                dropped = True
            elif edit.action == "rephrased":
                rephrased += edit.categories
                if edit.residual:
                    residual |= edit.residual
            else:
                continue
            changed.append((s, new))
            if labels_kept:
                same = checked.get((s, new))
                if not same:
                    labels_kept = None if same is None else False
        if dropped:
            kept = [s for s in kept if s is not None]
            if removed and any(_LIST_MARKER.match(s) for s in kept):
                kept = _renumber(kept)
        result = TextEdit(
            " ".join(kept) or None,
            len(sentences),
            self._counter(removed) if removed else NO_COUNTS,
            self._counter(rephrased) if rephrased else NO_COUNTS,
            changed,
            frozenset(residual) if residual else _NO_CATEGORIES,
            foreign,
            lost,
            labels_kept,
        )
        if len(self._text_edits) >= RECENT_TEXT_EDITS:
            self._text_edits.clear()
        self._text_edits[key] = result
        return result


# --- parallel preparation (fork: workers inherit the rewriter and the label function) --------------------

_WORKER: dict = {}
MIN_CHUNK = 256  # items per task: below this, forking costs more than it saves


def _detect_worker(sentences: list[str]) -> list[frozenset[str]]:
    rw = _WORKER["rewriter"]
    return [frozenset(detect(x, CATEGORIES, rw.rules)) for x in sentences]


def names_a_finding(labels: dict[str, str]) -> bool:
    """Whether a label vector holds a positive or uncertain finding."""
    return list(labels.values()).count("negative") != len(labels)


def _edit_worker(keys: list[tuple[str, frozenset]]) -> list[tuple]:
    """(edit, labels equal, the sentence names a finding, its rewrite does) per key (None without labels;
    the last two None unless the rewriter learns them)."""
    rw, lv = _WORKER["rewriter"], _WORKER["label_vector"]
    learn = rw.learn_findings
    out = []
    for sentence, found in keys:
        edit = rewrite_sentence(sentence, found, rw.rules, rw.names_finding, found, rw._rephrased, rw._found)
        if lv is None:
            out.append((edit, None, None, None))
            continue
        before, after = lv(sentence), lv(edit.text or "")
        finding = (names_a_finding(before), names_a_finding(after)) if learn else (None, None)
        out.append((edit, before == after, *finding))
    return out


def _on_range(fn, start: int, end: int) -> list:
    """``fn`` on a range of the items a forked worker inherited (the items are not pickled to it)."""
    return fn(_WORKER["items"][start:end])


def _pool_map(fn, items: list, workers: int, rewriter: RulesRewriter, label_vector) -> list:
    """``fn`` over chunks of ``items`` (in order), in ``workers`` forked processes when worth it."""
    if not items:
        return []
    _WORKER.update(rewriter=rewriter, label_vector=label_vector, items=items)
    size = max(MIN_CHUNK, min(4096, len(items) // (8 * max(workers, 1)) or 1))
    ranges = [(fn, start, min(start + size, len(items))) for start in range(0, len(items), size)]
    try:
        if workers > 1 and len(ranges) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                parts = pool.starmap(_on_range, ranges, chunksize=1)
        else:
            parts = [_on_range(*r) for r in ranges]
    finally:
        _WORKER.clear()
    return [x for part in parts for x in part]


# --- the check every rewrite passes -----------------------------------------------------------------------

LabelFn = Callable[[str], dict]


def joined(finding: str | None, impression: str | None) -> str:
    return " ".join(t for t in (finding, impression) if t)


def check(
    original: tuple[str | None, str | None],
    rewrite: tuple[str | None, str | None],
    removes: frozenset[str],
    label_vector: LabelFn,
    rules: RuleSet | None = None,
) -> str | None:
    """None when ``rewrite`` (finding, impression) is acceptable for a scenario removing ``removes``;
    otherwise the reason: ``empty`` (nothing left), ``residual_<cat>`` (the detector still finds removed
    content), ``labels_changed`` (the findings label vector differs from the original's)."""
    if not any(t and t.strip() for t in rewrite):
        return "empty"
    residual = detect(joined(*rewrite), removes, rules)
    if residual:
        return "residual_" + "_".join(c for c in CATEGORIES if c in residual)
    before, after = joined(*original), joined(*rewrite)
    if before != after and label_vector(before) != label_vector(after):
        return "labels_changed"
    return None


def check_edits(
    original: tuple[str | None, str | None],
    edits: tuple[TextEdit, TextEdit],
    removes: frozenset[str],
    label_vector: LabelFn,
    sentence_labels_equal: Callable[[str, str | None], bool] | None = None,
) -> str | None:
    """:func:`check` for rules rewrites, evaluated from the sentence edits: the residue is what the
    detector found in the rewritten sentences, and the label vectors are compared sentence by sentence
    (cached), falling back to the whole texts only when a sentence's labels differ (the extractor reads
    sentence by sentence, so equal sentences give equal texts). One more reason than :func:`check`:
    ``finding_removed``, a sentence naming a finding was removed because the rules could not rephrase it.
    A corrupting edit (:attr:`TextEdit.foreign`) is not a reason but an error: see
    :func:`raise_if_corrupt`."""
    rewrite = (edits[0].text, edits[1].text)
    if not (edits[0].changed or edits[1].changed or edits[0].residual or edits[1].residual) and any(rewrite):
        return None  # nothing was touched
    if not any(t and t.strip() for t in rewrite):
        return "empty"
    if edits[0].lost_finding or edits[1].lost_finding:
        return "finding_removed"
    residual = (edits[0].residual | edits[1].residual) & removes
    if residual:
        return "residual_" + "_".join(c for c in CATEGORIES if c in residual)
    same = sentence_labels_equal or (lambda before, after: label_vector(before) == label_vector(after or ""))
    for e in edits:
        kept = e.labels_kept
        if kept is None:
            kept = all(same(before, after) for before, after in e.changed)
        if not kept:  # a sentence's labels differ: the whole texts decide (whichever sentence it was)
            if label_vector(joined(*original)) != label_vector(joined(*rewrite)):
                return "labels_changed"
            return None
    return None


def raise_if_corrupt(edits: tuple[TextEdit, ...], study_id: int, scenario: str) -> None:
    """Fail on a rewrite token that is neither a word of the input nor of the replacement of the rule
    that made it: such a token is a fragment glued to a word by a rule matching inside a word."""
    for e in edits:
        if e.foreign:
            token, rule = e.foreign
            where = (
                "the sentence tidying (workflow/rg4/rewrite.py)"
                if rule == "tidy"
                else f"{rule} (libs/rg4_rules.yaml)"
            )
            raise RewriteCorruption(
                f"study {study_id} ({scenario}): the rules rewrite produced the token {token!r}, which is "
                f"neither in the input nor in the replacement of {where}"
            )
