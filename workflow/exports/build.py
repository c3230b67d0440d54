"""The exports stage: the training files of the other seeds from our tables.

Writes (one flag per file, named as rules/exports.smk names them; :func:`rule_args` builds the flags
from those names):

* ``--r2gen`` (annotation.json) — R2GenGPT / MeGPT (R2Gen format) for the corpus (``--dataset mimic|iu``),
  see :mod:`workflow.exports.r2gen`;
* ``--radialog-rg`` (RG) and ``--radialog-ins`` (RG + instruct tasks), RaDialog's stratified JSON files,
  see :mod:`workflow.exports.radialog`;
* ``--summary`` (summary.json) — item counts per file/split/task, the R2Gen report sections, the RaDialog prompt
  source and the LLM tasks' accounting (or why they are absent);
* ``--card`` (README.md) — the same as a card for readers (:mod:`workflow.exports.card`);
* ``--rejects`` — studies in no export: ``no_findings`` (R2Gen and RaDialog train on findings),
  ``too_few_images`` (IU needs ``--iu-images``), ``not_in_split``;
* ``--llm-requests`` — the language tasks' LLM_REQUESTS rows (empty with the rules backend).

Command lines:

* ``python -m workflow.exports r2gen ...`` — the R2Gen annotation, with its part of the summary
  (``--part``, JSON) and the stage's rejects (``--rejects``): every RaDialog image is an R2Gen item, so
  the R2Gen export decides which studies are in none;
* ``python -m workflow.exports radialog ...`` — the two RaDialog files, with their part of the summary and
  the language tasks' LLM requests (with ``llm.backend: llm`` the only part that asks an LLM);
* ``python -m workflow.exports summary ...`` (:mod:`workflow.exports.summary`) — summary.json, the card,
  the rejects and the LLM requests from the parts;
* ``python -m workflow.exports ...`` (no command) — all of it in one process, the same files.

The rules run the first three as separate jobs (rules/exports.smk): R2Gen and RaDialog build side by side,
and R2Gen needs no findings, so it starts as soon as the sections exist.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from workflow.cli import add_llm_task_args, exit_leaving_objects, setup_logging
from workflow.cli import parser as cli_parser
from workflow.exports import r2gen
from workflow.exports import summary as exports_summary
from workflow.tables import Rejects, atomic_output, read_table, write_json, write_requests

# RaDialog's modules (its builder, prompt sources, the LLM layer) are imported where the RaDialog part
# runs: the R2Gen job needs none of them
if TYPE_CHECKING:
    from workflow.exports.llm_tasks import InstructGenerator
    from workflow.exports.prompt_source import ExternalPrompts

log = logging.getLogger(__name__)
STAGE = "exports"
OWN_PROMPTS = (
    "ours: libs/radialog_prompts.yaml (paraphrases; RaDialog's wording needs exports.radialog.prompts_from)"
)
# each command line's path flags, by the names rules/exports.smk gives the inputs and outputs (None: the
# whole stage in one process)
RULE_FLAGS: dict[str | None, dict[str, str]] = {
    "r2gen": {
        "studies": "--studies",
        "images": "--images",
        "sections": "--sections",
        "r2gen": "--r2gen",
        "r2gen_part": "--part",
        "r2gen_rejects": "--rejects",
    },
    "radialog": {
        "studies": "--studies",
        "images": "--images",
        "sections": "--sections",
        "findings": "--findings",
        "radialog_rg": "--radialog-rg",
        "radialog_ins": "--radialog-ins",
        "radialog_part": "--part",
        "radialog_llm_requests": "--llm-requests",
    },
    "summary": {
        "r2gen_part": "--r2gen-part",
        "r2gen_rejects": "--r2gen-rejects",
        "radialog_part": "--radialog-part",
        "radialog_llm_requests": "--radialog-llm-requests",
        "summary": "--summary",
        "card": "--card",
        "rejects": "--rejects",
        "llm_requests": "--llm-requests",
    },
    None: {
        "studies": "--studies",
        "images": "--images",
        "sections": "--sections",
        "findings": "--findings",
        "r2gen": "--r2gen",
        "radialog_rg": "--radialog-rg",
        "radialog_ins": "--radialog-ins",
        "summary": "--summary",
        "card": "--card",
        "rejects": "--rejects",
        "llm_requests": "--llm-requests",
    },
}
COMMANDS = tuple(c for c in RULE_FLAGS if c)


def rule_args(paths: Mapping[str, Path], command: str | None = None) -> list[str]:
    """The command and path flags of a shell line of rules/exports.smk, from the names of its rule's
    inputs and outputs (``command`` None: the whole stage, from the names of all its rules): tests and
    bench/ run the stage the way the rules do. Names the command line does not take are ignored."""
    flags = [x for name, flag in RULE_FLAGS[command].items() for x in (flag, str(paths[name]))]
    return [command, *flags] if command else flags


# --- the parts --------------------------------------------------------------------------------------------


def r2gen_part(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    path: Path,
    dataset: str = "mimic",
    report_sections: str | None = None,
    clean: bool = False,
    iu_images: int = 2,
) -> tuple[dict, Rejects]:
    """Write the R2Gen annotation; (its part of the summary, the stage's rejects). ``report_sections``
    None: the corpus default (:func:`workflow.exports.r2gen.report_sections`)."""
    report_sections = r2gen.report_sections(dataset, report_sections)
    log.info("r2gen annotation: report = %s", report_sections.replace("_", " + "))
    if dataset == "iu":
        annotation = r2gen.iu_annotation(studies, images, sections, report_sections, clean, iu_images)
        exported = {int(i) for i in _iu_study_ids(annotation, images)}
        chunks = annotation.items()
    else:
        exported = set()

        def noting_studies(columns):  # MIMIC's annotation is streamed a chunk of items at a time
            for c in columns:
                exported.update(c.study_ids)
                yield c.split, r2gen.item_json(c)

        chunks = noting_studies(r2gen.mimic_columns(studies, images, sections, report_sections, clean))
    with atomic_output(path, "w") as fh:
        counts = r2gen.write_annotation(chunks, fh)
    rejects = rejects_for(studies, sections, exported, dataset)
    part = {
        "r2gen": counts,
        "r2gen_report_sections": report_sections,
        "dataset": dataset,
        "clean": clean,
        "studies": len(studies),
        "exported": len(exported),
        "rejected": len(rejects),
    }
    return part, rejects


def radialog_part(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    findings: pd.DataFrame,
    rg_path: Path,
    ins_path: Path,
    seed: int = 0,
    prompts: ExternalPrompts | None = None,
    generator: InstructGenerator | None = None,
    keep: list | None = None,
) -> dict:
    """Write the RaDialog RG and INS files; their part of the summary. ``prompts``: RaDialog's own RG
    instruction and system message (:func:`workflow.exports.prompt_source.load`), else our paraphrases;
    ``generator``: the LLM layer for the easy-language and reasoning tasks (None: not built); ``keep``:
    a list the builder and the records are appended to (the caller frees them, or ends the process
    without: :func:`workflow.cli.exit_leaving_objects`)."""
    from workflow.exports import llm_tasks, radialog

    prompt_info = prompt_summary(prompts)
    log.info("radialog prompts: %s", prompt_info["source"])
    builder = radialog.builder_for(studies, images, sections, findings, seed, prompts)
    rg, ins, task_counts = radialog.build_encoded(builder, generator)
    for records, path in ((rg, rg_path), (ins, ins_path)):
        with atomic_output(path) as fh:
            radialog.write_json_list(records, fh)
    if keep is not None:
        keep.append((builder, rg, ins))
    if generator is None:
        log.info("radialog llm tasks: %s", llm_tasks.ABSENT)
    n_rg = task_counts["report_generation"]
    return {
        "radialog_rg": n_rg,
        "radialog_ins": n_rg + sum(v for k, v in task_counts.items() if k != "report_generation"),
        "radialog_tasks": task_counts,
        "radialog_prompts": prompt_info,
        "radialog_llm_tasks": generator.stats if generator else llm_tasks.ABSENT,
    }


def prompt_summary(prompts: ExternalPrompts | None) -> dict:
    """Which prompt source a build used (summary.json, the log): files and key, and a digest of the
    wording, never RaDialog's text itself."""
    if prompts is None:
        return {"source": OWN_PROMPTS, "sha256": None}
    return {"source": prompts.description, "sha256": prompts.digest()}


def _iu_study_ids(annotation: dict, images: pd.DataFrame) -> list[int]:
    by_path = dict(zip(images["image_path"], images["study_id"], strict=False))
    return [by_path[item["image_path"][0]] for items in annotation.values() for item in items]


def rejects_for(studies: pd.DataFrame, sections: pd.DataFrame, exported: set[int], dataset: str) -> Rejects:
    """The studies in no export, in study order, with why (by array: a study's checks are set lookups;
    only the sections of studies in no export are read)."""
    rejects = Rejects(STAGE)
    study_ids = studies["study_id"].to_numpy(dtype=np.int64)
    # Arrow's hash lookup: numpy's isin sorts both (~0.12 -> 0.05 s CPU at 227,835 studies)
    exported_ids = pa.array(list(exported), pa.int64())
    rejected = ~pc.is_in(pa.array(study_ids), value_set=exported_ids).to_numpy(zero_copy_only=False)
    study_ids = study_ids[rejected]
    sections = sections[np.isin(sections["study_id"].to_numpy(dtype=np.int64), study_ids)]
    with_findings = sections.loc[sections["findings"].fillna("").str.strip() != "", "study_id"]
    reasons = np.where(
        ~studies["split"].isin(["train", "validate", "test"]).to_numpy(dtype=bool)[rejected],
        "not_in_split",
        np.where(
            np.isin(study_ids, with_findings.to_numpy(dtype=np.int64)),
            "too_few_images" if dataset == "iu" else "no_images",
            "no_findings",
        ),
    )
    for sid, reason in zip(study_ids.tolist(), reasons.tolist(), strict=True):
        rejects.add(sid, reason)
    return rejects


# --- command lines ----------------------------------------------------------------------------------------


def _input_args(p: argparse.ArgumentParser, findings: bool) -> None:
    p.add_argument("--studies", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--sections", required=True, type=Path)
    if findings:
        p.add_argument("--findings", required=True, type=Path)


def _r2gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--r2gen", type=Path, required=True, help="annotation.json")
    p.add_argument("--dataset", choices=("mimic", "iu"), default="mimic")
    p.add_argument(
        "--report-sections",
        choices=r2gen.SECTION_CHOICES,
        default=None,
        help="R2Gen report (default per corpus: mimic findings_impression as R2GenGPT, iu findings as R2Gen)",
    )
    p.add_argument("--clean", action="store_true", help="apply the R2Gen cleaner of the dataset to reports")
    p.add_argument(
        "--iu-images", type=int, default=2, help="IU: images per item (items with fewer are skipped)"
    )


def _radialog_args(p: argparse.ArgumentParser) -> None:
    from workflow.exports import prompt_source

    p.add_argument("--radialog-rg", type=Path, required=True, help="mimic_cxr_reports_stratified.json")
    p.add_argument("--radialog-ins", type=Path, required=True, help="mimic_cxr_instruct_stratified.json")
    p.add_argument(
        "--radialog-prompts-from",
        type=Path,
        help="RaDialog checkout or its vicuna_prompts.json: its RG instruction and system message",
    )
    p.add_argument("--radialog-prompt-key", default=prompt_source.DEFAULT_PROMPT_KEY)
    add_llm_task_args(p, "the easy-language and reasoning tasks", max_tokens=300)
    p.add_argument("--seed", type=int, default=0)


def parser(command: str | None) -> argparse.ArgumentParser:
    """The command line of ``command`` (None: the whole stage in one process)."""
    if command == "r2gen":
        p = cli_parser("R2GenGPT/MeGPT annotation.json, its part of the exports' summary and the rejects")
        _input_args(p, findings=False)
        _r2gen_args(p)
        p.add_argument("--part", type=Path, required=True, help="its part of summary.json (JSON)")
        p.add_argument("--rejects", type=Path, required=True, help="the stage's rejects")
    elif command == "radialog":
        p = cli_parser("RaDialog RG/INS training files and their part of the exports' summary")
        _input_args(p, findings=True)
        _radialog_args(p)
        p.add_argument("--part", type=Path, required=True, help="its part of summary.json (JSON)")
    elif command == "summary":
        p = exports_summary.parser()
    else:
        p = cli_parser(
            "R2GenGPT/MeGPT annotation.json and RaDialog RG/INS training files (the whole stage in one "
            f"process; the rules run its parts: python -m workflow.exports {{{','.join(COMMANDS)}}} -h)"
        )
        _input_args(p, findings=True)
        _r2gen_args(p)
        _radialog_args(p)
        p.add_argument("--summary", type=Path, required=True)
        p.add_argument("--card", type=Path, required=True, help="README.md")
        p.add_argument("--rejects", type=Path, required=True)
    return p


def _read(path: Path, columns: list[str]) -> pa.Table:
    # one chunk per column: the builders take rows at random a chunk of items at a time, and Arrow
    # takes from a many-chunk column (a Parquet row group each) by concatenating it first, every time
    return read_table(path, columns).combine_chunks()


def _read_inputs(args, command: str | None) -> tuple[pd.DataFrame, ...]:
    """The tables ``command`` reads (the R2Gen part reads no findings; the RaDialog part reads an image's
    ids only)."""
    studies = _read(args.studies, ["subject_id", "study_id", "split"]).to_pandas()
    image_columns = ["dicom_id", "study_id"]
    if command != "radialog":
        image_columns += ["view_position", "image_path"]
    images = _read(args.images, image_columns).to_pandas()
    sections = _read(args.sections, ["study_id", "findings", "impression"]).to_pandas()
    if command == "r2gen":
        return studies, images, sections
    from workflow.exports.radialog import LABELLED_ROWS

    table = read_table(args.findings, ["study_id", "name", "presence", "section", "start"])
    return studies, images, sections, table.filter(LABELLED_ROWS).combine_chunks().to_pandas()


def _r2gen(args, studies, images, sections) -> tuple[dict, Rejects]:
    return r2gen_part(
        studies,
        images,
        sections,
        args.r2gen,
        args.dataset,
        args.report_sections,
        args.clean,
        args.iu_images,
    )


def _radialog(
    p: argparse.ArgumentParser, args, studies, images, sections, findings, keep: list | None = None
) -> tuple[dict, list]:
    """The RaDialog part from its command line; (its summary part, its LLM_REQUESTS rows); ``keep``: as
    :func:`radialog_part`'s."""
    from workflow.exports import prompt_source

    prompts = (
        prompt_source.load(args.radialog_prompts_from, args.radialog_prompt_key)
        if args.radialog_prompts_from
        else None
    )
    if prompts is not None:
        log.info("radialog prompts read from %s", args.radialog_prompts_from)
    generator = None
    if args.llm_config:
        if not args.llm_cache:
            p.error("--llm-config needs --llm-cache")
        from workflow.exports.llm_tasks import InstructGenerator

        generator = InstructGenerator.from_config(
            args.llm_config,
            args.llm_cache,
            args.llm_endpoint,
            {"temperature": args.temperature, "max_tokens": args.max_tokens},
        )
    part = radialog_part(
        studies,
        images,
        sections,
        findings,
        args.radialog_rg,
        args.radialog_ins,
        args.seed,
        prompts,
        generator,
        keep,
    )
    return part, generator.requests if generator else []


def main(argv: list[str] | None = None, exit_when_done: bool = False) -> dict:
    """Run a command line (``argv``; None: the process's). ``exit_when_done``: end the process once the
    outputs are written, without freeing what it built (``python -m workflow.exports``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    if command == "summary":
        return exports_summary.main(argv[1:])
    p = parser(command)
    args = p.parse_args(argv[1:] if command else argv)
    setup_logging(args.verbose)
    gc.disable()  # ~1M records of small objects and no cycles: the cyclic GC would only rescan them
    # Arrow's default pool (mimalloc) keeps what the readers and string kernels free for Arrow alone; the
    # system allocator hands it back to the Python objects that fill the rest of the run
    pa.set_memory_pool(pa.system_memory_pool())
    inputs = _read_inputs(args, command)
    built: list = []  # the RaDialog builder and records, freed on return (or left to the exit)
    if command == "r2gen":
        result, rejects = _r2gen(args, *inputs)
        rejects.write(args.rejects)
        write_json(result, args.part)
    elif command == "radialog":
        result, requests = _radialog(p, args, *inputs, keep=built)
        if args.llm_requests:
            write_requests(requests, args.llm_requests)
        write_json(result, args.part)
    else:
        r2gen_info, rejects = _r2gen(args, *inputs[:3])
        radialog_info, requests = _radialog(p, args, *inputs, keep=built)
        result = exports_summary.write_summary(r2gen_info, radialog_info, args.summary, args.card)
        rejects.write(args.rejects)
        if args.llm_requests:
            write_requests(requests, args.llm_requests)
    if exit_when_done:  # here, where the inputs and what was built are still referenced
        exit_leaving_objects()
    return result


if __name__ == "__main__":
    main(exit_when_done=True)
