"""Medical-CXR-VQA question generation: standardised findings + image metadata -> question/answer pairs.

``python -m workflow.vqa shard|merge``, the command lines rules/vqa.smk runs (the package docstring says
what is built). ``shard``: the questions of the patients with ``subject_id % shards == shard`` (reading,
preparing and generating: the expensive part); ``merge``: the stage's outputs from all shards
(concatenation, the CSV, the statistics, the text-only leak probe over every question, the rejects).
"""

from __future__ import annotations

import logging

import pyarrow.compute as pc

from workflow import cli
from workflow.contract import QUESTIONS
from workflow.tables import summary, write_table
from workflow.vqa.config import REPO, STAGE, STYLES, VqaConfig
from workflow.vqa.generate import generate
from workflow.vqa.levels import load_level_lib
from workflow.vqa.libs import (
    STYLE_TEMPLATES,
    left_out_names,
    load_display_names,
    load_templates,
    load_vocabulary,
)
from workflow.vqa.shard import read_inputs
from workflow.vqa.writer import merge_outputs

log = logging.getLogger(__name__)


def shard(args) -> dict:
    """Generate one shard's questions; writes its questions and rejects."""
    names = load_vocabulary(args.vocabulary)
    display = load_display_names(args.names, names)
    if args.style not in STYLES:
        raise ValueError(f"vqa.style: {args.style!r} is not one of {list(STYLES)}")
    if not 0 <= args.shard < args.shards:
        raise ValueError(f"--shard {args.shard} is not in 0..{args.shards - 1}")
    tpl = load_templates(args.templates or STYLE_TEMPLATES[args.style])
    cfg = VqaConfig(
        seed=args.seed,
        style=args.style,
        level_word_min_count=args.level_word_min_count,
        exclude_names=tuple(dict.fromkeys([*args.exclude_names, *left_out_names(args.names)])),
        abnormality_no_finding_rate=args.abnormality_no_finding_rate,
        explicit_negative_weight=args.explicit_negative_weight,
        laterality_flip_share=args.laterality_flip_share,
        view_balance=args.view_balance,
        shards=args.shards,
        shard=args.shard,
    )
    level_lib = load_level_lib(args.levels)
    compat = level_lib if args.style == "medical_cxr_vqa" else None
    inputs, corpus = read_inputs(
        args.findings,
        args.images,
        args.studies,
        args.keyinfo_studies,
        args.shard,
        args.shards,
        names,
        cfg.exclude_names,
        compat,
    )
    table, p, info = generate(
        **inputs, tpl=tpl, names=names, cfg=cfg, display=display, level_lib=level_lib, corpus=corpus
    )
    write_table(table, args.questions, QUESTIONS)
    p.rejects.write(args.rejects)
    for k, v in info.items():
        log.info("%s: %s", k, v)
    n_out = int(pc.count_distinct(table["study_id"]).as_py()) if table.num_rows else 0
    summary(f"{STAGE} shard {args.shard}/{args.shards}", p.n_studies_in, n_out, len(p.rejects))
    log.info("vqa shard %d: %d questions", args.shard, table.num_rows)
    return info


def merge(args) -> None:
    outputs = {
        "questions": args.questions,
        "csv": args.csv,
        "stats": args.stats,
        "stats_csv": args.stats_csv,
        "leak": args.leak,
        "rejects": args.rejects,
    }
    merge_outputs(args.shard_questions, args.shard_rejects, outputs, args.seed, args.leak_probe_max)


def _flag(text: str) -> bool:
    if text.strip().lower() in ("true", "1", "yes"):
        return True
    if text.strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _optional(text: str) -> str | None:
    return None if text.strip() in ("", "None", "null") else text


def main(argv=None) -> None:
    ap = cli.parser(__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shard", help="one shard's questions and rejects")
    s.add_argument("--findings", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--studies", required=True)
    s.add_argument(
        "--keyinfo-studies",
        type=_optional,
        default=None,
        help="the key-information stage's per-study status (KEYINFO_STUDIES): which studies are normal",
    )
    s.add_argument("--style", default="medical_cxr_vqa", help=" | ".join(STYLES))
    s.add_argument(
        "--templates", type=_optional, default=None, help="template file (default: the style's own)"
    )
    s.add_argument("--levels", default=str(REPO / "libs" / "levels.csv"))
    s.add_argument("--level-word-min-count", type=int, default=10)
    s.add_argument("--vocabulary", default=str(REPO / "libs" / "vocabulary.yaml"))
    s.add_argument(
        "--names",
        type=_optional,
        default=None,
        help="findings lib with name,vqa_name columns (optional; 'None' or '' = canonical names)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exclude-names", nargs="*", default=["support device"])
    s.add_argument("--abnormality-no-finding-rate", type=float, default=1.0)
    s.add_argument("--explicit-negative-weight", type=float, default=4.0)
    s.add_argument("--laterality-flip-share", type=float, default=0.5)
    s.add_argument("--view-balance", type=_flag, default=True, help="true/false")
    s.add_argument("--shard", type=int, default=0)
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--questions", required=True)
    s.add_argument("--rejects", required=True)
    m = sub.add_parser("merge", help="the stage's outputs from every shard's")
    m.add_argument("--shard-questions", nargs="+", required=True, help="in shard order")
    m.add_argument("--shard-rejects", nargs="+", required=True)
    m.add_argument("--seed", type=int, default=0, help="the leak probe's sample")
    m.add_argument("--leak-probe-max", type=int, default=200_000)
    m.add_argument("--questions", required=True)
    m.add_argument("--csv", required=True)
    m.add_argument("--stats", required=True)
    m.add_argument("--stats-csv", required=True)
    m.add_argument("--leak", default=None)
    m.add_argument("--rejects", required=True)
    args = ap.parse_args(argv)
    cli.setup_logging(args.verbose)
    {"shard": shard, "merge": merge}[args.command](args)


if __name__ == "__main__":
    main()
    cli.exit_leaving_objects()
