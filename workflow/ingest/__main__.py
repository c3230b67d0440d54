"""Ingest raw reports: ``python -m workflow.ingest {mimic,iu} ...``, the command line rules/ingest.smk runs."""

from __future__ import annotations

import logging
import os

from workflow.cli import arrow_without_pandas, exit_leaving_objects, setup_logging
from workflow.cli import parser as base_parser
from workflow.ingest.common import DEFAULT_MAX_REPORT_BYTES, STAGE, InputError, Result
from workflow.ingest.iu import ingest_iu
from workflow.ingest.mimic import ingest_mimic
from workflow.tables import summary

log = logging.getLogger(__name__)


def build_parser():
    p = base_parser("Ingest raw reports into the studies/images/rejects tables of the data contract.")
    sub = p.add_subparsers(dest="format", required=True)
    mimic = sub.add_parser("mimic", help="MIMIC-CXR reports (files/ directory or mimic-cxr-reports.zip)")
    mimic.add_argument("--reports", required=True, help="files/ directory or mimic-cxr-reports.zip")
    mimic.add_argument("--split", required=True, help="mimic-cxr-2.0.0-split.csv(.gz)")
    mimic.add_argument("--metadata", required=True, help="mimic-cxr-2.0.0-metadata.csv(.gz)")
    iu = sub.add_parser("iu", help="IU X-Ray (indiana_reports.csv + indiana_projections.csv)")
    iu.add_argument("--reports", required=True, help="indiana_reports.csv")
    iu.add_argument("--projections", required=True, help="indiana_projections.csv")
    iu.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    iu.add_argument("--split-ratios", default="0.7,0.1,0.2", help="train,validate,test (default 0.7,0.1,0.2)")
    for sp in (mimic, iu):
        sp.add_argument("--studies", required=True, help="output studies.parquet")
        sp.add_argument("--images", required=True, help="output images.parquet")
        sp.add_argument("--rejects", required=True, help="output rejects.parquet")
        sp.add_argument(
            "--workers",
            type=int,
            default=min(2, os.cpu_count() or 1),
            help="processes inflating and decoding MIMIC reports (default: up to 2; IU is read in one)",
        )
        sp.add_argument(
            "--max-report-bytes",
            type=int,
            default=DEFAULT_MAX_REPORT_BYTES,
            help="larger reports are rejected as too_large, never read in full (config ingest.max_report_bytes)",
        )
        sp.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> Result:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    outputs = (args.studies, args.images, args.rejects)
    try:
        if args.format == "mimic":
            result = ingest_mimic(
                args.reports, args.split, args.metadata, *outputs, workers=args.workers,
                max_report_bytes=args.max_report_bytes,
            )  # fmt: skip
        else:
            try:
                ratios = [float(x) for x in args.split_ratios.split(",")]
            except ValueError:
                ratios = []
            if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
                p.error(f"--split-ratios: expected three non-negative numbers, got {args.split_ratios!r}")
            result = ingest_iu(
                args.reports,
                args.projections,
                *outputs,
                split_seed=args.split_seed,
                split_ratios=ratios,
                max_report_bytes=args.max_report_bytes,
            )
    except InputError as exc:
        p.error(str(exc))
    summary(STAGE, result.n_in, result.n_out, len(result.rejects))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(result.reasons.items())) or "none"
    log.info("ingest: %d images; rejected by reason: %s", result.n_images, reasons)
    return result


if __name__ == "__main__":
    # MIMIC ingest hands pyarrow no pandas object (IU's tables are pandas frames: pyarrow must see them)
    if build_parser().parse_known_args()[0].format == "mimic":
        arrow_without_pandas()
    main()
    exit_leaving_objects()
