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
from json.encoder import encode_basestring  # JSONEncoder(ensure_ascii=False).encode of a str
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import yaml

from workflow.exports.prompt_source import ExternalPrompts
from workflow.keyinfo.libs import load_libs
from workflow.rg4.rewrite import _SENTENCE_END

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
    out = system + " "
    for user, reply in turns:
        out += "USER: " + user + " ASSISTANT:"
        if reply is not None:
            out += " " + reply + "</s>"
    return out


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
    rank = {name: i for i, name in enumerate(prompts["chexpert_labels"])}
    positive: dict[int, set[str]] = {}
    uncertain: dict[int, set[str]] = {}
    target = {"positive": positive, "uncertain": uncertain}
    labelled = findings[
        findings["presence"].isin(list(target))
        & findings["name"].isin(list(mapping))
        & in_findings_section(findings["section"])
    ]
    for sid, name, presence in zip(
        labelled["study_id"].tolist(), labelled["name"].tolist(), labelled["presence"].tolist(), strict=True
    ):
        target[presence].setdefault(int(sid), set()).add(mapping[name])
    return {k: sorted(v, key=rank.__getitem__) for k, v in positive.items()}, uncertain


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
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
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
    (a name without offsets maps to ``[]``). Kept as arrays sorted by study and unpacked one study at a
    time: a dict per study would take GBs at a million studies."""

    def __init__(self, findings: pd.DataFrame):
        rows = findings[(findings["presence"] == "positive") & in_findings_section(findings["section"])]
        order = np.argsort(rows["study_id"].to_numpy(), kind="stable")  # a study's rows keep their order
        study_ids = rows["study_id"].to_numpy()[order]
        self._studies, self._first = np.unique(study_ids, return_index=True)
        self._end = np.append(self._first[1:], len(study_ids))
        names = pd.Categorical(rows["name"].to_numpy()[order])
        self._names, self._name_codes = list(names.categories), names.codes
        # LLM findings may come without a span: NaN
        self._starts = pd.to_numeric(rows["start"], errors="coerce").to_numpy(dtype="float64")[order]

    def get(self, study_id: int, default=None) -> dict[str, list[int]] | None:
        k = int(np.searchsorted(self._studies, study_id))
        if k == len(self._studies) or self._studies[k] != study_id:
            return default
        out: dict[str, list[int]] = {}
        for r in range(self._first[k], self._end[k]):
            offsets = out.setdefault(self._names[self._name_codes[r]], [])
            if self._starts[r] == self._starts[r]:
                offsets.append(int(self._starts[r]))
        return out


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
        self.evidence = Evidence(evidence)

    def rg_prompt(self, img: Image, rng: random.Random) -> str:
        k = rng.randrange(len(self.p["rg"]))  # drawn with RaDialog's prompt too: the same seed, same records
        key = (k, tuple(img.labels))
        prompt = self._prompts.get(key)
        if prompt is None:
            findings = findings_slot(img.labels, self.p)
            if self.external is not None:  # RaDialog trains and evaluates on its one RG instruction
                prompt = self.external.instruction(findings)
            else:
                prompt = fill(self.p["rg"][k], image=self.image_block, findings=findings)
            self._prompts[key] = prompt
        return prompt

    def record(self, img: Image, turns: list[tuple[str, str | None]], output: str) -> dict:
        return self._record(img, conversation(self.system, turns), output)

    @staticmethod
    def _record(img: Image, instruction: str, output: str) -> dict:
        return {"instruction": instruction, "input": "", "output": output, "dicom": img.dicom}

    # RG ------------------------------------------------------------------------------------------------
    def rg(self, encode: Callable[[dict], object] | None = None) -> list:
        """The RG records; ``encode`` turns each into what is kept as soon as it is made (e.g. its JSON, so
        that half a million dicts never exist at once)."""
        rng = random.Random(f"rg:{self.seed}")
        with_finding = [i for i in self.images if has_finding(i.labels)]
        without = [i for i in self.images if not has_finding(i.labels)]
        n_normal = min(len(without), int(2 * len(with_finding) / 13))
        chosen = with_finding + with_finding + rng.sample(without, n_normal)
        keep = encode or (lambda record: record)
        # an RG instruction is one of the few thousand prompts in its conversation: rendered once per
        # prompt, the records share the string (and its hash, which ``encode`` looks up)
        instructions: dict[str, str] = {}

        def record(img: Image) -> dict:
            prompt = self.rg_prompt(img, rng)
            instruction = instructions.get(prompt)
            if instruction is None:
                instruction = instructions[prompt] = conversation(self.system, [(prompt, None)])
            return self._record(img, instruction, img.text)

        return [keep(record(img)) for img in chosen]

    # INS -----------------------------------------------------------------------------------------------
    def _parts(self) -> tuple[list[list[Image]], random.Random]:
        """The train images shuffled and cut in six equal parts, and the generator the tasks draw from."""
        rng = random.Random(f"ins:{self.seed}")
        order = list(self.images)
        rng.shuffle(order)
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
        encode: Callable[[dict], object] | None = None,
    ) -> tuple[list, dict[str, int]]:
        """Instruct records and counts per task; ``generated`` = the LLM answers of :meth:`llm_jobs`
        (None: the rules backend, the two LLM tasks are not built); ``encode`` as in :meth:`rg`."""
        keep = encode or (lambda record: record)
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
                if rec is not None and rec["output"].strip():
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
    ) -> dict:
        first = (self.rg_prompt(img, rng), report if report is not None else img.text)
        return self.record(img, [first, (task, None)], answer)

    def binary_qa(self, img: Image, rng: random.Random) -> dict:
        labels = [x for x in self.p["chexpert_labels"] if x != "No Finding"]
        positives = [x for x in img.labels if x != "No Finding"]
        if positives and rng.random() < 0.6:
            label, answer = rng.choice(positives), "Yes."
        else:
            candidates = [x for x in labels if x not in positives and x not in img.uncertain]
            label, answer = rng.choice(candidates), "No."
        return self._two_turns(img, rng, fill(rng.choice(self.p["binary_qa"]), label=label), answer)

    def all_findings_qa(self, img: Image, rng: random.Random) -> dict:
        answer = findings_slot(img.labels, self.p)
        return self._two_turns(img, rng, rng.choice(self.p["all_findings_qa"]), answer)

    def summarise(self, img: Image, rng: random.Random) -> dict | None:
        impression = _norm(img.impression)
        if not impression:
            return None
        return self._two_turns(img, rng, rng.choice(self.p["summarise"]), impression)

    def region_qa(self, img: Image, rng: random.Random) -> dict:
        region = rng.choice(sorted(self.p["region_qa"]))
        names = set(self.p["regions"][region])
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

    def correction(self, img: Image, rng: random.Random) -> dict | None:
        """The assistant first wrote an edited report; the user asks to add what it dropped and remove
        what it invented; the answer is the true report."""
        mapping = chexpert_of()
        ev = self.evidence.get(img.study_id, {})
        spans = sentence_spans(img.findings)
        # labels whose every sentence can be dropped without emptying the report
        droppable = {}
        for label in img.labels:
            starts = [s for name, offs in ev.items() if mapping.get(name) == label for s in offs]
            idx = evidence_sentences(img.findings, starts, spans)
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
    img = img.sort_values("dicom_id", kind="stable")
    sec_rows = np.unique(img["sec_row"].to_numpy())
    texts = dict(
        zip(
            sec_rows.tolist(),
            zip(
                sections["findings"].take(sec_rows).tolist(),
                sections["impression"].take(sec_rows).tolist(),
                strict=True,
            ),
            strict=True,
        )
    )
    first: dict[int, Image] = {}  # sec_row -> the study's first image
    out = []
    for dicom, sid, row in zip(
        img["dicom_id"].tolist(), img["study_id"].tolist(), img["sec_row"].tolist(), strict=True
    ):
        study = first.get(row)
        if study is None:
            f, i = texts.pop(row)
            unc = uncertain.get(sid, set())
            labels = with_no_finding(positives.get(sid, []), unc)
            image = first[row] = Image(dicom, sid, f, i if isinstance(i, str) else "", labels, unc)
        else:
            image = Image(
                dicom, sid, study.findings, study.impression, study.labels, study.uncertain, study.text
            )
        out.append(image)
    return out


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
    return _assemble(builder, builder.rg(), generator)


def _assemble(builder: Builder, rg: list, generator, encode=None) -> tuple[list, list, dict[str, int]]:
    ins, counts = builder.ins(generator.answer(builder.llm_jobs()) if generator else None, encode)
    counts["report_generation"] = len(rg)
    return rg, fuse(rg, ins, builder.seed), counts


def fuse(rg: list, instruct: list, seed: int) -> list:
    """RG and instruct records shuffled together (works on records or on their JSON encodings)."""
    fused = rg + instruct
    random.Random(f"fuse:{seed}").shuffle(fused)
    return fused


def build_encoded(builder: Builder, generator=None) -> tuple[list[str], list[str], dict[str, int]]:
    """:func:`build` with every record JSON-encoded once (the INS file repeats all RG records): the
    encoded records of the two files, in order (write them with :func:`write_json_list`)."""
    import json

    encode = json.JSONEncoder(ensure_ascii=False).encode
    heads: dict[str, str] = {}
    first_turns: dict[str, str] = {}
    outputs: dict[str, str] = {}

    def encode_rg(record: dict) -> tuple[str, str]:
        # the RG instructions are a few thousand prompts: their encoding is made once and shared by the
        # records (hundreds of MB at MIMIC scale); json.dumps writes the same characters
        head = heads.get(record["instruction"])
        if head is None:
            head = heads[record["instruction"]] = (
                '{"instruction": ' + encode(record["instruction"]) + ', "input": ' + encode(record["input"])
            )
        # the output is the study's findings: encoded once for its images (and its repeats); the dicom
        # is the image's own string, encoded when written
        output = outputs.get(record["output"])
        if output is None:
            output = outputs[record["output"]] = ', "output": ' + encode(record["output"])
        return head, output, record["dicom"]

    def encode_instruct(record: dict) -> tuple[str, str]:
        # its first turn (system message and RG prompt, up to the first ASSISTANT:) is one of the few
        # thousand RG prompts too: kept once, the rest of the record's JSON beside it
        text = encode(record)
        cut = text.find(_FIRST_REPLY) + len(_FIRST_REPLY)
        return first_turns.setdefault(text[:cut], text[:cut]), text[cut:]

    return _assemble(builder, builder.rg(encode_rg), generator, encode_instruct)


_FIRST_REPLY = " ASSISTANT:"


def write_json_list(encoded: list[str | tuple[str, ...]], fh, chunk: int = 20_000) -> None:
    """A JSON array of already encoded records, streamed (no second copy of a ~GB document): a record's
    JSON, its JSON in two pieces, or an RG record as (its encoded head up to the input, its encoded
    output, its dicom)."""
    fh.write("[")
    for start in range(0, len(encoded), chunk):
        # the pieces of a chunk's records joined once: no string per record in between (the RG
        # records are a head of ~1 KB shared by thousands, copied once more per record otherwise)
        pieces: list[str] = []
        add, extend = pieces.append, pieces.extend
        for e in encoded[start : start + chunk]:
            if isinstance(e, str):
                add(e)
            elif len(e) == 2:
                extend(e)
            else:
                extend((e[0], e[1], ', "dicom": ', encode_basestring(e[2]), "}"))
            add(", ")
        pieces.pop()
        if start:
            fh.write(", ")
        fh.write("".join(pieces))
    fh.write("]")
