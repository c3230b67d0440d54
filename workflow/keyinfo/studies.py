"""Per-study status of the key information: normal / abnormal / unknown (contract.KEYINFO_STUDIES).

    python -m workflow.keyinfo.studies --sections results/sections/sections.parquet \\
        --normal-statements results/keyinfo/rules/normal_statements.parquet \\
        --findings results/keyinfo/rules/findings.parquet --out results/keyinfo/studies.parquet

A study without any finding row is either a normal report ("No acute cardiopulmonary process.") or a
report that says nothing we read; downstream stages must tell the two apart (Medical-CXR-VQA asks the
abnormality question "no" of normal studies only). Works for either backend: the findings are whatever the
configured backend wrote; the normal statement comes from the report text (libs/triggers.yaml
``normal_statements``), read in the same sections the extractor reads: the rules extractor finds it while
it reads them (run_rules ``--normal-statements``, one row per study read), so this stage only adds counts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflow.cli import arrow_without_pandas, exit_leaving_objects, setup_logging
from workflow.cli import parser as cli_parser
from workflow.contract import KEYINFO_STUDIES
from workflow.keyinfo.names import DEVICE, FALLBACK_SECTION, READ_SECTIONS
from workflow.tables import TableWriter, read_table, summary

log = logging.getLogger(__name__)
STAGE = "keyinfo_studies"
TEXT_COLUMNS = (*READ_SECTIONS, FALLBACK_SECTION)

# One row per study the rules extractor read, in the sections table's order, with its normal statement
# (run_rules --normal-statements): text-level, so the same whichever backend wrote the findings.
NORMAL_STATEMENTS = pa.schema(
    [KEYINFO_STUDIES.field(n) for n in ("subject_id", "study_id", "normal_evidence")]
)


PRESENCES = ("positive", "uncertain", "negative")


def presence_counts(findings: Path) -> pa.Table:
    """study_id and n_positive / n_uncertain / n_negative: finding rows by presence, devices aside, of every
    study with any (one vectorised group-by)."""
    t = read_table(findings, ["study_id", "name", "presence"])
    t = t.filter(pc.not_equal(t["name"], DEVICE))
    flags = {f"n_{p}": pc.cast(pc.equal(t["presence"], p), pa.int32()) for p in PRESENCES}
    g = (
        pa.table({"study_id": t["study_id"], **flags})
        .group_by("study_id", use_threads=False)  # threaded: twice the CPU; the order is looked up away
        .aggregate([(k, "sum") for k in flags])
    )
    return pa.table({"study_id": g["study_id"], **{k: pc.cast(g[f"{k}_sum"], pa.int32()) for k in flags}})


def studies_table(read: pa.Table, counts: pa.Table) -> pa.Table:
    """KEYINFO_STUDIES of NORMAL_STATEMENTS rows and the :func:`presence_counts` of their studies (zero for
    a study without rows), column-wise. Status: ``abnormal`` with any positive or uncertain finding
    (devices aside); ``normal`` when the report says so or denies at least one finding; ``unknown`` when it
    names nothing and makes no normal statement."""
    at = pc.index_in(read["study_id"], value_set=counts["study_id"])
    n = {k: pc.fill_null(pc.take(counts[k], at), 0) for k in (f"n_{p}" for p in PRESENCES)}
    evidence = read["normal_evidence"]
    said = pc.fill_null(pc.greater(pc.utf8_length(evidence), 0), False)  # a non-empty statement
    abnormal = pc.greater(pc.add(n["n_positive"], n["n_uncertain"]), 0)
    normal = pc.or_(said, pc.greater(n["n_negative"], 0))
    status = pc.if_else(abnormal, "abnormal", pc.if_else(normal, "normal", "unknown"))
    columns = {"subject_id": read["subject_id"], "study_id": read["study_id"], "status": status,
               "normal_evidence": evidence, **n}  # fmt: skip
    return pa.table([columns[f.name] for f in KEYINFO_STUDIES], schema=KEYINFO_STUDIES)


def run(sections: Path, normal_statements: Path, findings: Path, out: Path) -> None:
    """KEYINFO_STUDIES: every study read (NORMAL_STATEMENTS, in its row groups) with its finding counts."""
    counts = presence_counts(findings)
    by_status = dict.fromkeys(("normal", "abnormal", "unknown"), 0)
    read = pq.ParquetFile(normal_statements)
    groups = [read.read_row_group(group) for group in range(read.num_row_groups)]
    with TableWriter(out, KEYINFO_STUDIES) as writer:
        if groups:
            # all row groups at once: index_in hashes the counts' study ids on every call; the columns keep
            # the row groups' chunks, so each group's slice is what the group alone would give
            table = studies_table(pa.concat_tables(groups), counts)
            for row in pc.value_counts(table["status"]).to_pylist():
                by_status[row["values"]] += row["counts"]
            offset = 0
            for group in groups:  # one row group per batch of sections, as the extractor wrote them
                writer.write(table.slice(offset, group.num_rows))
                offset += group.num_rows
    n_in = pq.ParquetFile(sections).metadata.num_rows
    by_status["no text"] = n_in - writer.rows  # rejected by the extractor (no_report_text): not read
    summary(STAGE, n_in, writer.rows, by_status["no text"])
    log.info("%s: %s", STAGE, ", ".join(f"{k} {v}" for k, v in by_status.items()))


def main(argv: list[str] | None = None) -> None:
    p = cli_parser("Per-study normal / abnormal / unknown status of the key information.")
    p.add_argument("--sections", required=True, type=Path, help="sections.parquet (contract.SECTIONS)")
    p.add_argument(
        "--normal-statements",
        required=True,
        type=Path,
        help="run_rules' normal statements of the studies read",
    )
    p.add_argument("--findings", required=True, type=Path, help="the findings table downstream stages read")
    p.add_argument(
        "--out", required=True, type=Path, help="output studies.parquet (contract.KEYINFO_STUDIES)"
    )
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    for key in ("sections", "normal_statements", "findings"):
        if not getattr(args, key).exists():
            p.error(f"--{key.replace('_', '-')}: {getattr(args, key)} does not exist")
    run(args.sections, args.normal_statements, args.findings, args.out)


if __name__ == "__main__":
    arrow_without_pandas()
    main()
    exit_leaving_objects()
