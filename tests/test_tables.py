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


# sizes around the direct writer's block: empty, less than a file system block, whole blocks, a block and a
# byte, several blocks and a tail
DIRECT_SIZES = [0, 1, 4095, 4096, tables.DIRECT_BLOCK - 1, tables.DIRECT_BLOCK, tables.DIRECT_BLOCK + 1]


def _written(path: Path, data: bytes, pieces: int) -> bytes:
    step = max(1, len(data) // pieces)
    with tables.open_output(path) as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
    return path.read_bytes()


def test_outputs_written_past_the_page_cache_hold_exactly_the_bytes_written(tmp_path):
    """Every size (whole direct blocks, the tail written without O_DIRECT), in one write or in many small
    ones, and where the platform has no O_DIRECT: the file holds what was written, byte for byte."""
    data = os.urandom(3 * tables.DIRECT_BLOCK + 17)
    for size in [*DIRECT_SIZES, len(data)]:
        for pieces in (1, 7, 1000):
            assert _written(tmp_path / "out.bin", data[:size], pieces) == data[:size], (size, pieces)


def test_without_o_direct_outputs_are_plain_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "_O_DIRECT", 0)
    data = os.urandom(2 * tables.DIRECT_BLOCK + 5)
    with tables.open_output(tmp_path / "plain.bin") as fh:
        assert not fh.raw.direct
        fh.write(data)
    assert (tmp_path / "plain.bin").read_bytes() == data


def test_a_file_system_refusing_direct_writes_gets_a_plain_file(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the first write (EINVAL): the writer goes on
    without it and loses nothing (no such file system here, so the refusal is simulated)."""
    import errno
    import fcntl

    real_write, refused = os.write, []

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(tables.os, "write", refusing_write)
    data = os.urandom(2 * tables.DIRECT_BLOCK + 5)
    with tables.open_output(tmp_path / "refused.bin") as fh:
        opened_direct = fh.raw.direct
        fh.write(data)
        still_direct = fh.raw.direct
    monkeypatch.undo()
    assert (tmp_path / "refused.bin").read_bytes() == data
    if opened_direct:  # (where the test's folder takes O_DIRECT at open)
        assert refused == [tables.DIRECT_BLOCK] and not still_direct


def test_atomic_outputs_appear_only_when_complete(tmp_path):
    """Text and Parquet through ``atomic_output``: the final name holds the whole file; an error in the
    block leaves neither the file nor a temporary."""
    import json

    import pyarrow.parquet as pq

    tables.write_json({"text": "é → 1 cm", "n": list(range(200_000))}, tmp_path / "doc.json")
    assert json.loads((tmp_path / "doc.json").read_text(encoding="utf-8"))["text"] == "é → 1 cm"
    table = pa.table({"study_id": list(range(300_000)), "stage": ["s"] * 300_000})
    with tables.atomic_output(tmp_path / "t.parquet") as fh:
        pq.write_table(table, fh)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    try:
        with tables.atomic_output(tmp_path / "broken.bin") as fh:
            fh.write(os.urandom(tables.DIRECT_BLOCK + 1))
            raise RuntimeError("the stage fails half way")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json", "t.parquet"]


def test_jobs_run_with_arrow_committing_memory_on_first_use():
    """A job's process (``python -m workflow...``) gets mimalloc's arena commit on first use
    (``workflow/__init__.py``, before pyarrow loads): with eager commit, reading an rg4 shard's inputs cost
    up to 3.9 s of system time in huge-page faults. A value the user exported wins."""
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ARENA_EAGER_COMMIT"}
    env["MIMALLOC_VERBOSE"] = "1"  # mimalloc prints its options when it starts
    job = "import workflow.tables, pyarrow as pa; pa.allocate_buffer(1 << 20)"
    for exported, expected in ((None, "0"), ("1", "1")):
        if exported is not None:
            env["MIMALLOC_ARENA_EAGER_COMMIT"] = exported
        run = subprocess.run([sys.executable, "-c", job], env=env, cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert f"option 'arena_eager_commit': {expected}" in run.stderr, run.stderr[-2000:]
