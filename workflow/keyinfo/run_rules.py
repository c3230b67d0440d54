"""The ``rules`` keyinfo backend over a whole ``sections`` table -> ``findings`` (+ stats, rejects).

    python -m workflow.keyinfo.run_rules --sections results/sections/sections.parquet \\
        --findings results/keyinfo/rules/findings.parquet --stats results/keyinfo/rules/stats.parquet \\
        --rejects results/keyinfo/rules/rejects.parquet --alternatives uncertain --hedges uncertain \\
        [--normal-statements ...] [--shard K --shards N]
    python -m workflow.keyinfo.run_rules merge --sections results/sections/sections.parquet \\
        --shard-findings shard0/findings.parquet shard1/findings.parquet --shard-stats ... \\
        --shard-rejects ... [--shard-normal-statements ...] --findings ... --stats ... --rejects ...

Streams the sections table batch by batch; with ``--workers`` > 1 batches are extracted on a process pool
while the parent writes in order. A study with no findings / impression / last-paragraph text is rejected
(``no_report_text``); every other study is an output, also when it mentions no finding at all.

``--shard K --shards N`` reads only the studies with ``study_id % N == K`` (config ``keyinfo.shards``: the
workflow runs N single-process shard jobs); ``merge`` puts the shards' tables back into the sections table's
order, one row group per batch of the unsharded run, so the merged files are the unsharded run's byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflow.cli import arrow_without_pandas, exit_leaving_objects, setup_logging
from workflow.cli import parser as cli_parser
from workflow.contract import FINDINGS, KEYINFO_STATS, REJECTS
from workflow.keyinfo.names import READ_SECTIONS
from workflow.keyinfo.studies import NORMAL_STATEMENTS, TEXT_COLUMNS
from workflow.tables import Rejects, TableWriter, summary, write_table

# The extractor (and the progress bar) are imported where the extraction runs: the merge job reads and
# writes tables only, and their imports (YAML, the extractor's patterns, tqdm) cost it ~60 ms
if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from workflow.keyinfo.extract import Conventions

log = logging.getLogger(__name__)
STAGE = "keyinfo_rules"


def rules_findings_table(values: list, subjects: list[int], studies: list[int]) -> pa.Table:
    """The FINDINGS table of extractor rows given one after another in one flat list (each row's
    ROW_COLUMNS values, :func:`study_rows`) and their subject and study ids: each column is a slice of the
    list (no ids written into every row, no per-value Python lookups as in ``from_pylist``); the rule adds
    ids and source, the other columns stay null."""
    from workflow.keyinfo.extract import ROW_COLUMNS

    width = len(ROW_COLUMNS)
    columns: dict[str, list] = {name: values[k::width] for k, name in enumerate(ROW_COLUMNS)}
    n = len(studies)
    columns.update(subject_id=subjects, study_id=studies, source=["rules"] * n)
    arrays = [
        pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in FINDINGS
    ]
    return pa.Table.from_arrays(arrays, schema=FINDINGS)


class Extracted(NamedTuple):
    """What one batch of studies gives: findings rows, the normal statements of the studies read (None when
    not asked for), the ids of the studies without any text, and the number of studies."""

    findings: pa.Table
    statements: pa.Table | None
    empty: list[int]
    n_studies: int


def _has_text(sections: dict) -> bool:
    """Whether any text column holds more than white space (``str.strip`` and ``str.isspace`` agree on
    what white space is); a loop, not ``any`` over a generator: it runs once per study."""
    for name in TEXT_COLUMNS:
        text = sections.get(name)
        if text and not text.isspace():
            return True
    return False


def extract_batch(
    batch: tuple[list[int], list[int], list[dict]],
    conventions: Conventions | None = None,
    statements: bool = False,
) -> Extracted:
    """:class:`Extracted` of one batch of (subject ids, study ids, sections); with ``statements`` also each
    read study's normal statement (keyinfo_studies' text half: the same for either backend)."""
    from workflow.keyinfo.extract import study_rows

    subjects, studies, sections_of = batch
    # the rows' values in one flat list: a study's row lists die with it, so the collector never walks
    # the batch's rows one by one (it did, ~5 % of the stage's CPU)
    values: list = []
    row_subjects: list[int] = []
    row_studies: list[int] = []
    empty: list[int] = []
    read: dict[str, list] = {"subject_id": [], "study_id": [], "normal_evidence": []}
    for subject, study, sections in zip(subjects, studies, sections_of, strict=True):
        if not _has_text(sections):
            empty.append(study)
            continue
        found, statement = study_rows(sections, conventions)
        values.extend(chain.from_iterable(found))
        row_subjects += [subject] * len(found)
        row_studies += [study] * len(found)
        if statements:
            read["subject_id"].append(subject)
            read["study_id"].append(study)
            read["normal_evidence"].append(statement)
    table = rules_findings_table(values, row_subjects, row_studies)
    said = pa.Table.from_pydict(read, schema=NORMAL_STATEMENTS) if statements else None
    return Extracted(table, said, empty, len(studies))


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of shard ``shard`` of ``shards`` of the sections table (the studies with
    ``study_id % shards == shard``), read by the process that extracts them (the parent never decodes or
    ships report text); ``lenient`` holds the report text of the few studies in the slice that the lenient
    section reading needs."""

    path: str
    start: int
    stop: int
    lenient: dict[int, str]
    shard: int = 0
    shards: int = 1


