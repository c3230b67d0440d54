"""LLM-RG4's token weights (``new_scores``): which target tokens its sentence-level loss emphasises.

LLM-RG4's stage-2 training (``--loss_mode sentence --sentence_ratio 0.75``) adds to the cross-entropy a
second mean over the target positions whose ``new_scores`` value is non-zero (reference/mimic_rg4.md
§2.5). The released files store them as binary, one per position of the LLaMA-tokenised training target
``clean(target) + '</s>'`` *including the BOS at index 0*, padded/cropped to 100 positions. The
original marked the sentences holding a CheXbert-positive or -uncertain label (located by integrated
gradients); ours are span-based: a sentence is emphasised when the key-information extractor finds a
positive or uncertain finding mention (an evidence span) in it.

"Target" is what the loader sees: finding and impression joined (skipping the ``"s"`` sentinel), cleaned
with the R2Gen MIMIC cleaner (lower case, punctuation removed, sentences joined by ``" . "``). The
extractor reads the *raw* sentences of each section (negation scopes need their punctuation), cached per
distinct sentence; a marker put before their words survives the cleaner and tells which cleaned sentences
they became (a cleaned sentence is emphasised when it holds words of an emphasised raw sentence).

Speed (MIMIC scale: 323k distinct targets, 2.2M sentence occurrences, 250k distinct sentences): the work is
done per distinct sentence — emphasis, the cleaner's steps, token counts — and a target's weights are its
sentences' joined (:meth:`TokenScorer.scores_bytes`); a sample of targets is checked the whole-target way.

The tokenizer is the user's (config ``rg4.scores.tokenizer``: a folder with the ``tokenizer.json`` of the
LLM they train, e.g. Vicuna-7B v1.5, or that file). Without one the files keep ``new_scores: []``,
which the loader pads to all zeros (the emphasis term is then off).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workflow.exports.cleaners import clean_mimic, clean_pieces
from workflow.rg4.rewrite import _SENTENCE_END

log = logging.getLogger(__name__)

MAX_LENGTH = 100  # LLM-RG4's training max_length: the loader pads/crops scores to it
VERIFY_EVERY = 64  # the word-by-word fast path is checked against whole-text tokenisation this often
EOS = "</s>"  # what the loader appends to the cleaned target before tokenising
NO_TOKENIZER_NOTE = (
    "new_scores: [] in every record (no rg4.scores.tokenizer configured): LLM-RG4's sentence-level loss "
    "emphasis (--loss_mode sentence) is off; training reduces to plain cross-entropy."
)


class ScoresConfigError(ValueError):
    """``rg4.scores`` is unusable (the message names the key and the file)."""


# --- which cleaned sentences are emphasised ----------------------------------------------------------

# A private-use character put before every word of an emphasised sentence before cleaning: no step of
# the R2Gen cleaner touches it (its patterns hold no letters, and it is neither space nor punctuation),
# so a cleaned sentence holds it exactly when it holds words of an emphasised sentence.
MARK = "\ue000"
_WORD_START = re.compile(r"(?<!\w)(?=[A-Za-z])")
# A list number the cleaner removes when a sentence ending in "." comes before it ("... effusion. 2. No
# pneumothorax." -> ". 2. " -> ". "), followed by no digit (which another pass could take as a number).
_CROSSING_NUMBER = re.compile(r"[2-5]\. (?=\D)")
# The ends of a sentence that a list-number pass of the cleaner could match together with the space after
# it ("... 1. ", " 2. ", ". 2. ") or before it (" 2. ", ". 2. ").
_NUMBER_END = re.compile(r"1\.$|(?:^|\s)[2-5]\.$")
_NUMBER_START = re.compile(r"[2-5]\. ")


# The letters _WORD_START does not mark: after a digit or "_" (word characters that are not letters).
_UNMARKED_LETTER = re.compile(r"[0-9_][A-Za-z]")
_LETTER = re.compile(r"[a-z]")
# The spaces between two words of a cleaned sentence, not those next to another space ("of  the": "___,"
# removed by the cleaner): a word-by-word tokenizer splits a text there and nowhere else.
_SINGLE_SPACE = re.compile(r"(?<! ) (?! )")


def _marked_pieces(sentence: str, pieces: list[str]) -> list[bool] | None:
    """Which of the cleaned ``pieces`` of an ASCII ``sentence`` hold words MARK-ed by :meth:`TokenScorer._marked`
    (None when the marked sentence cleans differently). No step of the cleaner matches a letter or MARK,
    so the marked sentence cleans to the pieces with MARK before the same letters; and every run of
    letters starts with a marked one unless it follows a digit or "_" (neither cleaned away with a
    letter, nor split from one): without those, a piece holds MARK exactly when it holds a letter."""
    if not _UNMARKED_LETTER.search(sentence):
        return [_LETTER.search(p) is not None for p in pieces]
    marked = clean_pieces(_WORD_START.sub(MARK, sentence))[1]
    if [p.replace(MARK, "") for p in marked] != pieces:  # unless the cleaner learns to touch MARK
        return None
    return [MARK in p for p in marked]


# _RUNS[flag][n]: n weights ``flag``, one object per run (most sentences are one run of one flag)
_RUNS = tuple(tuple(bytes([flag]) * n for n in range(256)) for flag in (0, 1))


def _run(flag: bool, n: int) -> bytes:
    return _RUNS[flag][n] if n < 256 else bytes([flag]) * n


def _split(text: str) -> tuple[list[str], bool]:
    """(the sentences of a section, as :meth:`TokenScorer._marked` cuts them; whether they are separated
    by single spaces)."""
    sentences = _SENTENCE_END.split(text)
    # single spaces between them: the separators (one or more white-space characters each) add up to one
    # character per break
    return sentences, len(text) == sum(map(len, sentences)) + len(sentences) - 1


def _pieces(cleaned: str) -> list[str]:
    """The cleaned sentences: the cleaner joins them with " . " and ends with " .", and removes every "."
    inside them, so splitting undoes the join exactly."""
    return cleaned[:-2].split(" . ")


# --- the weights --------------------------------------------------------------------------------------


def loader_target(finding: str | None, impression: str | None) -> str:
    """The raw target LLM-RG4's loader builds from a record's ``finding`` / ``impression`` (as written in
    the JSON, so with their section labels; None stands for the ``"s"`` sentinel)."""
    return " ".join(t for t in (finding, impression) if t)


def default_emphasis() -> Callable[[str], bool]:
    """Whether a text holds a positive or uncertain finding mention of the key-information extractor
    (its label vector names a finding: the question the rewriter's label check also asks)."""
    from workflow.keyinfo.extract import label_vector
    from workflow.rg4.rewrite import names_a_finding

    def emphasised(text: str) -> bool:
        return names_a_finding(label_vector(text))

    return emphasised


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from ``rg4.scores.tokenizer`` (a folder holding tokenizer.json, or it)."""
    from tokenizers import Tokenizer

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        hint = ""
        if p.is_dir() and (p / "tokenizer.model").is_file():
            hint = (
                " (it has a SentencePiece tokenizer.model only: write the fast tokenizer once with "
                "transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
            )
        raise ScoresConfigError(f"rg4.scores.tokenizer: no tokenizer.json at {file}{hint}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises a bare Exception on a malformed file
        raise ScoresConfigError(f"rg4.scores.tokenizer: {file} is not a tokenizer.json ({exc})") from exc


class _TokenCounts(dict):
    """word -> its number of tokens, counted (by ``count``) on its first look-up."""

    def __init__(self, count: Callable[[str], int]):
        super().__init__()
        self._count_new = count

    def __missing__(self, word: str) -> int:
        n = self[word] = self._count_new(word)
        return n


@dataclass
class TokenScorer:
    """Binary ``new_scores`` per raw target: 1 on the tokens of emphasised sentences, 0 on BOS, EOS,
    padding and other sentences; exactly ``max_length`` values (cropped like the loader's labels)."""

    tokenizer: object  # tokenizers.Tokenizer
    emphasised: Callable[[str], bool]
    max_length: int = MAX_LENGTH
    name: str = ""
    word_by_word: bool = True  # the fast path (see scores); switched off by a failed verification
    by_sentence: bool = True  # its sentence-by-sentence part (see scores_bytes; off: target by target)
    # the section labels the targets' texts start with (workflow.rg4.build.SECTION_PREFIXES): no report text,
    # so a sentence's emphasis is asked of it without its label, which the rewriter's label checks mostly
    # asked already (see learn_emphasis)
    section_labels: tuple[str, ...] = ()

    def __post_init__(self):
        self._sentence_cache: dict[str, bool] = {}
        # a word's tokens as the first of a text, and after a space
        self._first_counts = _TokenCounts(
            lambda word: len(self.tokenizer.encode(word, add_special_tokens=False).ids)
        )
        self._later_counts = _TokenCounts(
            lambda word: len(self.tokenizer.encode("a " + word, add_special_tokens=False).ids) - self._anchor
        )
        self._splits: dict[str, tuple[tuple[str, ...], bool]] = {}
        self._parts: dict[tuple[str, bool], tuple | None] = {}
        # raw sentence -> (its parts as a target's first sentence, after a sentence that ends clean): what
        # _joined looks up per sentence occurrence
        self._joinable: dict[str, tuple[tuple | None, tuple | None]] = {}
        self._sentence_copies: dict[str, str] = {}
        self._anchor = len(self.tokenizer.encode("a", add_special_tokens=False).ids)
        self._bos = self.tokenizer.token_to_id("<s>")
        if self._bos is None or self.tokenizer.token_to_id(EOS) is None:
            raise ScoresConfigError(
                f"rg4.scores.tokenizer: {self.name or 'the tokenizer'} has no '<s>' / '</s>' tokens; LLM-RG4's "
                "targets are LLaMA-tokenised (e.g. Vicuna-7B v1.5)"
            )

    def learn_emphasis(self, known: dict[str, bool]) -> None:
        """Sentences whose emphasis is already known (e.g. from the rewriter's label checks, which ask
        the extractor the same question: :func:`workflow.rg4.rewrite.names_a_finding`)."""
        self._sentence_cache.update(known)

    def clear_caches(self) -> None:
        """Forget the sentences and sections seen (hundreds of MB at MIMIC scale; the word counts stay)."""
        self._sentence_cache, self._splits, self._parts, self._sentence_copies = {}, {}, {}, {}
        self._joinable = {}

    def _sentence_emphasised(self, raw_sentence: str) -> bool:
        hit = self._sentence_cache.get(raw_sentence)
        if hit is None:
            unlabelled = self._unlabelled(raw_sentence)
            if unlabelled is not raw_sentence:
                hit = self._sentence_emphasised(unlabelled)
            else:
                hit = bool(raw_sentence.strip()) and self.emphasised(raw_sentence)
            self._sentence_cache[raw_sentence] = hit
        return hit

    def _unlabelled(self, raw_sentence: str) -> str:
        """``raw_sentence`` without the section label it starts with (itself when it has none)."""
        for label in self.section_labels:
            if raw_sentence.startswith(label):
                return raw_sentence[len(label) :]
        return raw_sentence

    def _marked(self, text: str) -> str:
        """``text`` with MARK before every word of its emphasised sentences."""
        out, pos = [], 0
        for m in [*_SENTENCE_END.finditer(text), None]:
            end = len(text) if m is None else m.start()
            sentence = text[pos:end]
            out.append(_WORD_START.sub(MARK, sentence) if self._sentence_emphasised(sentence) else sentence)
            if m is not None:
                out.append(m.group())
                pos = m.end()
        return "".join(out)

    def prepare(
        self, finding: str | None, impression: str | None, verify: bool = True
    ) -> tuple[str, list[int], list[bool]]:
        """(the cleaned target the loader tokenises, where each of its sentences ends in it, whether each
        is emphasised), for a record's JSON ``finding`` / ``impression`` (None for the "s" sentinel).
        ``verify``: also clean the unmarked target and compare (``scores`` does so on a sample)."""
        marked = _pieces(
            clean_mimic(loader_target(*(self._marked(t) if t else None for t in (finding, impression))))
        )
        sentences = [p.replace(MARK, "") for p in marked]
        cleaned = " . ".join(sentences) + " ."
        if verify and cleaned != clean_mimic(
            loader_target(finding, impression)
        ):  # unless the cleaner learns to touch MARK
            raise RuntimeError("rg4 scores: the marked target cleans differently from the target")
        ends, pos = [], 0
        for k, sentence in enumerate(sentences):
            # a sentence owns its terminating " ." (the separator after it), as its full stop
            pos += len(sentence) + (3 if k < len(sentences) - 1 else 2)
            ends.append(pos)
        return cleaned, ends, [MARK in p for p in marked]

    def scores(self, targets: list[tuple[str | None, str | None]]) -> list[list[int]]:
        """``new_scores`` of each (finding, impression) target (see :meth:`scores_bytes`)."""
        return [list(values) for values in self.scores_bytes(targets)]

    def scores_bytes(self, targets: list[tuple[str | None, str | None]]) -> list[bytes]:
        """``new_scores`` of each (finding, impression) target, one byte per position.

        Fast path: LLaMA's tokenizer (like byte-level BPE) never makes a token across a space, so a
        single-spaced text tokenises word by word; and the R2Gen cleaner, on a target whose sentences
        meet as "<word>. <Word>", cleans each sentence as if alone. So each distinct sentence is cleaned,
        checked for emphasis and counted once (:meth:`_sentence_parts`), and a target's weights are its
        sentences' pieces joined. Targets that do not decompose go the per-target way (:meth:`prepare`,
        then word by word). Every ``VERIFY_EVERY``-th target is also prepared and tokenised whole: a
        different cleaning or token count switches this scorer to the per-target, whole-text way for good
        (and says so in the log)."""
        if not self.word_by_word:
            return [bytes(v) for v in self._exact([self.prepare(f, i) for f, i in targets])]
        out: list[bytes | None] = [self._joined(f, i) if self.by_sentence else None for f, i in targets]
        sample = list(range(0, len(targets), VERIFY_EVERY))
        prepared = {k: self.prepare(*targets[k]) for k in sample}
        exact = dict(zip(sample, self._exact([prepared[k] for k in sample]), strict=True))
        wrong = [
            k for k in sample if (out[k] or self._by_words_bytes(*prepared[k])) not in (None, bytes(exact[k]))
        ]
        if wrong:
            log.warning(
                "rg4 scores: %s does not tokenise word by word, or the cleaner does not clean sentence by "
                "sentence (%d of %d sampled targets differ); tokenising whole targets from now on",
                self.name or "the tokenizer",
                len(wrong),
                len(sample),
            )
            self.word_by_word = False
            return self.scores_bytes(targets)
        missing = [k for k, values in enumerate(out) if values is None]
        rest = {k: prepared.get(k) or self.prepare(*targets[k]) for k in missing}
        slow = []
        for k in missing:
            out[k] = self._by_words_bytes(*rest[k])
            if out[k] is None:
                slow.append(k)
        for k, values in zip(slow, self._exact([rest[k] for k in slow]), strict=True):
            out[k] = bytes(values)
        return out

    # --- sentence by sentence ---------------------------------------------------------------------------

    def _split(self, text: str) -> tuple[tuple[str, ...], bool]:
        """(the sentences of a section, as :meth:`_marked` cuts them; whether they are separated by single
        spaces) (cached: sections repeat across scenarios)."""
        got = self._splits.get(text)
        if got is None:
            sentences, single = _split(text)
            one = self._sentence_copies.setdefault  # one object per distinct sentence (a tenth as many)
            got = self._splits[text] = (tuple([one(x, x) for x in sentences]), single)
        return got

    def sentences(self, targets: list[tuple[str | None, str | None]]) -> list[str]:
        """The distinct raw sentences of ``targets`` (what :meth:`prepare_sentences` takes)."""
        texts = dict.fromkeys(text for target in targets for text in target if text)  # sections repeat
        seen: dict[str, None] = {}
        for text in texts:
            seen.update(dict.fromkeys(self._split(text)[0]))
        return list(seen)

    def prepare_sentences(self, sentences: list[str]) -> list[tuple]:
        """What the sentence-by-sentence path needs of each raw sentence (its emphasis, its parts, and the
        parts of its text after a leading list number), for :meth:`adopt_sentences` (so that forked
        workers can compute them once for a parent)."""
        out = []
        for sentence in sentences:
            emphasised = self._sentence_emphasised(sentence)
            numbered = _CROSSING_NUMBER.match(sentence)
            out.append(
                (
                    emphasised,
                    self._sentence_parts(sentence, emphasised),
                    self._sentence_parts(sentence[numbered.end() :], emphasised) if numbered else None,
                )
            )
        return out

    def adopt_sentences(self, sentences: list[str], prepared: list[tuple]) -> None:
        for sentence, (emphasised, parts, rest_parts) in zip(sentences, prepared, strict=True):
            self._sentence_cache[sentence] = emphasised
            self._parts[(sentence, emphasised)] = parts
            numbered = _CROSSING_NUMBER.match(sentence)
            if numbered:
                self._parts[(sentence[numbered.end() :], emphasised)] = rest_parts
            self._joinable[sentence] = (parts, rest_parts if numbered else parts)

    def _joinable_parts(self, sentence: str) -> tuple[tuple | None, tuple | None]:
        """(the parts of a raw sentence as the first of a target, as one following a sentence that ends
        clean: "<word>. 2. <Word>", the cleaner drops the "2. "), cached."""
        got = self._joinable.get(sentence)
        if got is None:
            emphasised = self._sentence_emphasised(sentence)
            first = self._sentence_parts(sentence, emphasised)
            numbered = _CROSSING_NUMBER.match(sentence)
            later = self._sentence_parts(sentence[numbered.end() :], emphasised) if numbered else first
            got = self._joinable[sentence] = (first, later)
        return got

    def _sentence_parts(self, sentence: str, emphasised: bool) -> tuple | None:
        """For the text of one raw sentence: (its cleaned pieces' weights as not-first and as first text of
        a target, whether a sentence may follow it, whether it may follow one), or None when it cannot be
        handled alone (the target then goes the per-target way). Cached."""
        key = (sentence, emphasised)
        if key in self._parts:
            return self._parts[key]
        parts = flags = None
        inner, pieces = clean_pieces(sentence)
        if sentence.isascii() and all(p and p.strip() == p for p in pieces):
            flags = _marked_pieces(sentence, pieces) if emphasised else [False] * len(pieces)
        if flags is not None:
            later, runs, lead, head = self._later_counts, [], 0, ""
            for piece, flag in zip(pieces, flags, strict=True):
                # a word-by-word tokenizer splits a piece at its single spaces: "of  the" (the cleaner's
                # "___," removed) is one unit
                words = _SINGLE_SPACE.split(piece) if "  " in piece else piece.split(" ")
                # a cleaned sentence's full stop goes with it
                n = sum(map(later.__getitem__, words)) + later["."]
                runs.append(_run(flag, n))
                if len(runs) == 1:
                    lead, head = n, words[0]
            # as the first text of a target, only its first word counts differently (no space before it)
            rest = b"".join(runs[1:])
            weights = (runs[0] + rest, _run(flags[0], lead - later[head] + self._first_counts[head]) + rest)
            # no pass of the cleaner may match across the space between two sentences (then each cleans as
            # if alone): the earlier one ends with "." but not with a list number ("1. ", " 2. ", ". 2. "
            # would take the space), the later one does not start with one (but see _CROSSING_NUMBER)
            # (a match is at most 3 characters and ends at the end (or a final newline): searched there)
            ends_clean = inner.endswith(".") and not _NUMBER_END.search(inner, max(len(inner) - 4, 0))
            parts = (weights[0], weights[1], ends_clean, not _NUMBER_START.match(inner))
        self._parts[key] = parts
        return parts

    def _joined(self, finding: str | None, impression: str | None) -> bytes | None:
        """A target's weights from its sentences' (see :meth:`scores_bytes`), or None."""
        values, previous_ends_clean = [b"\x00"], None  # BOS
        joinable = self._joinable
        for text in (finding, impression):
            if not text:
                continue
            # not kept: a section text is in one or two distinct targets, mostly
            sentences, single = self._splits.get(text) or _split(text)
            if not single:
                return None
            for sentence in sentences:
                first, later = joinable.get(sentence) or self._joinable_parts(sentence)
                if previous_ends_clean is None:
                    if first is None:
                        return None
                    values.append(first[1])
                    parts = first
                else:
                    parts = later
                    if not previous_ends_clean or parts is None or not parts[3]:
                        return None
                    values.append(parts[0])
                previous_ends_clean = parts[2]
        values.append(b"\x00")  # the '</s>' the loader appends
        joined = b"".join(values)[: self.max_length]
        return joined + bytes(self.max_length - len(joined))

    def _by_words_bytes(self, cleaned: str, ends: list[int], flags: list[bool]) -> bytes | None:
        values = self._by_words(cleaned, ends, flags)
        return None if values is None else bytes(values)

    def _count(self, word: str, first: bool) -> int:
        return (self._first_counts if first else self._later_counts)[word]

    def _by_words(self, cleaned: str, ends: list[int], flags: list[bool]) -> list[int] | None:
        """The weights from cached per-word token counts; None where the text is not single-spaced
        (the cleaner's " .  . " artefacts), which then goes the whole-text way."""
        if "  " in cleaned or cleaned.startswith(" "):
            return None
        values, first = [0], True  # BOS
        for sentence, emphasised in zip(cleaned[:-2].split(" . "), flags, strict=True):
            flag = int(emphasised)
            for word in (*sentence.split(" "), "."):  # a sentence's full stop goes with it
                values.extend([flag] * self._count(word, first))
                first = False
            if len(values) >= self.max_length:
                break
        values.append(0)  # the '</s>' the loader appends
        values = values[: self.max_length]
        return values + [0] * (self.max_length - len(values))

    def _exact(self, prepared: list[tuple[str, list[int], list[bool]]]) -> list[list[int]]:
        """The weights from tokenising each cleaned target whole, with character offsets."""
        encodings = self.tokenizer.encode_batch([c for c, _, _ in prepared], add_special_tokens=True)
        out = []
        for (cleaned, ends, flags), enc in zip(prepared, encodings, strict=True):
            values = []
            if enc.ids and enc.ids[0] != self._bos:
                values.append(0)  # LLaMA's HF tokenizer adds BOS; this tokenizer.json does not: keep its slot
            if not any(flags):
                values.extend([0] * len(enc.ids))
            else:
                # per character, the flag of its sentence; a token carries the space before its word
                # ("▁the", "Ġthe"), so the last space of a " . " separator goes with the next sentence
                flag = bytearray(len(cleaned))
                last = len(ends) - 1
                for k, emphasised in enumerate(flags):
                    if emphasised:
                        begin = ends[k - 1] - 1 if k else 0
                        end = len(cleaned) if k == last else ends[k] - 1
                        flag[begin:end] = b"\x01" * (end - begin)
                values.extend(
                    0 if special or start >= len(cleaned) else flag[start]
                    for (start, _), special in zip(enc.offsets, enc.special_tokens_mask, strict=True)
                )
            values.append(0)  # the '</s>' the loader appends (a special token: never emphasised)
            values = values[: self.max_length]
            out.append(values + [0] * (self.max_length - len(values)))
        return out


def note(scorer: TokenScorer | None, emphasised: int = 0, positions: int = 0) -> str:
    """The one line the log and the dataset card carry about ``new_scores``."""
    if scorer is None:
        return NO_TOKENIZER_NOTE
    share = f"; {100 * emphasised / positions:.1f}% of the target tokens emphasised" if positions else ""
    return (
        f"new_scores: binary, one per position of the {scorer.name} tokenisation of the cleaned target + "
        f"'</s>' (BOS at 0), {scorer.max_length} values; 1 on the sentences holding a positive or uncertain "
        "finding mention (span-based, our key-information extractor; LLM-RG4 used CheXbert + integrated "
        f"gradients){share}."
    )
