"""Medical-CXR-VQA question generation: standardised findings + image metadata -> question/answer pairs.

``python -m workflow.vqa``, the command line rules/vqa.smk runs (the package docstring says what is built).
"""

from __future__ import annotations

import logging

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflow import cli
from workflow.contract import VQA_LEAK
from workflow.tables import atomic_path, summary
from workflow.vqa.config import REPO, STAGE, STYLES, VqaConfig
from workflow.vqa.generate import generate
from workflow.vqa.leak import leak_report
from workflow.vqa.levels import load_level_lib
from workflow.vqa.libs import (
    STYLE_TEMPLATES,
    left_out_names,
    load_display_names,
    load_templates,
    load_vocabulary,
)
from workflow.vqa.writer import write_outputs

log = logging.getLogger(__name__)


def run(args) -> dict:
    names = load_vocabulary(args.vocabulary)
    display = load_display_names(args.names, names)
    if args.style not in STYLES:
        raise ValueError(f"vqa.style: {args.style!r} is not one of {list(STYLES)}")
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
        leak_probe_max=args.leak_probe_max,
    )
    wanted = ["study_id", "name", "presence", "location", "level", "type", "raw_name", "evidence"]
    available = set(pq.read_schema(args.findings).names)
    findings = pq.read_table(args.findings, columns=[c for c in wanted if c in available]).to_pandas()
    images = pq.read_table(args.images).to_pandas()
    studies = pq.read_table(args.studies, columns=["subject_id", "study_id", "split"]).to_pandas()
    keyinfo_studies = (
        pq.read_table(args.keyinfo_studies, columns=["study_id", "status"]).to_pandas()
        if args.keyinfo_studies
        else None
    )
    table, p, info = generate(
        findings,
        images,
        studies,
        tpl,
        names,
        cfg,
        display,
        keyinfo_studies=keyinfo_studies,
        level_lib=load_level_lib(args.levels),
    )
    write_outputs(table, args.questions, args.csv, args.stats, args.stats_csv)
    if args.leak:
        leak = (
            leak_report(
                table.select(["question_type", "question", "answer"]).to_pandas(),
                cfg.seed,
                cfg.leak_probe_max,
            )
            if cfg.leak_probe_max
            else pd.DataFrame(columns=VQA_LEAK.names)
        )
        with atomic_path(args.leak) as tmp:
            leak.to_csv(tmp, index=False)
        for r in leak.itertuples():
            log.info(
                "text-only probe %s: majority %.3f, best text-only %.3f (gain %+.3f)",
                r.question_type,
                r.majority_accuracy,
                max(r.naive_bayes_accuracy, r.logreg_accuracy, r.lookup_accuracy),
                r.gain,
            )
    p.rejects.write(args.rejects)
    for k, v in info.items():
        log.info("%s: %s", k, v)
    n_out = int(pc.count_distinct(table["study_id"]).as_py()) if table.num_rows else 0
    summary(STAGE, p.n_studies_in, n_out, len(p.rejects))
    log.info("vqa: %d questions", table.num_rows)
    return info


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
    ap.add_argument("--findings", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--studies", required=True)
    ap.add_argument(
        "--keyinfo-studies",
        type=_optional,
        default=None,
        help="the key-information stage's per-study status (KEYINFO_STUDIES): which studies are normal",
    )
    ap.add_argument("--style", default="medical_cxr_vqa", help=" | ".join(STYLES))
    ap.add_argument(
        "--templates", type=_optional, default=None, help="template file (default: the style's own)"
    )
    ap.add_argument("--levels", default=str(REPO / "libs" / "levels.csv"))
    ap.add_argument("--level-word-min-count", type=int, default=10)
    ap.add_argument("--vocabulary", default=str(REPO / "libs" / "vocabulary.yaml"))
    ap.add_argument(
        "--names",
        type=_optional,
        default=None,
        help="findings lib with name,vqa_name columns (optional; 'None' or '' = canonical names)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude-names", nargs="*", default=["support device"])
    ap.add_argument("--abnormality-no-finding-rate", type=float, default=1.0)
    ap.add_argument("--explicit-negative-weight", type=float, default=4.0)
    ap.add_argument("--laterality-flip-share", type=float, default=0.5)
    ap.add_argument("--view-balance", type=_flag, default=True, help="true/false")
    ap.add_argument("--leak-probe-max", type=int, default=200_000)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--stats-csv", required=True)
    ap.add_argument("--leak", default=None)
    ap.add_argument("--rejects", required=True)
    args = ap.parse_args(argv)
    cli.setup_logging(args.verbose)
    run(args)


if __name__ == "__main__":
    main()