def in_shard(study_ids: pa.Array | pa.ChunkedArray, shard: int, shards: int) -> pa.Array:
    """The mask of the study ids shard ``shard`` of ``shards`` reads: ``study_id % shards == shard``."""
    return pa.array(study_ids.to_numpy() % shards == shard)


_TABLES: dict[tuple, pa.Table] = {}  # per process: the shard's rows of the sections table, read once


def _sections_table(path: str, shard: int = 0, shards: int = 1) -> pa.Table:
    """The text columns of the shard's rows, filtered batch by batch as they are read (the other shards'
    text never all sits in memory)."""
    key = (path, shard, shards)
    if key not in _TABLES:
        pf = pq.ParquetFile(path)
        cols = [c for c in ("subject_id", "study_id", *TEXT_COLUMNS) if c in pf.schema_arrow.names]
        _TABLES.clear()
        if shards == 1:
            _TABLES[key] = pf.read(columns=cols)
        else:
            batches = (
                b.filter(in_shard(b["study_id"], shard, shards)) for b in pf.iter_batches(columns=cols)
            )
            schema = pa.schema([pf.schema_arrow.field(c) for c in cols])
            _TABLES[key] = pa.Table.from_batches(batches, schema=schema)
    return _TABLES[key]


def extract_slice(part: Slice, conventions: Conventions | None = None, statements: bool = False) -> Extracted:
    """:func:`extract_batch` of one slice of the sections table."""
    from workflow.keyinfo.extract import sections_for_reading

    d = (
        _sections_table(part.path, part.shard, part.shards)
        .slice(part.start, part.stop - part.start)
        .to_pydict()
    )
    n = part.stop - part.start
    cols = {name: d.get(name, [None] * n) for name in TEXT_COLUMNS}
    rows = []
    for k, sid in enumerate(d["study_id"]):
        strict = {name: cols[name][k] for name in TEXT_COLUMNS}
        text = part.lenient.get(sid)
        rows.append(sections_for_reading(strict, text) if text is not None else strict)
    return extract_batch((d["subject_id"], d["study_id"], rows), conventions, statements)


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


def stats_table(findings: pa.Table) -> pa.Table:
    """Per finding name of a findings table: rows by presence and studies (vectorised group-bys)."""
    # single-threaded: the threaded hash grouping costs twice the CPU; its group order is sorted away
    by_presence = findings.group_by(["name", "presence"], use_threads=False).aggregate([([], "count_all")])
    studies = findings.group_by("name", use_threads=False).aggregate([("study_id", "count_distinct")])
    by_presence, studies = by_presence.to_pylist(), studies.to_pylist()
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


