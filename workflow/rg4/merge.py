"""The rg4 rule with ``rg4.shards``: the shards' outputs (:class:`workflow.rg4.build.ShardPaths`) → the
stage's outputs, in the order an unsharded build writes them.

A shard holds whole patients (``subject_id % shards``), so its tables are consistent on their own and the
merge only interleaves: the scenario tables' rows by their position (the row label of the study in the
studies table), the loader's JSON records by (split, position) as bytes — the shards wrote each record as
``json.dumps`` does, one per line, so no record is parsed — and the rejects by their sort key. Counts and
rewrite statistics are summed (shares recomputed from the sums); the nesting of the whole corpus is checked
again before anything is written. Memory: one scenario table at a time (column by column), the JSON files
line by line.

The tables (with counts, stats, rejects, notes and the llm requests) and the loader's JSON files are two
jobs, the rules ``rg4`` and ``rg4_loader``: the release and the report wait on the tables only, so the JSON
merge (a third of the work) runs beside them instead of before them.

    python -m workflow.rg4.merge --shard-dirs DIR... --tables ... --counts ... (the rule rg4's outputs)
    python -m workflow.rg4.merge --shard-dirs DIR... --json ...                (the rule rg4_loader's)
"""

from __future__ import annotations

import heapq
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workflow.cli import arrow_without_pandas, exit_leaving_objects, setup_logging
from workflow.cli import parser as cli_parser
from workflow.contract import (
    LLM_REQUESTS,
    REJECTS,
    RG4_COUNTS,
    RG4_RECORDS,
    RG4_REWRITE_STATS,
    RG4_SCENARIOS,
    RG4_SPLITS,
)
from workflow.rg4.build import (
    FRAGMENT_COMPRESSION,
    POSITION,
    REJECT_ORDER,
    STAGE,
    ConsistencyError,
    OutputPaths,
    ShardPaths,
    add_output_args,
    build_notes,
    log_figures,
    output_paths,
    rewrite_stats_table,
)
from workflow.rg4.scenarios import nesting_problems
from workflow.rg4.scores import note as scores_note
from workflow.tables import atomic_output, read_table, summary, write_json, write_table

log = logging.getLogger(__name__)


def merge_table(parts: list[Path], path: Path) -> None:
    """The shards' rows of one scenario table in position order, built one column at a time (a column of
    every shard plus the merged columns so far are all that is in memory)."""
    files = [pq.ParquetFile(p) for p in parts]
    positions = np.concatenate([f.read(columns=[POSITION]).column(0).to_numpy() for f in files])
    order = None if np.all(positions[1:] > positions[:-1]) else pa.array(np.argsort(positions, kind="stable"))
    columns = []
    for field in RG4_RECORDS:
        chunks = [chunk for f in files for chunk in f.read(columns=[field.name]).column(0).chunks]
        # one chunk per column, as the unsharded writer's table; combined before the take, which costs
        # half as much on one array as on the shards' chunks
        column = pa.chunked_array(chunks, type=field.type).combine_chunks()
        columns.append(column if order is None else column.take(order))
        del chunks, column
    write_table(pa.Table.from_arrays(columns, schema=RG4_RECORDS), path, RG4_RECORDS)


def _fragment_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    with pa.CompressedInputStream(pa.OSFile(str(path)), FRAGMENT_COMPRESSION) as raw:
        for line in io.BufferedReader(raw, 1 << 20):
            split, position, record = line.split(b"\t", 2)
            yield int(split), int(position), record[:-1]


def merge_loader_json(parts: list[Path], path: Path) -> int:
    """The loader's ``{"train": [...], "val": [...], "test": [...]}`` from the shards' lines (see
    :func:`workflow.rg4.build.write_loader_fragment`), byte for byte as ``json.dumps`` writes the whole
    document; returns the records written."""
    n = 0
    with atomic_output(path) as out:
        out.write(b"{")
        current, first = -1, True

        def open_splits_until(split: int) -> None:
            nonlocal current, first
            while current < split:
                if current >= 0:
                    out.write(b"]")
                current += 1
                out.write(f"{', ' if current else ''}{json.dumps(RG4_SPLITS[current])}: [".encode())
                first = True

        for split, _, record in heapq.merge(*map(_fragment_lines, parts)):
            open_splits_until(split)
            out.write(record if first else b", " + record)
            first = False
            n += 1
        open_splits_until(len(RG4_SPLITS) - 1)
        out.write(b"]}")
    return n


def _summed_counts(tables: list[pa.Table]) -> pa.Table:
    keys = [(t.column("scenario").to_pylist(), t.column("split").to_pylist()) for t in tables]
    if any(k != keys[0] for k in keys):
        raise ValueError("rg4 shards: counts tables of different scenario × split rows")
    data = {"scenario": keys[0][0], "split": keys[0][1]}
    for name in ("records", "rejected"):
        data[name] = np.sum([t.column(name).to_numpy() for t in tables], axis=0).tolist()
    return pa.Table.from_pydict(data, schema=RG4_COUNTS)


