"""The ``rules`` keyinfo backend over a whole ``sections`` table -> ``findings`` (+ stats, rejects).

    python -m workflow.keyinfo.run_rules --sections results/sections/sections.parquet \\
        --findings results/keyinfo/rules/findings.parquet --stats results/keyinfo/rules/stats.parquet \\
        --rejects results/keyinfo/rules/rejects.parquet --alternatives uncertain --hedges uncertain

Streams the sections table batch by batch; with ``--workers`` > 1 batches are extracted on a process pool
while the parent writes in order. A study with no findings / impression / last-paragraph text is rejected
(``no_report_text``); every other study is an output, also when it mentions no finding at all.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import operator
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow.cli import parser as cli_parser
from workflow.cli import setup_logging
from workflow.contract import FINDINGS, KEYINFO_STATS
from workflow.keyinfo.extract import Conventions, extract_sections, sections_for_reading
from workflow.keyinfo.studies import TEXT_COLUMNS, lenient_texts
from workflow.tables import Rejects, TableWriter, summary, write_table

log = logging.getLogger(__name__)
STAGE = "keyinfo_rules"


# the columns of an extractor row (extract_sections); the rule adds ids and source, the rest stay null
ROW_COLUMNS = ("name", "raw_name", "presence", "location", "level", "type", "change", "section", "start", "end",
               "evidence")  # fmt: skip


def rules_findings_table(rows: list[dict], subjects: list[int], studies: list[int]) -> pa.Table:
    """The FINDINGS table of extractor rows (every row carries ROW_COLUMNS) and their subject and study ids,
    built column by column with C-level getters (no ids written into every row dict, no per-value Python
    lookups as in ``from_pylist``)."""
    columns = {name: list(map(operator.itemgetter(name), rows)) for name in ROW_COLUMNS}
    columns.update(subject_id=subjects, study_id=studies, source=["rules"] * len(rows))
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(len(rows), f.type)
        for f in FINDINGS
    ]
    return pa.Table.from_arrays(arrays, schema=FINDINGS)


def extract_batch(
    batch: tuple[list[int], list[int], list[dict]], conventions: Conventions | None = None
) -> tuple[pa.Table, list[int], int]:
    """(findings table, study ids without any text, studies) of one batch of (subject ids, study ids, sections)."""
    subjects, studies, sections_of = batch
    rows: list[dict] = []
    row_subjects: list[int] = []
    row_studies: list[int] = []
    empty: list[int] = []
    for subject, study, sections in zip(subjects, studies, sections_of, strict=True):
        if not any((sections.get(s) or "").strip() for s in TEXT_COLUMNS):
            empty.append(study)
            continue
        found = extract_sections(sections, conventions)
        rows += found
        row_subjects += [subject] * len(found)
        row_studies += [study] * len(found)
    return rules_findings_table(rows, row_subjects, row_studies), empty, len(studies)


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of the sections table, read by the process that extracts them (the parent never
    decodes or ships report text); ``lenient`` holds the report text of the few studies in the slice that
    the lenient section reading needs."""

    path: str
    start: int
    stop: int
    lenient: dict[int, str]


_TABLES: dict[str, pa.Table] = {}  # per process: the sections table, read once


def _sections_table(path: str) -> pa.Table:
    if path not in _TABLES:
        pf = pq.ParquetFile(path)
        cols = [c for c in ("subject_id", "study_id", *TEXT_COLUMNS) if c in pf.schema_arrow.names]
        _TABLES.clear()
        _TABLES[path] = pf.read(columns=cols)
    return _TABLES[path]


def extract_slice(part: Slice, conventions: Conventions | None = None) -> tuple[pa.Table, list[int], int]:
    """:func:`extract_batch` of one slice of the sections table."""
    d = _sections_table(part.path).slice(part.start, part.stop - part.start).to_pydict()
    n = part.stop - part.start
    cols = {name: d.get(name, [None] * n) for name in TEXT_COLUMNS}
    rows = []
    for k, sid in enumerate(d["study_id"]):
        strict = {name: cols[name][k] for name in TEXT_COLUMNS}
        text = part.lenient.get(sid)
        rows.append(sections_for_reading(strict, text) if text is not None else strict)
    return extract_batch((d["subject_id"], d["study_id"], rows), conventions)


