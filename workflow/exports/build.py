"""The exports rule: the training files of the other seeds from our tables.

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
  ``too_few_images`` (IU needs ``--iu-images``), ``not_in_split``.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from workflow.cli import add_llm_task_args, setup_logging
from workflow.cli import parser as cli_parser
from workflow.exports import card, llm_tasks, prompt_source, r2gen, radialog
from workflow.exports.llm_tasks import InstructGenerator
from workflow.exports.prompt_source import ExternalPrompts
from workflow.llm.stages import write_requests
from workflow.tables import Rejects, atomic_path, read_table, summary

log = logging.getLogger(__name__)
STAGE = "exports"
OWN_PROMPTS = (
    "ours: libs/radialog_prompts.yaml (paraphrases; RaDialog's wording needs exports.radialog.prompts_from)"
)


def write_json(data, path: Path) -> None:
    write_text(json.dumps(data, ensure_ascii=False), path)  # dumps uses the C encoder, dump does not


def write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


@dataclass
class OutputPaths:
    r2gen: Path
    radialog_rg: Path
    radialog_ins: Path
    summary: Path
    rejects: Path
    card: Path  # README.md: what the files hold and how they were made


# rules/exports.smk's input and output names -> this stage's path flags
RULE_FLAGS = {
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
}


def rule_args(paths: Mapping[str, Path]) -> list[str]:
    """The path flags of rules/exports.smk's shell line, from the names of its inputs and outputs: tests
    and bench/ run the stage the way the rule does. Names the shell line does not pass are ignored."""
    return [x for name, flag in RULE_FLAGS.items() for x in (flag, str(paths[name]))]


def run(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    findings: pd.DataFrame,
    paths: OutputPaths,
    dataset: str = "mimic",
    report_sections: str | None = None,
    clean: bool = False,
    iu_images: int = 2,
    seed: int = 0,
    workers: int = 1,
    prompts: ExternalPrompts | None = None,
    generator: InstructGenerator | None = None,
) -> dict:
    """Write every export; with ``workers`` > 1 the R2Gen annotation is built on a forked process while
    this one builds the RaDialog files. ``report_sections`` None: the corpus default
    (:func:`workflow.exports.r2gen.report_sections`); ``prompts``: RaDialog's own RG instruction and
    system message (:func:`workflow.exports.prompt_source.load`), else our paraphrases."""
    report_sections = r2gen.report_sections(dataset, report_sections)
    log.info("r2gen annotation: report = %s", report_sections.replace("_", " + "))
    prompt_info = prompt_summary(prompts)
    log.info("radialog prompts: %s", prompt_info["source"])
    _R2GEN.update(args=(studies, images, sections, paths, dataset, report_sections, clean, iu_images))
    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
                future = pool.submit(_r2gen_export)
                # built after the fork: the RaDialog side overlaps the R2Gen one from its first step
                builder = radialog.builder_for(studies, images, sections, findings, seed, prompts)
                rg, ins, task_counts = radialog.build_encoded(builder, generator)
                _write_radialog(rg, ins, paths)
                r2gen_counts, exported = future.result()
        else:
            r2gen_counts, exported = _r2gen_export()
            builder = radialog.builder_for(studies, images, sections, findings, seed, prompts)
            rg, ins, task_counts = radialog.build_encoded(builder, generator)
            _write_radialog(rg, ins, paths)
    finally:
        _R2GEN.clear()
    n_rg = task_counts["report_generation"]
    counts = {
        "r2gen": r2gen_counts,
        "r2gen_report_sections": report_sections,
        "radialog_rg": n_rg,
        "radialog_ins": n_rg + sum(v for k, v in task_counts.items() if k != "report_generation"),
        "radialog_tasks": task_counts,
        "radialog_prompts": prompt_info,
        "radialog_llm_tasks": generator.stats if generator else llm_tasks.ABSENT,
    }
    if generator is None:
        log.info("radialog llm tasks: %s", llm_tasks.ABSENT)
    write_json(counts, paths.summary)
    write_text(card.render(counts, dataset, clean), paths.card)
    return {"counts": counts, "exported": set(exported)}


def prompt_summary(prompts: ExternalPrompts | None) -> dict:
    """Which prompt source a build used (summary.json, the log): files and key, and a digest of the
    wording, never RaDialog's text itself."""
    if prompts is None:
        return {"source": OWN_PROMPTS, "sha256": None}
    return {"source": prompts.description, "sha256": prompts.digest()}


_R2GEN: dict = {}  # what the forked R2Gen writer inherits (never pickled)


