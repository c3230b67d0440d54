"""``python -m workflow.exports summary``: the exports' summary.json, card, rejects and LLM requests from
the parts the R2Gen and RaDialog jobs leave (:mod:`workflow.exports.build`). A job of its own at the end
of the stage, so it imports neither pandas nor the builders: JSON, the card and two file copies."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from workflow.cli import parser as cli_parser
from workflow.cli import setup_logging
from workflow.exports import card
from workflow.tables import atomic_output, atomic_path, summary, write_json

log = logging.getLogger(__name__)
STAGE = "exports"
# summary.json's keys, in its order, and the part that gives each
R2GEN_KEYS = ("r2gen", "r2gen_report_sections")
RADIALOG_KEYS = ("radialog_rg", "radialog_ins", "radialog_tasks", "radialog_prompts", "radialog_llm_tasks")


def write_text(text: str, path: Path) -> None:
    with atomic_output(path, "w") as fh:
        fh.write(text)


def copy_file(source: Path, path: Path) -> None:
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def write_summary(r2gen_part: dict, radialog_part: dict, summary_path: Path, card_path: Path) -> dict:
    """summary.json and the card from the two parts; the summary's counts."""
    counts = {**{k: r2gen_part[k] for k in R2GEN_KEYS}, **{k: radialog_part[k] for k in RADIALOG_KEYS}}
    write_json(counts, summary_path)
    write_text(card.render(counts, r2gen_part["dataset"], r2gen_part["clean"]), card_path)
    log.info("exports: %s", json.dumps(counts))
    summary(STAGE, r2gen_part["studies"], r2gen_part["exported"], r2gen_part["rejected"])
    return counts


def parser() -> argparse.ArgumentParser:
    p = cli_parser("The exports' summary.json, card, rejects and LLM requests from the parts")
    p.add_argument("--r2gen-part", type=Path, required=True)
    p.add_argument("--r2gen-rejects", type=Path, required=True)
    p.add_argument("--radialog-part", type=Path, required=True)
    p.add_argument("--radialog-llm-requests", type=Path, required=True)
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--card", type=Path, required=True, help="README.md")
    p.add_argument("--rejects", type=Path, required=True)
    p.add_argument("--llm-requests", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> dict:
    """The command line after ``summary``."""
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    r2gen_part = json.loads(args.r2gen_part.read_text())
    counts = write_summary(r2gen_part, json.loads(args.radialog_part.read_text()), args.summary, args.card)
    # every RaDialog image is an R2Gen item: the R2Gen job's rejects are the stage's; only the RaDialog
    # job asks an LLM
    copy_file(args.r2gen_rejects, args.rejects)
    copy_file(args.radialog_llm_requests, args.llm_requests)
    return counts
