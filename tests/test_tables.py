"""Atomic table writes after a kill -9: the stale ``.NAME.tmp-PID`` files are cleaned at the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa

from workflow import tables
from workflow.contract import REJECTS

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys, time
    import pyarrow as pa
    from workflow.contract import REJECTS
    from workflow.tables import TableWriter
    with TableWriter(sys.argv[1], REJECTS) as w:
        w.write({"study_id": [1], "stage": ["x"], "reason": ["r"], "detail": [None]})
        print("writing", flush=True)
        time.sleep(600)
    """
)


def killed_writer(path: Path) -> int:
    """A process killed (SIGKILL) in the middle of writing ``path``; returns its pid."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return proc.pid


def test_a_killed_writers_temporary_is_removed_when_the_stage_starts_again(tmp_path):
    out = tmp_path / "ingest"
    pid = killed_writer(out / "rejects.parquet")
    stale = out / f".rejects.parquet.tmp-{pid}"
    assert stale.exists() and not (out / "rejects.parquet").exists()
    # A temporary of a process that still runs, and files that are not ours, stay.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        running = out / f".studies.parquet.tmp-{live.pid}"
        running.write_bytes(b"in progress")
        (out / "notes.tmp").write_text("x")
        (out / ".cache.tmp").write_text("x")
        tables._cleaned.discard(out.resolve())  # a new stage process has cleaned nothing yet
        tables.write_table(
            pa.table({"study_id": [2], "stage": ["x"], "reason": ["r"], "detail": ["d"]}),
            out / "rejects.parquet",
            REJECTS,
        )
        assert not stale.exists()
        assert running.exists() and (out / "notes.tmp").exists() and (out / ".cache.tmp").exists()
        assert tables.read_table(out / "rejects.parquet")["study_id"].to_pylist() == [2]
    finally:
        live.kill()
        live.wait()
    assert tables.clean_stale_temporaries(out) == [running]


def _chunks(table: pa.Table) -> list[list[int]]:
    return [[len(chunk) for chunk in column.chunks] for column in table.columns]


def test_read_table_is_pyarrows_read_table_chunk_for_chunk(tmp_path):
    """Same values, schema (metadata included) and chunks as ``pq.read_table``: the stages compute from and
    write what they read, and a Parquet file's bytes depend on the chunks it is written from."""
    import pyarrow.parquet as pq

    n = 300_000  # a row group of more than the scanner's 2**17-row batches, and smaller ones
    table = pa.table(
        {"study_id": pa.array(range(n), pa.int64()), "text": [f"report {i % 977}" for i in range(n)]}
    )
    table = table.replace_schema_metadata({b"note": b"kept"})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=200_000)
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pq.ParquetWriter(tmp_path / "no_row_groups.parquet", table.schema):
        pass
    for name in ("t", "empty", "no_row_groups"):
        for columns in (None, ["text"], ["text", "study_id"]):
            want = pq.read_table(tmp_path / f"{name}.parquet", columns=columns)
            got = tables.read_table(tmp_path / f"{name}.parquet", columns)
            assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True), (name, columns)
            assert _chunks(got) == _chunks(want), (name, columns)