def summed_stats(parts: Sequence[pa.Table]) -> pa.Table:
    """The KEYINFO_STATS of tables whose studies are disjoint (batches, shards) from theirs: every count,
    studies included, is the sum of the parts' counts."""
    counts = [f.name for f in KEYINFO_STATS if f.name != "name"]
    t = pa.concat_tables(parts) if parts else KEYINFO_STATS.empty_table()
    t = t.group_by("name", use_threads=False).aggregate([(c, "sum") for c in counts]).sort_by("name")
    return pa.table([t["name"], *(t[f"{c}_sum"] for c in counts)], schema=KEYINFO_STATS)


def lenient_reports(shard: pa.Table, reports: Path | None) -> dict[int, str]:
    """study_id -> report text of the shard's studies whose findings and impression are both missing or
    empty: the only ones :func:`sections_for_reading` reads the report of (a section of white space only
    is read as it is). Found in the shard's own table (not in every shard's sections read again) and read
    from studies.parquet's row groups that hold any (no ``pyarrow.dataset`` scan)."""
    if reports is None:
        return {}
    silent = pa.array([True] * shard.num_rows)
    for name in READ_SECTIONS:
        if name in shard.column_names:
            blank = pc.fill_null(pc.equal(pc.binary_length(shard[name]), 0), True)
            silent = pc.and_(silent, blank)
    wanted = shard["study_id"].filter(silent).combine_chunks()
    texts: dict[int, str] = {}
    if not len(wanted):
        return texts
    source = pq.ParquetFile(reports)
    for group in range(source.num_row_groups):
        ids = source.read_row_group(group, columns=["study_id"])["study_id"]
        mask = pc.is_in(ids, value_set=wanted)
        if pc.any(mask).as_py():
            report = source.read_row_group(group, columns=["report"])["report"].filter(mask)
            texts.update(zip(ids.filter(mask).to_pylist(), report.to_pylist(), strict=True))
    return texts


def plan_slices(sections: Path, reports: Path | None, lenient: bool, batch_size: int, shard: int = 0,
                shards: int = 1) -> list[Slice]:  # fmt: skip
    # the shard's table, read here once: the extraction reuses it (in this process; forked pool workers
    # inherit it)
    table = _sections_table(str(sections), shard, shards)
    texts = lenient_reports(table, reports) if lenient else {}
    ids_list = table["study_id"].to_pylist() if texts else []
    out = []
    for start in range(0, table.num_rows, batch_size):
        stop = min(start + batch_size, table.num_rows)
        part = {sid: texts[sid] for sid in ids_list[start:stop] if sid in texts} if texts else {}
        out.append(Slice(str(sections), start, stop, part, shard, shards))
    return out


# The extraction allocates millions of short-lived objects without reference cycles (row lists, mentions,
# tuples: a full collection after a whole shard at 227,835 studies finds 6 unreachable objects): at the
# default threshold (a collection per 700 allocations) the collector cost ~7 % of the stage's CPU and found
# no garbage. What still set collections off is the sentence cache's growth: at 100,000, 3 young-generation
# collections per shard walked ~0.1 s. Raised while the stage runs (workers set it when they start).
GC_THRESHOLD = (1_000_000, 50, 1000)


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
    # imported here: the workflow's shard jobs run one process each, and its import costs ~15 ms
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, initializer=gc.set_threshold, initargs=GC_THRESHOLD)


