"""The ``rules`` keyinfo backend over a whole ``sections`` table -> ``findings`` (+ stats, rejects).

    python -m workflow.keyinfo.run_rules --sections results/sections/sections.parquet \\
        --findings results/keyinfo/rules/findings.parquet --stats results/keyinfo/rules/stats.parquet \\
        --rejects results/keyinfo/rules/rejects.parquet

Streams the sections table batch by batch; with ``--workers`` > 1 batches are extracted on a process pool
while the parent writes in order. A study with no findings / impression / last-paragraph text is rejected
(``no_report_text``); every other study is an output, also when it mentions no finding at all.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow.cli import parser as cli_parser
from workflow.cli import setup_logging
from workflow.contract import FINDINGS, KEYINFO_STATS
from workflow.keyinfo.extract import FALLBACK_SECTION, READ_SECTIONS, extract_sections
from workflow.tables import Rejects, TableWriter, summary, write_table

log = logging.getLogger(__name__)
STAGE = "keyinfo_rules"
COLUMNS = ("subject_id", "study_id", *READ_SECTIONS, FALLBACK_SECTION)


def findings_rows_to_table(rows: list[dict]) -> pa.Table:
    """A FINDINGS table from row dicts; columns a row does not carry are null."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in FINDINGS}
    return pa.Table.from_pydict(cols, schema=FINDINGS)


def extract_batch(batch: dict[str, list]) -> tuple[list[dict], list[int], int]:
    """(findings rows, study ids without any text, studies) of one column-wise batch of the sections table."""
    rows: list[dict] = []
    empty: list[int] = []
    n = len(batch["study_id"])
    for k in range(n):
        sections = {name: batch[name][k] for name in (*READ_SECTIONS, FALLBACK_SECTION)}
        if not any((sections[s] or "").strip() for s in sections):
            empty.append(batch["study_id"][k])
            continue
        for r in extract_sections(sections):
            r["subject_id"] = batch["subject_id"][k]
            r["study_id"] = batch["study_id"][k]
            r["source"] = "rules"
            r["evidence"] = r["raw_name"]
            rows.append(r)
    return rows, empty, n


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


def _batches(path: Path, batch_size: int):
    pf = pq.ParquetFile(path)
    present = [c for c in COLUMNS if c in pf.schema_arrow.names]
    for rb in pf.iter_batches(batch_size=batch_size, columns=present):
        d = rb.to_pydict()
        for c in COLUMNS:
            d.setdefault(c, [None] * rb.num_rows)
        yield d


def run(sections: Path, findings: Path, stats: Path, rejects: Path, batch_size: int = 8192, workers: int = 1):
    counts: Counter = Counter()
    studies_of: dict[str, set] = {}
    rej = Rejects(STAGE)
    total = pq.ParquetFile(sections).metadata.num_rows
    with TableWriter(findings, FINDINGS) as writer, tqdm(total=total, unit="study", desc=STAGE) as bar:
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        try:
            batches = list(_batches(sections, batch_size)) if pool else _batches(sections, batch_size)
            results = pool.map(extract_batch, batches) if pool else map(extract_batch, batches)
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
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not args.sections.exists():
        p.error(f"--sections: {args.sections} does not exist")
    run(args.sections, args.findings, args.stats, args.rejects, args.batch_size, args.workers)


if __name__ == "__main__":
    main()
