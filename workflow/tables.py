"""Atomic Parquet I/O for the contract's tables.

A table appears at its final path only when it is complete (temp file in the same directory, then
``os.replace``), so a crash never leaves a half-written file that Snakemake would take as done.

A kill -9 can still leave the temp file (``.NAME.tmp-PID``) behind. The first write into a folder by a
process removes the temporaries there whose process is gone, so a stage starts clean after a kill; a
temporary of a process still running on this machine is left alone.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow.contract import LLM_REQUESTS, REJECTS

log = logging.getLogger(__name__)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")
_cleaned: set[Path] = set()  # folders this process has already cleaned


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-PID`` files in ``folder`` whose process no longer runs; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match and not _alive(int(match.group(1))) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    if removed:
        log.info("removed %d stale temporary file(s) of killed runs in %s", len(removed), folder)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = final.parent.resolve()
    if folder not in _cleaned:
        clean_stale_temporaries(folder)
        _cleaned.add(folder)
    tmp = _tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


# Output files are written past the page cache (O_DIRECT) where the file system allows it. On this kind of
# VM, each megabyte written into new page cache costs ~10 ms of system time (the guest's free memory is
# handed back to the host, and copying into it faults it in again), against ~0.1 ms written directly and
# ~2 ms when a later job reads it back from disk; the DAG writes ~2.7 GB at 227k studies (bench/RESULTS.md).
DIRECT_BLOCK = 4 << 20  # bytes per direct write: a multiple of any file system's block size
# Linux; elsewhere, or with CXR_PLAIN_WRITES=1 in the environment, the files are written as plain files
_O_DIRECT = 0 if os.environ.get("CXR_PLAIN_WRITES") == "1" else getattr(os, "O_DIRECT", 0)


class DirectFile(io.RawIOBase):
    """A new binary file written a ``DIRECT_BLOCK`` at a time from an aligned buffer with ``O_DIRECT``,
    the last partial block without it. Where the file system refuses ``O_DIRECT`` (tmpfs, some network
    file systems) or the platform has none, it is written as a plain file. Write-only and sequential;
    use through :func:`open_output`, which adds the usual buffering."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._direct = bool(_O_DIRECT)
        try:
            self._fd = os.open(path, flags | _O_DIRECT, 0o666)
        except OSError as exc:
            if not self._refused(exc):
                raise
            self._fd, self._direct = os.open(path, flags, 0o666), False
        self._buffer = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._position = 0

    @property
    def direct(self) -> bool:
        """Whether the file is still written past the page cache."""
        return self._direct

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def write(self, data) -> int:
        source = memoryview(data).cast("B")
        n, done = len(source), 0
        while done < n:
            take = min(DIRECT_BLOCK - self._filled, n - done)
            self._view[self._filled : self._filled + take] = source[done : done + take]
            self._filled += take
            done += take
            if self._filled == DIRECT_BLOCK:
                self._write_buffer()
        self._position += n
        return n

    def _refused(self, exc: OSError) -> bool:
        """Whether ``exc`` is the file system refusing ``O_DIRECT`` (the file then goes on plain)."""
        return self._direct and exc.errno == errno.EINVAL

    def _plain(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._direct = False

    def _write_buffer(self) -> None:
        pending = self._view[: self._filled]
        while pending:
            try:
                pending = pending[os.write(self._fd, pending) :]
            except OSError as exc:
                if not self._refused(exc):
                    raise
                self._plain()  # accepted at open, refused at the first write: on as a plain file
        self._filled = 0

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._filled:  # the tail is not a whole block: O_DIRECT would refuse it
                if self._direct:
                    self._plain()
                self._write_buffer()
        finally:
            os.close(self._fd)
            self._view.release()
            self._buffer.close()
            super().close()


def open_output(path: str | os.PathLike, mode: str = "wb", encoding: str = "utf-8"):
    """A new file at ``path`` for writing (``mode`` ``"wb"`` or ``"w"``), buffered as ``open`` buffers it,
    written with :class:`DirectFile`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_output writes new files: mode 'wb' or 'w', not {mode!r}")
    binary = io.BufferedWriter(DirectFile(path), buffer_size=1 << 20)
    return binary if mode == "wb" else io.TextIOWrapper(binary, encoding=encoding)


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", encoding: str = "utf-8"):
    """:func:`atomic_path` and :func:`open_output` in one: the open file, renamed onto ``path`` only if
    the block succeeds."""
    with atomic_path(path) as tmp, open_output(tmp, mode, encoding) as fh:
        yield fh


def write_json(data, path: str | os.PathLike) -> None:
    """``data`` as one JSON document (UTF-8, non-ASCII kept), written atomically."""
    import json

    with atomic_output(path, "w") as fh:
        fh.write(json.dumps(data, ensure_ascii=False))  # dumps uses the C encoder, dump does not


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast ``table`` to ``schema`` (column order and types); a missing or extra column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise ValueError(f"table does not match the contract: missing {missing}, unexpected {extra}")
    return table.select(schema.names).cast(schema)


def write_table(table: pa.Table, path: str | os.PathLike, schema: pa.Schema) -> None:
    """Write a whole table atomically after checking it against its contract schema."""
    table = conform(table, schema)
    with atomic_output(path) as fh:
        pq.write_table(table, fh, compression="zstd")


class TableWriter:
    """Stream record batches into one Parquet file, atomically.

    Use as a context manager; on an exception the partial file is removed and nothing appears at
    ``path``.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._ctx = atomic_output(self.path)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> TableWriter:
        self._file = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        return self

    def write(self, data: pa.Table | pa.RecordBatch | Mapping[str, list]) -> None:
        if isinstance(data, Mapping):
            data = pa.Table.from_pydict(dict(data), schema=self.schema)
        elif isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if data.num_rows:
            self._writer.write_table(conform(data, self.schema))
            self.rows += data.num_rows

    def __exit__(self, exc_type, exc, tb):
        self._writer.close()
        return self._ctx.__exit__(exc_type, exc, tb)


# the row count of the chunks pyarrow.dataset's scanner reads a row group in (its default batch size)
SCAN_BATCH_ROWS = 1 << 17


def read_table(path: str | os.PathLike, columns: Iterable[str] | None = None) -> pa.Table:
    """``pq.read_table(path, columns=...)`` without ``pyarrow.dataset``: importing that module imports
    pandas too (0.25 s CPU, more than the short stages' work). Chunked as the dataset scanner chunks (each
    row group in batches of at most ``SCAN_BATCH_ROWS`` rows), so what is computed from the table and
    written from it stays the same, chunk for chunk."""
    wanted = list(columns) if columns is not None else None
    with pq.ParquetFile(path) as source:
        # one thread: a DAG job has one core (the other runs another job); decoding on more threads costs
        # no less CPU
        groups = [
            source.read_row_group(i, columns=wanted, use_threads=False) for i in range(source.num_row_groups)
        ]
        table = pa.concat_tables(groups) if groups else source.read(columns=wanted)
    if not table.num_rows:  # the scanner's empty table has one empty chunk per column
        return table.schema.empty_table()
    return pa.Table.from_batches(table.to_batches(max_chunksize=SCAN_BATCH_ROWS), schema=table.schema)


class Rejects:
    """Collects rejected studies of one stage; written as the ``rejects`` table."""

    def __init__(self, stage: str):
        self.stage = stage
        self.rows: dict[str, list] = {"study_id": [], "stage": [], "reason": [], "detail": []}

    def add(self, study_id: int | None, reason: str, detail: str | None = None) -> None:
        self.rows["study_id"].append(study_id)
        self.rows["stage"].append(self.stage)
        self.rows["reason"].append(reason)
        self.rows["detail"].append(detail)

    def __len__(self) -> int:
        return len(self.rows["stage"])

    def write(self, path: str | os.PathLike) -> None:
        write_table(pa.Table.from_pydict(self.rows, schema=REJECTS), path, REJECTS)


def write_requests(rows: list[dict], path) -> None:
    """The ``LLM_REQUESTS`` table of a stage's requests (here, not in the LLM layer: a stage that asked
    no LLM writes its empty table without importing that layer)."""
    write_table(pa.Table.from_pylist(rows, schema=LLM_REQUESTS), path, LLM_REQUESTS)


def summary(stage: str, n_in: int, n_out: int, n_rejected: int) -> str:
    """The one-line summary every rule logs."""
    line = f"{stage}: {n_in} studies in, {n_out} out, {n_rejected} rejected"
    log.info(line)
    return line
