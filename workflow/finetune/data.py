"""Gold → LLaMA-Factory SFT dataset for the student, plus a held-out gold slice for its evaluation.

Inputs are the gold stage's outputs (``results/llm/gold/``): ``sample.parquet`` (the gold studies),
``findings.parquet`` (the teacher's answers, standardised) and ``sft.jsonl`` (the exact conversation
each gold study was asked with + the teacher's raw answer). Each trained study becomes one
alpaca-format example whose conversation is exactly the one the bulk ``keyinfo`` stage sends:

* ``system``      the KeyInfo instruction (the prompt's system message),
* ``history``     the prompt's few-shot turns, as ``[[user, assistant], ...]``,
* ``instruction`` the final user message: the report's findings/impression text,
* ``output``      the target JSON ``{"findings": [{name, presence, location, level, type, change,
  evidence}]}``: by default built from the *standardised* gold findings (canonical names, evidence =
  the finding's span in its section), so the student learns to answer in canonical terms;
  ``--target teacher`` keeps the teacher's raw answer instead.

``dataset_info.json`` maps ``system``, ``prompt``, ``query``, ``response`` and ``history``
explicitly. (The Medical-CXR-VQA release mapped only prompt and response, so its instruction column was
silently dropped and the model was trained without the system prompt it was later served with.)

The held-out slice is drawn by patient (seeded): no patient is both trained on and evaluated on.
Gold studies without a usable teacher answer go to ``rejects`` with a reason.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pyarrow as pa

from workflow import cli
from workflow.contract import FINETUNE_SPLIT, SECTION_NAMES
from workflow.tables import Rejects, read_table, summary, write_table

log = logging.getLogger(__name__)

STAGE = "finetune_data"
DATASET_NAME = "keyinfo_sft"
DATA_FILE = f"{DATASET_NAME}.json"

DATASET_INFO = {
    DATASET_NAME: {
        "file_name": DATA_FILE,
        "formatting": "alpaca",
        "columns": {
            "system": "system",
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "history": "history",
        },
    }
}


def evidence_of(finding: dict, sections: dict) -> str | None:
    """The words the finding was read from: its span in its own section's text."""
    text = sections.get(finding.get("section") or "") or ""
    start, end = finding.get("start"), finding.get("end")
    if start is None or end is None or not 0 <= start < end <= len(text):
        return None
    return text[start:end]


def target_json(findings: list[dict], sections: dict) -> str:
    """The answer the student learns to write, in the schema the LLM layer parses (report order)."""
    order = {name: i for i, name in enumerate(SECTION_NAMES)}
    items = []
    for f in sorted(findings, key=lambda f: (order.get(f.get("section"), 99), f.get("start") or 0)):
        name = f["name"] if f["name"] != "unknown" else (f.get("raw_name") or f["name"])
        items.append(
            {
                "name": name,
                "presence": f["presence"],
                "location": f.get("location"),
                "level": f.get("level"),
                "type": f.get("type"),
                "change": f.get("change"),
                "evidence": evidence_of(f, sections),
            }
        )
    return json.dumps({"findings": items}, ensure_ascii=False, separators=(",", ":"))


