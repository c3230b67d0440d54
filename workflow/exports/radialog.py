"""RaDialog training files: report generation (RG) and instruct (INS) conversations.

Follows RaDialog's dataset recipe (reference/sectioning_radialog.md §3) with our own prompt pools
(``libs/radialog_prompts.yaml``) and its known quirks fixed:

* RG: official ``train`` split, one record per image whose study has a findings section; the prompt
  carries the structured findings (CheXpert labels of the findings section, derived from our findings
  table through ``libs/findings.csv``), or "no common findings" — in INS too. Stratification as the
  original: images with a finding twice, plus ``int(2F/13)`` images without a finding drawn at random,
  so about 1/14 of the records show no finding.
* INS: the train images shuffled and cut in six equal parts like the original (there: easy language,
  unused, summarisation, explanation, region QA, CheXpert QA). The parts that needed an LLM are replaced
  by tasks built deterministically from labels and key information: correction from label edits (part
  2), summarisation from the study's own impression (3), binary CheXpert QA (4a), all-findings QA (4b),
  region QA quoting the report's sentences (5). Easy language (part 0) and reasoning (part 1, images with
  a diagnosis) need language generation: with ``llm.backend: llm`` the LLM layer writes them
  (:mod:`workflow.exports.llm_tasks`), with the rules backend they are not built. Each
  record is a two-turn conversation: the RG prompt → the report (for correction, an edited report),
  then the task → its answer. RG and INS records are shuffled together into the INS file.
* Prompt source: our own paraphrases (``libs/radialog_prompts.yaml``), or with
  ``exports.radialog.prompts_from`` RaDialog's own RG instruction and system message read from the
  user's checkout (:mod:`workflow.exports.prompt_source`), so the files match RaDialog's evaluation.
* Safe templating: only our own slots (``{findings}``, ``{label}``, ...) are filled, in one pass;
  report text is inserted as a value and never parsed as a template, so braces in reports are harmless.
  Fixed seed; records whose answer would be empty are not written.
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import compress
from json.encoder import encode_basestring  # JSONEncoder(ensure_ascii=False).encode of a str
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from workflow.exports.prompt_source import ExternalPrompts
from workflow.keyinfo.libs import load_libs
from workflow.rg4.rewrite import _SENTENCE_BREAK

PROMPTS_PATH = Path(__file__).resolve().parents[2] / "libs" / "radialog_prompts.yaml"
_SLOT = re.compile(r"\{(\w+)\}")


def fill(template: str, **slots: str) -> str:
    """Replace ``{name}`` slots of ``template`` with values, verbatim and in one pass.

    Unlike ``str.format`` on a whole conversation, values (report text) are never re-read, so ``{`` and
    ``}`` in them need no escaping; an unknown slot in ``template`` is an error.
    """

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in slots:
            raise KeyError(f"template slot {{{name}}} has no value")
        return slots[name]

    return _SLOT.sub(sub, template)


@cache
def load_prompts(path: str | None = None) -> dict:
    return yaml.safe_load(Path(path or PROMPTS_PATH).read_text())


def join_names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def conversation(system: str, turns: list[tuple[str, str | None]]) -> str:
    """Vicuna v1.1 rendering; the last turn's reply is None (the training target follows ``ASSISTANT:``)."""
    pieces = [system, " "]
    for user, reply in turns:
        pieces += ("USER: ", user, " ASSISTANT:")
        if reply is not None:
            pieces += (" ", reply, "</s>")
    return "".join(pieces)


def continuation(reply: str, user: str) -> str:
    """What a conversation that ends in ``ASSISTANT:`` grows by when the assistant answers ``reply`` and
    the user then says ``user``: ``conversation(s, [*turns, (u, reply), (user, None)])`` is
    ``conversation(s, [*turns, (u, None)]) + continuation(reply, user)``."""
    return "".join((" ", reply, "</s>", "USER: ", user, " ASSISTANT:"))


# --- draws ------------------------------------------------------------------------------------------------
# The builders draw from random.Random exactly as its methods do, but without a Python call per draw where
# a file takes hundreds of thousands: randrange(n) and shuffle take 32-bit words of the generator, each
# draw below n being getrandbits(n.bit_length()) = (the next word >> (32 - n.bit_length())) until one is
# below n (tests/test_exports.py checks both against random.Random, values and the state after).