def run(sections: Path, findings: Path, stats: Path, rejects: Path, batch_size: int = 8192, workers: int = 1,
        reports: Path | None = None, conventions: Conventions | None = None, lenient: bool = True,
        normal_statements: Path | None = None, shard: int = 0, shards: int = 1):  # fmt: skip
    """Extract shard ``shard`` of ``shards`` (all studies by default) into findings, stats and rejects, and
    with ``normal_statements`` the normal statement of every study read (NORMAL_STATEMENTS)."""
    from tqdm import tqdm

    from workflow.keyinfo.extract import forget_sentences

    rej = Rejects(STAGE)
    batch_stats: list[pa.Table] = []
    slices = plan_slices(sections, reports, lenient, batch_size, shard, shards)
    n_in = slices[-1].stop if slices else 0
    with (
        rare_collections(),
        TableWriter(findings, FINDINGS) as writer,
        TableWriter(normal_statements, NORMAL_STATEMENTS)
        if normal_statements
        else contextlib.nullcontext() as said,
        tqdm(total=n_in, unit="study", desc=STAGE) as bar,
    ):
        pool = extraction_pool(workers)
        try:
            work = functools.partial(extract_slice, conventions=conventions, statements=said is not None)
            results = _in_order(pool, work, slices, 2 * workers) if pool else map(work, slices)
            for part in results:
                for sid in part.empty:
                    rej.add(sid, "no_report_text", "no findings, impression or last paragraph")
                writer.write(part.findings)
                batch_stats.append(stats_table(part.findings))  # a study's rows are all in one batch
                if said is not None:
                    said.write(part.statements)
                bar.update(part.n_studies)
        finally:
            if pool:
                pool.shutdown()
            # freed by reference counting while the collector is still at GC_THRESHOLD: restored with
            # the cache alive, the collector walked all its tuples in a full collection (~0.1 s per shard)
            forget_sentences()
    table = summed_stats(batch_stats)
    write_table(table, stats, KEYINFO_STATS)
    rej.write(rejects)
    summary(STAGE if shards == 1 else f"{STAGE} shard {shard} of {shards}", n_in, n_in - len(rej), len(rej))
    log.info("%s: %d finding rows (%d names)", STAGE, writer.rows, table.num_rows)


class _ShardRows:
    """One shard's table, read forward in pieces: the rows of each sections batch are the next ones."""

    def __init__(self, path: Path):
        pf = pq.ParquetFile(path)
        self.path = path
        self.schema = pf.schema_arrow
        self._batches = pf.iter_batches(batch_size=65536)
        self._buffer = self.schema.empty_table()

    def take(self, study_ids: pa.Array) -> list[pa.Table]:
        """The leading rows whose study is one of ``study_ids`` (the shard's studies of one sections batch):
        a shard writes its studies in the sections table's order, each study's rows together."""
        parts = []
        while True:
            if not self._buffer.num_rows:
                batch = next(self._batches, None)
                if batch is None:
                    return parts
                self._buffer = pa.Table.from_batches([batch])
            n = pc.index(pc.is_in(self._buffer["study_id"], value_set=study_ids), False).as_py()
            n = self._buffer.num_rows if n < 0 else n
            parts.append(self._buffer.slice(0, n))
            self._buffer = self._buffer.slice(n)
            if self._buffer.num_rows:
                return parts

    def done(self) -> bool:
        return not self._buffer.num_rows and next(self._batches, None) is None


def sections_batches(sections: Path, batch_size: int) -> list[pa.Array]:
    """The study ids of the sections table in the batches an unsharded run extracts (and writes)."""
    ids = pq.read_table(sections, columns=["study_id"])["study_id"].combine_chunks()
    return [ids.slice(start, batch_size) for start in range(0, len(ids), batch_size)]


def in_sections_order(batches: Sequence[pa.Array], shard_tables: Sequence[Path]) -> Iterator[pa.Table]:
    """Per sections batch, the rows of the shard tables (shard k of N: the studies with study_id % N == k,
    in the sections table's order) that belong to it, in the sections table's order; streams (one batch of
    each shard in memory)."""
    readers = [_ShardRows(p) for p in shard_tables]
    n = len(readers)
    for ids in batches:
        shard_of = ids.to_numpy() % n
        parts = [p for k, r in enumerate(readers) for p in r.take(ids.filter(pa.array(shard_of == k)))]
        rows = pa.concat_tables(parts) if parts else readers[0].schema.empty_table()
        if n > 1:  # a stable sort by the study's place in the batch: each study's rows keep their order
            rows = rows.take(pc.sort_indices(pc.index_in(rows["study_id"], value_set=ids)))
        yield rows
    for k, reader in enumerate(readers):
        if not reader.done():
            raise ValueError(
                f"{reader.path}: rows of studies that are not shard {k} of {n} of the sections table (or not"
                " in its order)"
            )