def conversation(messages: list[dict]) -> tuple[str, list[list[str]], str]:
    """(system, few-shot history, final user text) of the prompt part of a conversation."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages:
        raise ValueError("conversation without a user message")
    *turns, last = messages
    roles = [m["role"] for m in turns]
    if last["role"] != "user" or roles != ["user", "assistant"] * (len(turns) // 2):
        raise ValueError("prompt must alternate user/assistant turns and end with the user message")
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns), 2)]
    return system, history, last["content"]


def heldout_subjects(subject_ids: list[int], fraction: float, seed: int) -> set[int]:
    """A seeded, patient-level held-out sample (at least one patient when fraction > 0)."""
    subjects = sorted(set(subject_ids))
    if fraction <= 0 or len(subjects) < 2:
        return set()
    random.Random(seed).shuffle(subjects)
    n = min(len(subjects) - 1, max(1, round(len(subjects) * fraction)))
    return set(subjects[:n])


def read_sft(path: Path) -> dict[int, dict]:
    """The gold stage's conversations by study id (the last message is the teacher's answer)."""
    conversations = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                conversations[int(record["study_id"])] = record
    return conversations


def build_dataset(
    sample: pa.Table,
    gold_findings: pa.Table,
    conversations: dict[int, dict],
    sections: pa.Table,
    outdir: Path,
    *,
    heldout_fraction: float = 0.2,
    seed: int = 123,
    target: str = "gold",
) -> dict[str, int]:
    """Write the SFT data, ``dataset_info.json``, ``split.parquet`` and ``rejects.parquet``."""
    outdir.mkdir(parents=True, exist_ok=True)
    findings_by_study: dict[int, list[dict]] = {}
    for row in gold_findings.to_pylist():
        findings_by_study.setdefault(row["study_id"], []).append(row)
    gold = sample.select(["subject_id", "study_id"]).to_pylist()
    wanted = {g["study_id"] for g in gold}
    section_rows = {r["study_id"]: r for r in sections.to_pylist() if r["study_id"] in wanted}

    rejects = Rejects(STAGE)
    usable = []
    for g in sorted(gold, key=lambda g: g["study_id"]):
        record = conversations.get(g["study_id"])
        if record is None:
            rejects.add(g["study_id"], "no_teacher_answer", "gold study without a usable teacher answer")
            continue
        messages = record["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            rejects.add(g["study_id"], "bad_conversation", "gold conversation does not end with the answer")
            continue
        try:
            system, history, prompt = conversation(messages[:-1])
        except ValueError as exc:
            rejects.add(g["study_id"], "bad_conversation", str(exc))
            continue
        sections_of = {k: (section_rows.get(g["study_id"]) or {}).get(k) for k in SECTION_NAMES}
        if target == "teacher":
            answer = messages[-1]["content"]
        else:
            answer = target_json(findings_by_study.get(g["study_id"], []), sections_of)
        usable.append(
            (g, {"system": system, "history": history, "instruction": prompt, "input": "", "output": answer})
        )

    heldout = heldout_subjects([g["subject_id"] for g, _ in usable], heldout_fraction, seed)
    examples, split_rows = [], []
    for g, example in usable:
        part = "heldout" if g["subject_id"] in heldout else "train"
        split_rows.append({"subject_id": g["subject_id"], "study_id": g["study_id"], "part": part})
        if part == "train":
            examples.append({**example, "study_id": g["study_id"]})
    if not examples:
        raise SystemExit(
            f"{STAGE}: no gold study left to train on ({len(gold)} gold, {len(rejects)} rejected)"
        )
    (outdir / DATA_FILE).write_text(json.dumps(examples, ensure_ascii=False, indent=1) + "\n")
    (outdir / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2) + "\n")
    write_table(
        pa.Table.from_pylist(split_rows, schema=FINETUNE_SPLIT), outdir / "split.parquet", FINETUNE_SPLIT
    )
    rejects.write(outdir / "rejects.parquet")
    summary(STAGE, len(gold), len(split_rows), len(rejects))
    return {
        "gold": len(gold),
        "train": len(examples),
        "heldout": len(split_rows) - len(examples),
        "rejected": len(rejects),
    }


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--sample", type=Path, required=True, help="gold sample (gold stage's sample.parquet)")
    p.add_argument("--gold", type=Path, required=True, help="gold findings (gold stage's findings.parquet)")
    p.add_argument("--sft", type=Path, required=True, help="gold conversations (gold stage's sft.jsonl)")
    p.add_argument("--sections", type=Path, required=True, help="sections.parquet (for evidence spans)")
    p.add_argument("--outdir", type=Path, required=True)
    # finetune.heldout_fraction / seed / target: the rule passes them, config.yaml holds their defaults
    p.add_argument("--heldout-fraction", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--target", choices=["gold", "teacher"], required=True)
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    counts = build_dataset(
        read_table(args.sample),
        read_table(args.gold),
        read_sft(args.sft),
        read_table(args.sections),
        args.outdir,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
        target=args.target,
    )
    log.info("finetune data: %s", counts)


if __name__ == "__main__":
    main()