def _summed_stats(tables: list[pa.Table]) -> pa.Table:
    keys = [(t.column("scenario").to_pylist(), t.column("category").to_pylist()) for t in tables]
    if any(k != keys[0] for k in keys):
        raise ValueError("rg4 shards: rewrite stats of different scenario × category rows")
    sums = {
        name: np.sum([t.column(name).to_numpy() for t in tables], axis=0).tolist()
        for name in ("sentences", "removed", "rephrased")
    }
    return rewrite_stats_table(
        zip(*keys[0], sums["sentences"], sums["removed"], sums["rephrased"], strict=True)
    )


def _same(facts: list[dict], key: str):
    values = {json.dumps(f[key], sort_keys=True) for f in facts}
    if len(values) > 1:
        raise ValueError(f"rg4 shards made with different {key}: {sorted(values)}")
    return facts[0][key]


def merge_loader_files(shards: list[ShardPaths], json_paths: dict[str, Path]) -> int:
    """The loader's JSON file of each scenario from ``shards``; returns the records written."""
    return sum(
        merge_loader_json([s.json[scenario] for s in shards], json_paths[scenario])
        for scenario in RG4_SCENARIOS
    )


def merge(shards: list[ShardPaths], paths: OutputPaths) -> list[str]:
    """Write the stage's outputs from ``shards`` (in any order; the loader's JSON files when ``paths`` names
    them); returns the build notes written."""
    facts = [json.loads(s.facts.read_text()) for s in shards]
    label_sections, rewriter, scorer = (_same(facts, k) for k in ("label_sections", "rewriter", "scorer"))
    # the nesting of the whole corpus (each shard checked its own before writing)
    ids = {
        s: set().union(*(read_table(shard.tables[s], ["study_id"]).column(0).to_pylist() for shard in shards))
        for s in RG4_SCENARIOS
    }
    problems = nesting_problems(ids)
    if problems:
        raise ConsistencyError("the merged rg4 scenario tables are not nested: " + "; ".join(problems))
    out_ids = set().union(*ids.values())
    del ids

    for scenario in RG4_SCENARIOS:
        merge_table([s.tables[scenario] for s in shards], paths.tables[scenario])
    if paths.json:
        merge_loader_files(shards, paths.json)
    counts = _summed_counts([read_table(s.counts) for s in shards])
    stats = _summed_stats([read_table(s.stats) for s in shards])
    write_table(counts, paths.counts, RG4_COUNTS)
    write_table(stats, paths.stats, RG4_REWRITE_STATS)
    rejects = pa.concat_tables([read_table(s.rejects) for s in shards])
    rejects = rejects.take(pa.array(np.argsort(rejects.column(REJECT_ORDER).to_numpy(), kind="stable")))
    write_table(rejects.select(REJECTS.names), paths.rejects, REJECTS)
    if paths.llm_requests is not None:  # in shard order (each shard's in the order it asked)
        requests = pa.concat_tables([read_table(s.llm_requests) for s in shards])
        write_table(requests, paths.llm_requests, LLM_REQUESTS)

    reasons = rejects.column("reason").to_pylist()
    notes = build_notes(reasons, label_sections, rewriter)
    # the scores note names the tokenizer and the record length: what the shards' scorer carried
    weights = scores_note(
        None if scorer is None else SimpleNamespace(**scorer),
        sum(f["emphasised"] for f in facts),
        sum(f["positions"] for f in facts),
    )
    notes.append(weights)
    write_json(notes, paths.notes)
    for line in notes:
        log.info("%s", line)
    log_figures(counts, stats)
    rejected = {sid for sid in rejects.column("study_id").to_pylist() if sid not in out_ids}
    summary(STAGE, sum(f["n_studies"] for f in facts), len(out_ids), len(rejected))
    return notes


# the outputs that come together (the rule rg4's); --json alone is the rule rg4_loader
_TABLE_OUTPUTS = ("tables", "counts", "stats", "rejects", "notes")


def main(argv: list[str] | None = None) -> list[str]:
    p = cli_parser(
        "merge the rg4 shards into the stage's outputs (the tables, the loader's JSON files, or both)"
    )
    p.add_argument("--shard-dirs", nargs="+", type=Path, required=True, help="the shards' folders")
    add_output_args(p, required=False)
    p.add_argument("--llm-requests", type=Path, help="llm_requests.parquet (empty with the rules rewriter)")
    args = p.parse_args(argv)
    given = [name for name in _TABLE_OUTPUTS if getattr(args, name) is not None]
    if given and len(given) < len(_TABLE_OUTPUTS):
        p.error(
            "--"
            + " --".join(_TABLE_OUTPUTS)
            + " go together; missing: --"
            + " --".join(sorted(set(_TABLE_OUTPUTS) - set(given)))
        )
    if not given and args.json is None:
        p.error(
            "nothing to write: give the tables' outputs (--tables ...), the loader's files (--json), or both"
        )
    setup_logging(args.verbose)
    shards = [ShardPaths(d) for d in args.shard_dirs]
    if not given:
        n = merge_loader_files(shards, dict(zip(RG4_SCENARIOS, args.json, strict=True)))
        log.info("rg4 loader files: %d records", n)
        return []
    return merge(shards, output_paths(args))


if __name__ == "__main__":
    arrow_without_pandas()
    main()
    exit_leaving_objects()