def merge(sections: Path, shard_findings: Sequence[Path], shard_stats: Sequence[Path],
          shard_rejects: Sequence[Path], findings: Path, stats: Path, rejects: Path,
          shard_statements: Sequence[Path] = (), normal_statements: Path | None = None,
          batch_size: int = 8192) -> None:  # fmt: skip
    """The tables of an unsharded run from those of its shards (in shard order: shard k at index k)."""
    batches = sections_batches(sections, batch_size)
    with TableWriter(findings, FINDINGS) as writer:
        for rows in in_sections_order(batches, shard_findings):
            writer.write(rows)
    if normal_statements:
        with TableWriter(normal_statements, NORMAL_STATEMENTS) as said:
            for rows in in_sections_order(batches, shard_statements):
                said.write(rows)
    rejected = pa.concat_tables(in_sections_order(batches, shard_rejects)).combine_chunks()
    write_table(rejected, rejects, REJECTS)
    table = summed_stats([pq.read_table(p) for p in shard_stats])
    write_table(table, stats, KEYINFO_STATS)
    n_in = sum(len(b) for b in batches)
    summary(STAGE, n_in, n_in - rejected.num_rows, rejected.num_rows)
    log.info("%s: %d finding rows (%d names) from %d shards", STAGE, writer.rows, table.num_rows,
             len(shard_findings))  # fmt: skip


def merge_main(argv: list[str]) -> None:
    p = cli_parser("Merge the rules backend's shards into the tables of an unsharded run.")
    p.add_argument("--sections", required=True, type=Path, help="sections.parquet (its order is restored)")
    for name in ("findings", "stats", "rejects", "normal-statements"):
        p.add_argument(f"--shard-{name}", nargs="+", type=Path, required=name != "normal-statements",
                       default=[], help=f"the shards' {name} tables, shard 0 first")  # fmt: skip
        p.add_argument(f"--{name}", type=Path, required=name != "normal-statements", help=f"output {name}")
    p.add_argument("--batch-size", type=int, default=8192, help="the shards' --batch-size")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    lengths = {len(args.shard_findings), len(args.shard_stats), len(args.shard_rejects)}
    if args.normal_statements:
        lengths.add(len(args.shard_normal_statements))
    if len(lengths) != 1:
        p.error("give every --shard-* table of every shard")
    merge(args.sections, args.shard_findings, args.shard_stats, args.shard_rejects, args.findings, args.stats,
          args.rejects, args.shard_normal_statements, args.normal_statements, args.batch_size)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
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
    p.add_argument(
        "--normal-statements",
        type=Path,
        help="output: the normal statement of every study read (keyinfo_studies)",
    )
    p.add_argument("--shard", type=int, default=0, help="read the studies with study_id %% shards == shard")
    p.add_argument("--shards", type=int, default=1)
    # keyinfo.alternatives / hedges: the rule passes them, config.yaml holds their defaults
    p.add_argument("--alternatives", choices=("uncertain", "positive"), required=True)
    p.add_argument("--hedges", choices=("uncertain", "positive"), required=True)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from workflow.keyinfo.extract import Conventions

    if not args.sections.exists():
        p.error(f"--sections: {args.sections} does not exist")
    if not 0 <= args.shard < args.shards:
        p.error(f"--shard {args.shard} is not one of the {args.shards} shards")
    run(args.sections, args.findings, args.stats, args.rejects, args.batch_size, args.workers, args.reports,
        Conventions(args.alternatives, args.hedges), not args.no_lenient, args.normal_statements, args.shard,
        args.shards)  # fmt: skip


if __name__ == "__main__":
    arrow_without_pandas()
    main()
    exit_leaving_objects()
