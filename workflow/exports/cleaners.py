"""The R2Gen report cleaners (used unchanged by R2GenGPT, MeGPT and LLM-RG4), reimplemented from their
documented behaviour (reference/mimic_rg4.md §5.2), quirks included, so a cleaned export scores exactly
like the seeds' own preprocessing:

* plain ``str.replace`` passes a fixed number of times (so ``"___"`` runs are not fully collapsed);
* list numbers ``1.`` … ``5.`` are deleted or turned into sentence breaks;
* per sentence, quotes/slashes are deleted and a punctuation class is removed (digits survive, so
  ``1.5`` becomes ``15``); in the IU cleaner ``:-\\[`` is a character *range* (``:`` to ``[``);
* empty sentences are kept (their filter is always true), so ``" .  . "`` artefacts survive;
* sentences are joined with ``" . "`` and terminated with ``" ."``; empty input gives ``" ."``.
"""

from __future__ import annotations

import re

_MIMIC_SENTENCE_PUNCT = re.compile(r"[.,?;*!%^&_+()\[\]{}]")
_IU_SENTENCE_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")  # noqa: RUF001 - the range is the point
_NUMBERING = (
    (("1. ", ""),)
    + tuple((f". {n}. ", ". ") for n in range(2, 6))
    + tuple((f" {n}. ", ". ") for n in range(2, 6))
)


def _repeat(text: str, old: str, new: str, times: int) -> str:
    for _ in range(times):
        if old not in text:  # nor will it be after another pass: the passes left are no-ops
            break
        text = text.replace(old, new)
    return text


def _numbering(text: str) -> str:
    if ". " not in text:  # in every pattern (most of rg4's single sentences have none)
        return text
    for old, new in _NUMBERING:
        text = text.replace(old, new)
    return text


def _sentence(sentence: str, punct: re.Pattern) -> str:
    for ch in ('"', "/", "\\", "'"):
        sentence = sentence.replace(ch, "")
    return punct.sub("", sentence.strip().lower())


def _mimic_collapsed(report: str) -> str:
    text = report.replace("\n", " ")
    text = _repeat(text, "__", "_", 7)
    text = _repeat(text, "  ", " ", 6)
    return _repeat(text, "..", ".", 8)


def clean_mimic(report: str) -> str:
    text = _numbering(_mimic_collapsed(report)).replace(":", " :").strip().lower()
    return " . ".join(_sentence(s, _MIMIC_SENTENCE_PUNCT) for s in text.split(". ")) + " ."


def clean_pieces(sentence: str) -> tuple[str, list[str]]:
    """The MIMIC cleaner's steps on one sentence of a longer text: (the text after its collapsing passes,
    its cleaned pieces). Joined with " . " and ended with " .", the pieces of consecutive sentences are
    the cleaned text when no pass matches across the space between them (rg4's token weights check
    that)."""
    collapsed = _mimic_collapsed(sentence)
    text = _numbering(collapsed).replace(":", " :").lower()
    return collapsed, [_sentence(s, _MIMIC_SENTENCE_PUNCT) for s in text.split(". ")]


def clean_iu(report: str) -> str:
    text = _repeat(report, "..", ".", 3)
    text = _numbering(text).strip().lower()
    return " . ".join(_sentence(s, _IU_SENTENCE_PUNCT) for s in text.split(". ")) + " ."


CLEANERS = {"mimic": clean_mimic, "iu": clean_iu}