def _r2gen_export() -> tuple[dict[str, int], list[int]]:
    """Build and write the R2Gen annotation; (items per split, exported study ids). MIMIC's is streamed
    a chunk of items at a time."""
    studies, images, sections, paths, dataset, report_sections, clean, iu_images = _R2GEN["args"]
    if dataset == "iu":
        annotation = r2gen.iu_annotation(studies, images, sections, report_sections, clean, iu_images)
        exported = {int(i) for i in _iu_study_ids(annotation, images)}
        chunks = annotation.items()
    else:
        exported = set()

        def noting_studies(items):
            for split, chunk in items:
                exported.update(item["study_id"] for item in chunk)
                yield split, chunk

        chunks = noting_studies(r2gen.mimic_items(studies, images, sections, report_sections, clean))
    paths.r2gen.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.r2gen) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        counts = r2gen.write_annotation(chunks, fh)
    return counts, sorted(exported)


def _write_radialog(rg: list[str], ins: list[str], paths: OutputPaths) -> None:
    for records, path in ((rg, paths.radialog_rg), (ins, paths.radialog_ins)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            radialog.write_json_list(records, fh)


def _iu_study_ids(annotation: dict, images: pd.DataFrame) -> list[int]:
    by_path = dict(zip(images["image_path"], images["study_id"], strict=False))
    return [by_path[item["image_path"][0]] for items in annotation.values() for item in items]


def rejects_for(studies: pd.DataFrame, sections: pd.DataFrame, exported: set[int], dataset: str) -> Rejects:
    rejects = Rejects(STAGE)
    has_findings = set(
        sections.loc[sections["findings"].fillna("").str.strip() != "", "study_id"].astype(int)
    )
    for sid, split in studies[["study_id", "split"]].itertuples(index=False):
        sid = int(sid)
        if sid in exported:
            continue
        if split not in ("train", "validate", "test"):
            rejects.add(sid, "not_in_split")
        elif sid not in has_findings:
            rejects.add(sid, "no_findings")
        else:
            rejects.add(sid, "too_few_images" if dataset == "iu" else "no_images")
    return rejects


def main(argv: list[str] | None = None) -> dict:
    p = cli_parser("R2GenGPT/MeGPT annotation.json and RaDialog RG/INS training files")
    p.add_argument("--studies", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--sections", required=True, type=Path)
    p.add_argument("--findings", required=True, type=Path)
    p.add_argument("--r2gen", type=Path, required=True, help="annotation.json")
    p.add_argument("--radialog-rg", type=Path, required=True, help="mimic_cxr_reports_stratified.json")
    p.add_argument("--radialog-ins", type=Path, required=True, help="mimic_cxr_instruct_stratified.json")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--rejects", type=Path, required=True)
    p.add_argument("--card", type=Path, required=True, help="README.md")
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
    p.add_argument(
        "--radialog-prompts-from",
        type=Path,
        help="RaDialog checkout or its vicuna_prompts.json: its RG instruction and system message",
    )
    p.add_argument("--radialog-prompt-key", default=prompt_source.DEFAULT_PROMPT_KEY)
    add_llm_task_args(p, "the easy-language and reasoning tasks", max_tokens=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=1, help="2: build the R2Gen and RaDialog files side by side"
    )
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    gc.disable()  # ~1M records of small objects and no cycles: the cyclic GC would only rescan them
    # Arrow's default pool (mimalloc) keeps what the readers and string kernels free for Arrow alone; the
    # system allocator hands it back to the Python objects that fill the rest of the run
    pa.set_memory_pool(pa.system_memory_pool())
    paths = OutputPaths(
        args.r2gen, args.radialog_rg, args.radialog_ins, args.summary, args.rejects, args.card
    )

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
        generator = InstructGenerator.from_config(
            args.llm_config,
            args.llm_cache,
            args.llm_endpoint,
            {"temperature": args.temperature, "max_tokens": args.max_tokens},
        )
    studies = read_table(args.studies, ["subject_id", "study_id", "split"]).to_pandas()
    images = read_table(args.images, ["dicom_id", "study_id", "view_position", "image_path"]).to_pandas()
    sections = read_table(args.sections, ["study_id", "findings", "impression"]).to_pandas()
    findings = read_table(args.findings, ["study_id", "name", "presence", "section", "start"])
    findings = findings.filter(radialog.LABELLED_ROWS).to_pandas()
    result = run(
        studies,
        images,
        sections,
        findings,
        paths,
        args.dataset,
        args.report_sections,
        args.clean,
        args.iu_images,
        args.seed,
        args.workers,
        prompts,
        generator,
    )
    rejects = rejects_for(studies, sections, result["exported"], args.dataset)
    rejects.write(paths.rejects)
    if args.llm_requests:
        write_requests(generator.requests if generator else [], args.llm_requests)
    log.info("exports: %s", json.dumps(result["counts"]))
    summary(STAGE, len(studies), len(result["exported"]), len(rejects))
    return result


if __name__ == "__main__":
    main()