def randbelow_many(rng: random.Random, n: int, count: int) -> list[int]:
    """``[rng.randrange(n) for _ in range(count)]``, leaving ``rng`` in the same state: the words drawn
    in bulk (``getrandbits(32 * m)`` is the next ``m`` words, the first one lowest), never more than the
    draws need (each draw takes at least one word)."""
    k = n.bit_length()
    if not 0 < k <= 32:
        return [rng.randrange(n) for _ in range(count)]
    out: list[int] = []
    while len(out) < count:
        m = count - len(out)
        words = np.frombuffer(rng.getrandbits(32 * m).to_bytes(4 * m, "little"), dtype="<u4")
        values = words >> np.uint32(32 - k)
        out.extend(values[values < n].tolist())
    return out


def shuffle(rng: random.Random, x: list) -> None:
    """``rng.shuffle(x)``: the same permutation and generator state, without a method call per item."""
    getrandbits = rng.getrandbits
    for i in reversed(range(1, len(x))):
        n = i + 1
        k = n.bit_length()
        j = getrandbits(k)
        while j >= n:
            j = getrandbits(k)
        x[i], x[j] = x[j], x[i]


# --- labels -----------------------------------------------------------------------------------------------


# the findings rows the labels and the evidence read (the stage reads no others)
LABELLED_ROWS = pc.field("presence").isin(["positive", "uncertain"]) & (
    pc.field("section").is_null() | (pc.field("section") == "findings")
)


def in_findings_section(section: pd.Series) -> pd.Series:
    """Which findings were read in the findings section (a missing section counts as findings)."""
    return section.isna() | (section == "findings")


def chexpert_of() -> dict[str, str]:
    """Canonical name -> CheXpert class, from libs/findings.csv (the one mapping every stage reads)."""
    return {name: cls for name, cls in load_libs().chexpert.items() if cls}


