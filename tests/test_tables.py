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
