"""The ``rules`` keyinfo backend over a whole ``sections`` table -> ``findings`` (+ stats, rejects).

    python -m workflow.keyinfo.run_rules --sections results/sections/sections.parquet \\
        --findings results/keyinfo/rules/findings.parquet --stats results/keyinfo/rules/stats.parquet \\
        --rejects results/keyinfo/rules/rejects.parquet

Streams the sections table batch by batch; with ``--workers`` > 1 batches are extracted on a process pool
while the parent writes in order. A study with no findings / impression / last-paragraph text is rejected
(``no_report_text``); every other study is an output, also when it mentions no finding at all.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow.cli import parser as cli_parser
from workflow.cli import setup_logging
from workflow.contract import FINDINGS, KEYINFO_STATS
from workflow.keyinfo.extract import Conventions, extract_sections
from workflow.keyinfo.studies import TEXT_COLUMNS, section_batches
from workflow.tables import Rejects, TableWriter, summary, write_table

log = logging.getLogger(__name__)
STAGE = "keyinfo_rules"


def findings_rows_to_table(rows: list[dict]) -> pa.Table:
    """A FINDINGS table from row dicts; columns a row does not carry are null."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in FINDINGS}
    return pa.Table.from_pydict(cols, schema=FINDINGS)


def extract_batch(
    batch: tuple[list[int], list[int], list[dict]], conventions: Conventions | None = None
) -> tuple[list[dict], list[int], int]:
    """(findings rows, study ids without any text, studies) of one batch of (subject ids, study ids, sections)."""
    subjects, studies, sections_of = batch
    rows: list[dict] = []
    empty: list[int] = []
    for subject, study, sections in zip(subjects, studies, sections_of, strict=True):
        if not any((sections.get(s) or "").strip() for s in TEXT_COLUMNS):
            empty.append(study)
            continue
        for r in extract_sections(sections, conventions):
            r["subject_id"] = subject
            r["study_id"] = study
            r["source"] = "rules"
            rows.append(r)
    return rows, empty, len(studies)


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


def stats_table(counts: Counter, studies: dict[str, set]) -> pa.Table:
    names = sorted(studies)
    return pa.Table.from_pydict(
        {
            "name": names,
            "n_positive": [counts[(n, "positive")] for n in names],
            "n_uncertain": [counts[(n, "uncertain")] for n in names],
            "n_negative": [counts[(n, "negative")] for n in names],
            "n_studies": [len(studies[n]) for n in names],
        },
        schema=KEYINFO_STATS,
    )


def run(sections: Path, findings: Path, stats: Path, rejects: Path, batch_size: int = 8192, workers: int = 1,
        reports: Path | None = None, conventions: Conventions | None = None, lenient: bool = True):  # fmt: skip
    counts: Counter = Counter()
    studies_of: dict[str, set] = {}
    rej = Rejects(STAGE)
    total = pq.ParquetFile(sections).metadata.num_rows
    with TableWriter(findings, FINDINGS) as writer, tqdm(total=total, unit="study", desc=STAGE) as bar:
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            batches = section_batches(sections, reports, lenient, batch_size)
            work = functools.partial(extract_batch, conventions=conventions)
            results = _in_order(pool, work, batches, 2 * workers) if pool else map(work, batches)
            for rows, empty, n_batch in results:
                for sid in empty:
                    rej.add(sid, "no_report_text", "no findings, impression or last paragraph")
                for r in rows:
                    counts[(r["name"], r["presence"])] += 1
                    studies_of.setdefault(r["name"], set()).add(r["study_id"])
                writer.write(findings_rows_to_table(rows))
                bar.update(n_batch)
        finally:
            if pool:
                pool.shutdown()
    n_in = total
    write_table(stats_table(counts, studies_of), stats, KEYINFO_STATS)
    rej.write(rejects)
    summary(STAGE, n_in, n_in - len(rej), len(rej))
    log.info("%s: %d finding rows (%d names)", STAGE, writer.rows, len(studies_of))


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
    p.add_argument("--reports", type=Path, help="studies.parquet (report text, for the lenient section reading)")
    p.add_argument("--no-lenient", action="store_true", help="read MIT-LCP's sections only")
    p.add_argument("--alternatives", choices=("uncertain", "positive"), default="uncertain")
    p.add_argument("--hedges", choices=("uncertain", "positive"), default="uncertain")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not args.sections.exists():
        p.error(f"--sections: {args.sections} does not exist")
    run(args.sections, args.findings, args.stats, args.rejects, args.batch_size, args.workers, args.reports,
        Conventions(args.alternatives, args.hedges), not args.no_lenient)  # fmt: skip


if __name__ == "__main__":
    main()