def chexpert_labels(
    findings: pd.DataFrame, prompts: dict
) -> tuple[dict[int, list[str]], dict[int, set[str]]]:
    """study_id → positive CheXpert labels (RaDialog's order, incl. No Finding) and → uncertain labels,
    from the findings of the findings section (RaDialog labels the findings text)."""
    mapping = chexpert_of()
    # the classes in RaDialog's order (a study's positive labels are listed in it), then any others
    classes = list(dict.fromkeys([*prompts["chexpert_labels"], *sorted(set(mapping.values()))]))
    index = {cls: i for i, cls in enumerate(classes)}
    labelled = findings[
        findings["presence"].isin(["positive", "uncertain"])
        & findings["name"].isin(list(mapping))
        & in_findings_section(findings["section"])
    ]
    # one (study, class) key per row, by array: sorted unique keys give each study's classes in order
    codes, names = pd.factorize(labelled["name"])
    class_of_name = np.array([index[mapping[name]] for name in names.tolist()] or [0], dtype=np.int64)
    keys = labelled["study_id"].to_numpy(dtype=np.int64) * len(classes) + class_of_name[codes]
    is_positive = (labelled["presence"] == "positive").to_numpy(dtype=bool)
    positive: dict[int, list[str]] = {}
    uncertain: dict[int, set[str]] = {}
    for key in _distinct(keys[is_positive]):
        positive.setdefault(key // len(classes), []).append(classes[key % len(classes)])
    for key in _distinct(keys[~is_positive]):
        uncertain.setdefault(key // len(classes), set()).add(classes[key % len(classes)])
    return positive, uncertain


def _distinct(keys: np.ndarray) -> list[int]:
    """The distinct keys, ascending (by a sort: numpy's hashing unique costs more on these)."""
    keys = np.sort(keys)
    return keys[np.r_[True, keys[1:] != keys[:-1]]].tolist() if len(keys) else []


def with_no_finding(labels: list[str], uncertain: set[str]) -> list[str]:
    """CheXpert's rule: "No Finding" when no pathology (anything but Support Devices) is positive or
    uncertain. An image with only uncertain labels has no positive label at all (→ "no common findings")."""
    pathology = [x for x in (*labels, *uncertain) if x != "Support Devices"]
    return labels if pathology else ["No Finding", *labels]


def has_finding(labels: list[str]) -> bool:
    """RaDialog's stratification: an image "with finding" has a positive label and No Finding unset."""
    return bool(labels) and "No Finding" not in labels


def findings_slot(labels: list[str], prompts: dict) -> str:
    return ", ".join(x.lower() for x in labels) if labels else prompts["no_findings_text"]


# --- evidence sentences -----------------------------------------------------------------------------------


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """The non-blank pieces of ``text`` between the matches of ``_SENTENCE_END``, as (start, end)."""
    spans, start = [], 0
    # _SENTENCE_BREAK: the same ends matched from their end mark on (kept in the sentence), which the
    # regex engine finds faster than _SENTENCE_END's leading lookbehind
    for m in _SENTENCE_BREAK.finditer(text):
        spans.append((start, m.start() + 1))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def evidence_sentences(text: str, starts: list[int], spans: list[tuple[int, int]] | None = None) -> list[int]:
    """Indices of the sentences of ``text`` containing the given evidence offsets (``spans``: its
    :func:`sentence_spans`, when the caller has them)."""
    spans = sentence_spans(text) if spans is None else spans
    begins = [a for a, _ in spans]
    return sorted(
        {max(0, bisect_right(begins, s) - 1) for s in starts if s is not None and 0 <= s < len(text)}
    )


@dataclass(slots=True)
class Image:
    dicom: str
    study_id: int
    findings: str  # raw section text (evidence offsets refer to it)
    impression: str
    labels: list[str]  # positives incl. No Finding
    uncertain: set[str]
    text: str | None = None  # the findings as one line (the RG target); None: made from ``findings``

    def __post_init__(self):
        if self.text is None:
            self.text = _norm(self.findings)


def _norm(text: str) -> str:
    return " ".join(text.split())


class Evidence:
    """study_id -> canonical name -> evidence offsets in the findings section, of the positive findings
    (a name without offsets maps to ``[]``). Kept as flat lists sorted by study and unpacked one study at
    a time: a dict per study would take GBs at a million studies."""

    def __init__(self, findings: pd.DataFrame):
        rows = findings[(findings["presence"] == "positive") & in_findings_section(findings["section"])]
        order = np.argsort(rows["study_id"].to_numpy(), kind="stable")  # a study's rows keep their order
        study_ids = rows["study_id"].to_numpy()[order]
        studies, first = np.unique(study_ids, return_index=True)
        end = np.append(first[1:], len(study_ids))
        # study -> its rows (Python ints and lists: the builder asks one study at a time, where numpy's
        # scalar lookups cost more than the work)
        self._rows = dict(zip(studies.tolist(), zip(first.tolist(), end.tolist(), strict=True), strict=True))
        codes, names = pd.factorize(rows["name"])
        names = names.tolist()
        self._names = [names[c] for c in codes[order].tolist()]  # one string object per name
        # LLM findings may come without a span: NaN
        starts = pd.to_numeric(rows["start"], errors="coerce").to_numpy(dtype="float64")[order]
        self._starts = [None if s != s else int(s) for s in starts.tolist()]

    def get(self, study_id: int, default=None) -> dict[str, list[int]] | None:
        span = self._rows.get(study_id)
        if span is None:
            return default
        out: dict[str, list[int]] = {}
        for r in range(*span):
            offsets = out.setdefault(self._names[r], [])
            if self._starts[r] is not None:
                offsets.append(self._starts[r])
        return out


class TwoTurns(NamedTuple):
    """An instruct record before it is rendered: the RG turn (its prompt and the report the assistant
    gave), then the task and its answer (the training target)."""

    dicom: str
    prompt: str
    report: str
    task: str
    output: str


class Builder:
    def __init__(
        self,
        images: list[Image],
        evidence: pd.DataFrame,
        seed: int = 0,
        prompts: dict | None = None,
        external: ExternalPrompts | None = None,
    ):
        self.images = images
        self.p = prompts or load_prompts()
        self.seed = seed
        self.external = external  # RaDialog's own RG instruction and system message, used verbatim
        self.system = external.system if external else _norm(self.p["system"])
        self.image_block = fill(
            self.p["image_block"], image_tokens=self.p["image_token"] * int(self.p["image_token_count"])
        )
        self._prompts: dict[tuple, str] = {}  # (template, labels) -> rendered RG prompt
        # an RG instruction is one of the few thousand prompts in its conversation: rendered once per
        # prompt, the records share the string
        self._instructions: dict[str, str] = {}
        self.evidence = Evidence(evidence)
        self.chexpert = chexpert_of()
        self._regions = sorted(self.p["region_qa"])
        self._region_names = {region: set(self.p["regions"][region]) for region in self._regions}

    def rg_prompt(self, img: Image, rng: random.Random) -> str:
        # drawn with RaDialog's prompt too: the same seed, same records
        return self._rg_prompt(rng.randrange(len(self.p["rg"])), img.labels)

    def _rg_prompt(self, k: int, labels: list[str]) -> str:
        """The RG prompt of template ``k`` (the draw of :meth:`rg_prompt`) for an image's labels."""
        key = (k, tuple(labels))
        prompt = self._prompts.get(key)
        if prompt is None:
            findings = findings_slot(labels, self.p)
            if self.external is not None:  # RaDialog trains and evaluates on its one RG instruction
                prompt = self.external.instruction(findings)
            else:
                prompt = fill(self.p["rg"][k], image=self.image_block, findings=findings)
            self._prompts[key] = prompt
        return prompt

    def instruction(self, prompt: str) -> str:
        """The RG record's instruction: the conversation up to the report (shared by the records of a
        prompt, and their first turn in an instruct record)."""
        instruction = self._instructions.get(prompt)
        if instruction is None:
            instruction = self._instructions[prompt] = conversation(self.system, [(prompt, None)])
        return instruction

    def rg_record(self, img: Image, prompt: str) -> dict:
        return {"instruction": self.instruction(prompt), "input": "", "output": img.text, "dicom": img.dicom}

    def instruct_instruction(self, turns: TwoTurns) -> str:
        """An instruct record's instruction: the RG turn with its report, then the task
        (``conversation(system, [(prompt, report), (task, None)])``, from the RG record's instruction)."""
        return self.instruction(turns.prompt) + continuation(turns.report, turns.task)

    def record(self, turns: TwoTurns) -> dict:
        instruction = self.instruct_instruction(turns)
        return {"instruction": instruction, "input": "", "output": turns.output, "dicom": turns.dicom}

    # RG ------------------------------------------------------------------------------------------------
    def rg(self, keep: Callable[[Image, str], object] | None = None) -> list:
        """The RG records, as ``keep(image, RG prompt)`` (default :meth:`rg_record`; e.g. their JSON, so
        that half a million dicts never exist at once)."""
        rng = random.Random(f"rg:{self.seed}")
        finding = [has_finding(i.labels) for i in self.images]
        with_finding = list(compress(self.images, finding))
        without = [i for i, f in zip(self.images, finding, strict=True) if not f]
        n_normal = min(len(without), int(2 * len(with_finding) / 13))
        chosen = with_finding + with_finding + rng.sample(without, n_normal)
        keep = keep or self.rg_record
        # the records' rg_prompt draws, in record order (nothing else draws from rng in between)
        draws = randbelow_many(rng, len(self.p["rg"]), len(chosen))
        prompt = self._rg_prompt
        return [keep(img, prompt(k, img.labels)) for img, k in zip(chosen, draws, strict=True)]

    # INS -----------------------------------------------------------------------------------------------
    def _parts(self) -> tuple[list[list[Image]], random.Random]:
        """The train images shuffled and cut in six equal parts, and the generator the tasks draw from."""
        rng = random.Random(f"ins:{self.seed}")
        order = list(self.images)
        shuffle(rng, order)
        n = len(order) // 6
        return [order[k * n : (k + 1) * n] for k in range(6)], rng

    def diagnoses(self, img: Image) -> list[str]:
        """The image's positive diagnoses the reasoning task asks about (RaDialog: MIMIC-NLE's ten)."""
        return [x for x in self.p["reasoning_labels"] if x in img.labels]

    def llm_jobs(self) -> list[tuple[str, str, int, str, list[str]]]:
        """What the LLM writes: easy language for part 0, reasoning for the images of part 1 that have a
        diagnosis; ``(task, dicom, study id, findings text, diagnoses)``."""
        parts, _ = self._parts()
        jobs = [("easy_language", img.dicom, img.study_id, img.text, []) for img in parts[0]]
        for img in parts[1]:
            diagnoses = self.diagnoses(img)
            if diagnoses:
                jobs.append(("reasoning", img.dicom, img.study_id, img.text, diagnoses))
        return jobs

    def ins(
        self,
        generated: dict[tuple[str, str], str] | None = None,
        keep: Callable[[TwoTurns], object] | None = None,
    ) -> tuple[list, dict[str, int]]:
        """Instruct records and counts per task; ``generated`` = the LLM answers of :meth:`llm_jobs`
        (None: the rules backend, the two LLM tasks are not built); each record as ``keep(turns)``
        (default :meth:`record`), like :meth:`rg`."""
        keep = keep or self.record
        parts, rng = self._parts()
        tasks = {"correction": parts[2], "summarise": parts[3], "region_qa": parts[5]}
        half = len(parts[4]) // 2
        tasks["binary_qa"], tasks["all_findings_qa"] = parts[4][:half], parts[4][half:]
        records, counts = [], {}
        for task, imgs in tasks.items():
            made = 0
            for img in imgs:
                rec = getattr(self, task)(img, rng)
                if rec is None:  # e.g. summarisation without an impression: ask for the findings instead
                    rec = self.all_findings_qa(img, rng)
                if rec is not None and rec.output.strip():
                    records.append(keep(rec))
                    made += 1
            counts[task] = made
        if generated is not None:
            llm_rng = random.Random(f"llm-tasks:{self.seed}")  # own draws: the rules tasks stay the same
            for task, imgs in (("easy_language", parts[0]), ("reasoning", parts[1])):
                made = 0
                for img in imgs:
                    answer = generated.get((task, img.dicom))
                    if answer is None:
                        continue
                    question = llm_rng.choice(self.p[task])
                    if task == "reasoning":
                        names = [x.lower() for x in self.diagnoses(img)]
                        question = fill(question, diagnoses=join_names(names))
                    records.append(keep(self._two_turns(img, llm_rng, question, answer)))
                    made += 1
                counts[task] = made
        return records, counts

    def _two_turns(
        self, img: Image, rng: random.Random, task: str, answer: str, report: str | None = None
    ) -> TwoTurns:
        prompt = self.rg_prompt(img, rng)
        return TwoTurns(img.dicom, prompt, report if report is not None else img.text, task, answer)

    def binary_qa(self, img: Image, rng: random.Random) -> TwoTurns:
        labels = [x for x in self.p["chexpert_labels"] if x != "No Finding"]
        positives = [x for x in img.labels if x != "No Finding"]
        if positives and rng.random() < 0.6:
            label, answer = rng.choice(positives), "Yes."
        else:
            candidates = [x for x in labels if x not in positives and x not in img.uncertain]
            label, answer = rng.choice(candidates), "No."
        return self._two_turns(img, rng, fill(rng.choice(self.p["binary_qa"]), label=label), answer)

    def all_findings_qa(self, img: Image, rng: random.Random) -> TwoTurns:
        answer = findings_slot(img.labels, self.p)
        return self._two_turns(img, rng, rng.choice(self.p["all_findings_qa"]), answer)

    def summarise(self, img: Image, rng: random.Random) -> TwoTurns | None:
        impression = _norm(img.impression)
        if not impression:
            return None
        return self._two_turns(img, rng, rng.choice(self.p["summarise"]), impression)

    def region_qa(self, img: Image, rng: random.Random) -> TwoTurns:
        region = rng.choice(self._regions)
        names = self._region_names[region]
        ev = self.evidence.get(img.study_id, {})
        present = sorted(name for name in ev if name in names)
        starts = [s for name in present for s in ev[name]]
        question = rng.choice(self.p["region_qa"][region])
        if starts:
            spans = sentence_spans(img.findings)
            quoted = " ".join(
                _norm(img.findings[a:b])
                for a, b in (spans[i] for i in evidence_sentences(img.findings, starts, spans))
            )
            answer = fill(self.p["region_answer_yes"], evidence=quoted)
        elif present:  # positive findings without evidence offsets: name them
            answer = fill(self.p["region_answer_yes_names"], names=join_names(present))
        else:
            answer = self.p["region_answer_no"][region]
        return self._two_turns(img, rng, question, answer)

    def correction(self, img: Image, rng: random.Random) -> TwoTurns | None:
        """The assistant first wrote an edited report; the user asks to add what it dropped and remove
        what it invented; the answer is the true report."""
        mapping = self.chexpert
        starts_of: dict[str | None, list[int]] = {}  # CheXpert label -> its findings' evidence offsets
        for name, offsets in self.evidence.get(img.study_id, {}).items():
            starts_of.setdefault(mapping.get(name), []).extend(offsets)
        spans = sentence_spans(img.findings)
        # labels whose every sentence can be dropped without emptying the report
        droppable = {}
        for label in img.labels:
            idx = evidence_sentences(img.findings, starts_of.get(label, []), spans)
            if idx and len(idx) < len(spans):
                droppable[label] = idx
        addable = [
            x for x in self.p["correction_sentences"] if x not in img.labels and x not in img.uncertain
        ]
        mode = rng.choice(["add", "remove", "both"] if droppable else ["remove"])
        add = rng.choice(sorted(droppable)) if mode in ("add", "both") else None
        rem = rng.choice(addable) if mode in ("remove", "both") and addable else None
        if add is None and rem is None:
            return None
        kept = [
            _norm(img.findings[a:b])
            for i, (a, b) in enumerate(spans)
            if add is None or i not in droppable[add]
        ]
        if rem is not None:
            kept.insert(rng.randrange(len(kept) + 1), self.p["correction_sentences"][rem])
        wrong = " ".join(kept)
        if add and rem:
            task = fill(rng.choice(self.p["correction_both"]), add=add.lower(), rem=rem.lower())
        elif add:
            task = fill(rng.choice(self.p["correction_add"]), add=add.lower())
        else:
            task = fill(rng.choice(self.p["correction_remove"]), rem=rem.lower())
        return self._two_turns(img, rng, task[0].upper() + task[1:], img.text, report=wrong)


def train_images(
    studies: pd.DataFrame, images: pd.DataFrame, sections: pd.DataFrame, findings: pd.DataFrame, prompts: dict
) -> list[Image]:
    """Every image of a train study with a findings section, with its labels (sorted by dicom id). The
    images of a study share its texts and labels (one copy per study, not per image)."""
    positives, uncertain = chexpert_labels(findings, prompts)
    st = studies[studies["split"] == "train"][["study_id"]].drop_duplicates()
    has_findings = (sections["findings"].fillna("").str.strip() != "").to_numpy()
    sec = sections[["study_id"]].assign(sec_row=np.arange(len(sections)), has_findings=has_findings)
    sec = sec.drop_duplicates("study_id")
    sec = sec.loc[sec["has_findings"], ["study_id", "sec_row"]]
    img = images[["dicom_id", "study_id"]].merge(st, on="study_id").merge(sec, on="study_id")
    # Arrow's stable sort, as ``sort_values(kind="stable")``, without pandas factorising the strings first
    img = img.take(pc.sort_indices(pa.array(img["dicom_id"])).to_numpy())
    sec_rows = np.unique(img["sec_row"].to_numpy())
    # sec_row -> what the study's images share: findings, impression, labels, uncertain labels, RG target
    shared: dict[int, tuple] = {}
    for row, sid, f, i in zip(
        sec_rows.tolist(),
        sections["study_id"].take(sec_rows).tolist(),
        sections["findings"].take(sec_rows).tolist(),
        sections["impression"].take(sec_rows).tolist(),
        strict=True,
    ):
        unc = uncertain.get(sid, set())
        shared[row] = (
            f,
            i if isinstance(i, str) else "",
            with_no_finding(positives.get(sid, []), unc),
            unc,
            _norm(f),
        )
    return [
        Image(dicom, sid, *shared[row])
        for dicom, sid, row in zip(
            img["dicom_id"].tolist(), img["study_id"].tolist(), img["sec_row"].tolist(), strict=True
        )
    ]


def builder_for(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    findings: pd.DataFrame,
    seed: int = 0,
    external: ExternalPrompts | None = None,
) -> Builder:
    """The RaDialog builder over the corpus's train images (what :func:`build` and :func:`build_encoded` read)."""
    prompts = load_prompts()
    return Builder(
        train_images(studies, images, sections, findings, prompts), findings, seed, prompts, external
    )


def build(builder: Builder, generator=None) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(RG records, INS records = RG + instruct shuffled, task counts). ``generator``: an
    :class:`~workflow.exports.llm_tasks.InstructGenerator` for the easy-language and reasoning tasks."""
    rg = builder.rg()
    fused, counts = _instruct(builder, rg, generator, builder.record)
    return rg, fused, counts


def _instruct(builder: Builder, rg: list, generator, keep) -> tuple[list, dict[str, int]]:
    """The INS file's records (RG and instruct shuffled together) and the counts per task."""
    ins, counts = builder.ins(generator.answer(builder.llm_jobs()) if generator else None, keep)
    counts["report_generation"] = len(rg)
    return fuse(rg, ins, builder.seed), counts


def fuse(rg: list, instruct: list, seed: int) -> list:
    """RG and instruct records shuffled together (works on records or on their JSON encodings)."""
    fused = rg + instruct
    shuffle(random.Random(f"fuse:{seed}"), fused)
    return fused


class JsonPieces:
    """Records as their JSON (the characters of ``json.dumps(record, ensure_ascii=False)``) in UTF-8
    pieces, for :func:`write_json_list`. What many records hold is encoded once and shared: an RG
    instruction (system message and RG prompt: a few thousand distinct, ~1 KB each), and a study's
    findings (the RG output of its images and their repeats). JSON escapes character by character, so
    the encoding of a string is the encodings of its parts joined."""

    def __init__(self, builder: Builder):
        self.builder = builder
        self._instructions: dict[str, str] = {}  # RG prompt -> its instruction's JSON string
        self._heads: dict[str, bytes] = {}  # RG prompt -> an RG record's JSON up to its output
        self._first_turns: dict[str, bytes] = {}  # RG prompt -> an instruct record's up to the report
        self._outputs: dict[str, bytes] = {}  # findings text -> an RG record's output field

    def _instruction(self, prompt: str) -> str:
        encoded = self._instructions.get(prompt)
        if encoded is None:
            encoded = self._instructions[prompt] = encode_basestring(self.builder.instruction(prompt))
        return encoded

    def rg(self, img: Image, prompt: str) -> tuple[bytes, bytes, bytes]:
        """The JSON of :meth:`Builder.rg_record` as (head, output, dicom) pieces."""
        head = self._heads.get(prompt)
        if head is None:
            head = self._heads[prompt] = (
                '{"instruction": ' + self._instruction(prompt) + ', "input": ""'
            ).encode()
        output = self._outputs.get(img.text)
        if output is None:
            output = self._outputs[img.text] = (', "output": ' + encode_basestring(img.text)).encode()
        return head, output, (', "dicom": ' + encode_basestring(img.dicom) + "}").encode()

    def instruct(self, turns: TwoTurns) -> tuple[bytes, bytes]:
        """The JSON of :meth:`Builder.record` as (the first turn up to its reply, the rest)."""
        first = self._first_turns.get(turns.prompt)
        if first is None:
            first = self._first_turns[turns.prompt] = (
                '{"instruction": ' + self._instruction(turns.prompt)[:-1]
            ).encode()
        # the RG instruction is the start of the instruct one (the same first turn, without its reply)
        rest = encode_basestring(continuation(turns.report, turns.task))
        output, dicom = encode_basestring(turns.output), encode_basestring(turns.dicom)
        return first, f'{rest[1:]}, "input": "", "output": {output}, "dicom": {dicom}}}'.encode()


def build_encoded(
    builder: Builder, generator=None, instruct: bool = True
) -> tuple[list[tuple[bytes, ...]], list[tuple[bytes, ...]] | None, dict[str, int]]:
    """:func:`build` with every record JSON-encoded once (the INS file repeats all RG records) as
    :class:`JsonPieces`: the encoded records of the two files, in order (write them with
    :func:`write_json_list`). ``instruct=False``: the RG file's only (no INS records, no instruct tasks
    built, counts of report generation only)."""
    pieces = JsonPieces(builder)
    rg = builder.rg(pieces.rg)
    if not instruct:
        return rg, None, {"report_generation": len(rg)}
    fused, counts = _instruct(builder, rg, generator, pieces.instruct)
    return rg, fused, counts


def write_json_list(encoded: list[tuple[bytes, ...]], fh, chunk: int = 2_000) -> None:
    """A JSON array of encoded records (each a tuple of UTF-8 pieces, :class:`JsonPieces`) to a binary
    file, streamed: the pieces of ``chunk`` records at a time joined into one write (no string per
    record in between, and a buffer of a size the allocator reuses)."""
    fh.write(b"[")
    for start in range(0, len(encoded), chunk):
        pieces: list[bytes] = [b", "] if start else []
        add, extend = pieces.append, pieces.extend
        for e in encoded[start : start + chunk]:
            extend(e)
            add(b", ")
        pieces.pop()
        fh.write(b"".join(pieces))
    fh.write(b"]")