def _in_order(pool: ProcessPoolExecutor, fn, items, window: int):
    """``pool.map`` with at most ``window`` batches in flight: memory stays bounded by the window, not the
    corpus (``Executor.map`` submits every item at once)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def stats_table(findings: Path) -> pa.Table:
    """Per finding name: rows by presence and studies (vectorised over the written findings table)."""
    t = pq.read_table(findings, columns=["study_id", "name", "presence"])
    by_presence = t.group_by(["name", "presence"]).aggregate([([], "count_all")]).to_pylist()
    studies = t.group_by("name").aggregate([("study_id", "count_distinct")]).to_pylist()
    counts = {(r["name"], r["presence"]): r["count_all"] for r in by_presence}
    names = sorted(r["name"] for r in studies)
    n_studies = {r["name"]: r["study_id_count_distinct"] for r in studies}
    return pa.Table.from_pydict(
        {
            "name": names,
            "n_positive": [counts.get((n, "positive"), 0) for n in names],
            "n_uncertain": [counts.get((n, "uncertain"), 0) for n in names],
            "n_negative": [counts.get((n, "negative"), 0) for n in names],
            "n_studies": [n_studies[n] for n in names],
        },
        schema=KEYINFO_STATS,
    )


def plan_slices(sections: Path, reports: Path | None, lenient: bool, batch_size: int) -> list[Slice]:
    total = pq.ParquetFile(sections).metadata.num_rows
    texts = lenient_texts(sections, reports, lenient)
    ids = pq.read_table(sections, columns=["study_id"])["study_id"].to_pylist() if texts else []
    out = []
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        part = {sid: texts[sid] for sid in ids[start:stop] if sid in texts} if texts else {}
        out.append(Slice(str(sections), start, stop, part))
    return out


# The extraction allocates millions of short-lived objects without reference cycles (row dicts, mentions,
# tuples): at the default threshold (a collection per 700 allocations) the collector costs ~7 % of the
# stage's CPU and finds no garbage. Raised while the stage runs (workers set it when they start).
GC_THRESHOLD = (100_000, 50, 1000)


@contextlib.contextmanager
def rare_collections():
    """Run the block with the collector at GC_THRESHOLD; the previous threshold is restored after."""
    previous = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def extraction_pool(workers: int) -> ProcessPoolExecutor | None:
    """The extraction processes (none for one worker), each with the collector at GC_THRESHOLD."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(workers, initializer=gc.set_threshold, initargs=GC_THRESHOLD)


def run(sections: Path, findings: Path, stats: Path, rejects: Path, batch_size: int = 8192, workers: int = 1,
        reports: Path | None = None, conventions: Conventions | None = None, lenient: bool = True):  # fmt: skip
    rej = Rejects(STAGE)
    total = pq.ParquetFile(sections).metadata.num_rows
    slices = plan_slices(sections, reports, lenient, batch_size)
    with (
        rare_collections(),
        TableWriter(findings, FINDINGS) as writer,
        tqdm(total=total, unit="study", desc=STAGE) as bar,
    ):
        pool = extraction_pool(workers)
        try:
            work = functools.partial(extract_slice, conventions=conventions)
            results = _in_order(pool, work, slices, 2 * workers) if pool else map(work, slices)
            for table, empty, n_batch in results:
                for sid in empty:
                    rej.add(sid, "no_report_text", "no findings, impression or last paragraph")
                writer.write(table)
                bar.update(n_batch)
        finally:
            if pool:
                pool.shutdown()
    n_in = total
    table = stats_table(findings)
    write_table(table, stats, KEYINFO_STATS)
    rej.write(rejects)
    summary(STAGE, n_in, n_in - len(rej), len(rej))
    log.info("%s: %d finding rows (%d names)", STAGE, writer.rows, table.num_rows)


def main(argv: list[str] | None = None) -> None:
    p = cli_parser("Rules backend of key-information extraction: sections -> findings.")
    p.add_argument("--sections", required=True, type=Path, help="sections.parquet (contract.SECTIONS)")
    p.add_argument("--findings", required=True, type=Path, help="output findings.parquet (contract.FINDINGS)")
    p.add_argument(
        "--stats", required=True, type=Path, help="output per-finding counts (contract.KEYINFO_STATS)"
    )
    p.add_argument("--rejects", required=True, type=Path, help="output rejects.parquet")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=1, help="extraction processes")
    p.add_argument(
        "--reports", type=Path, help="studies.parquet (report text, for the lenient section reading)"
    )
    p.add_argument("--no-lenient", action="store_true", help="read MIT-LCP's sections only")
    # keyinfo.alternatives / hedges: the rule passes them, config.yaml holds their defaults
    p.add_argument("--alternatives", choices=("uncertain", "positive"), required=True)
    p.add_argument("--hedges", choices=("uncertain", "positive"), required=True)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not args.sections.exists():
        p.error(f"--sections: {args.sections} does not exist")
    run(args.sections, args.findings, args.stats, args.rejects, args.batch_size, args.workers, args.reports,
        Conventions(args.alternatives, args.hedges), not args.no_lenient)  # fmt: skip


if __name__ == "__main__":
    main()
