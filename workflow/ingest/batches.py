"""Report texts in batches, read in this process or by a pool of reader processes (bounded read-ahead)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workflow import cli
from workflow.ingest.common import DEFAULT_MAX_REPORT_BYTES
from workflow.ingest.sources import BadSymlink, CorruptMember, MemberReader, TooLarge

# Report text the workers read ahead of this process (the memory bound of the read-ahead): what 6 batches
# of MIMIC-CXR's reports (~1.5 KB each) hold. A bound in bytes, not batches, lets the workers keep
# inflating shorter reports while this process reads the split/metadata tables, instead of idling.
PREFETCH_BYTES = 75 << 20
WORKER_NICENESS = 5
TYPICAL_REPORT_BYTES = 1536  # what a report file is taken to hold when its size is not known up front


def batch_bytes(spec: tuple, locators: np.ndarray, max_bytes: int = DEFAULT_MAX_REPORT_BYTES) -> int:
    """The text a batch is expected to hold: the zip members' declared sizes (a member declaring more
    than ``max_bytes`` is rejected unread), a typical size per report file for a folder."""
    if spec[0] == "zip":
        return int(np.minimum(spec[2][locators, 2], max_bytes + 1).sum())
    return len(locators) * TYPICAL_REPORT_BYTES


def read_batch(reader: MemberReader, locators: np.ndarray) -> tuple[pa.StringArray, np.ndarray, list]:
    """Report texts of a batch of members.

    Returns (texts, ok, problems): texts aligned with ``locators`` ('' where not ok), and problems as
    (position, reason, detail). UTF-8 validation, newline translation and the emptiness test run
    vectorised in Arrow, so no Python string is built per report.
    """
    n = len(locators)
    chunks: list[bytes] = []
    lengths = np.zeros(n, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    problems: list[tuple[int, str, str]] = []
    for i, locator in enumerate(locators.tolist()):
        try:
            data = reader.read(locator)
        except CorruptMember as exc:
            problems.append((i, "corrupt_member", str(exc)))
            ok[i] = False
            continue
        except TooLarge as exc:
            problems.append((i, "too_large", str(exc)))
            ok[i] = False
            continue
        except BadSymlink as exc:
            problems.append((i, "bad_symlink", str(exc)))
            ok[i] = False
            continue
        except OSError as exc:
            problems.append((i, "unreadable", str(exc.strerror or exc)))
            ok[i] = False
            continue
        chunks.append(data)
        lengths[i] = len(data)
    blob = b"".join(chunks)
    if b"\r" in blob:
        # Python text mode (what MIT's script reads) turns \r\n and lone \r into \n. Done on the bytes
        # (\r never occurs inside a multi-byte UTF-8 sequence) and only for batches that have one.
        chunks = [c.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in c else c for c in chunks]
        lengths[ok] = [len(c) for c in chunks]
        blob = b"".join(chunks)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    raw = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(blob)])
    try:
        texts = raw.cast(pa.string())
    except pa.ArrowInvalid:
        values = raw.to_pylist()
        for i, value in enumerate(values):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append((i, "undecodable", f"invalid UTF-8 at byte {exc.start}"))
                ok[i] = False
                values[i] = b""
        texts = pa.array(values, pa.binary()).cast(pa.string())
    empty = pc.or_(pc.equal(pc.binary_length(texts), 0), pc.utf8_is_space(texts)).to_numpy(
        zero_copy_only=False
    )
    for i in np.flatnonzero(empty & ok).tolist():
        problems.append((i, "empty_report", "empty or whitespace only"))
    ok &= ~empty
    return texts, ok, problems


_worker_reader: MemberReader | None = None


def _worker_init(spec: tuple, max_bytes: int) -> None:
    global _worker_reader
    # The parent's steps (tables, joins, writing) are the run's critical path and the read-ahead has
    # slack: on a busy core the workers yield to the parent rather than share it evenly.
    os.nice(WORKER_NICENESS)
    _worker_reader = MemberReader(spec, max_bytes)


def _worker_batch(locators: np.ndarray):
    return read_batch(_worker_reader, locators)


@contextlib.contextmanager
def reader_pool(spec: tuple, workers: int, max_bytes: int = DEFAULT_MAX_REPORT_BYTES):
    """A pool of reader processes (None for ``workers <= 1``), closed on exit.

    Started before any Arrow compute runs in this process: forking a process whose Arrow thread pools
    and allocator are busy is not safe, and an early fork also keeps the workers small.
    """
    if workers <= 1:
        yield None
        return
    # pyarrow imports pandas the first time it converts a Python object (a list, a Python scalar in a
    # compute call), which each worker and this process do: imported before the fork (or kept out of
    # pyarrow, as the job's __main__ does), it is inherited instead of imported once per worker (~0.3 s CPU
    # each, while the workers should be inflating)
    if not cli.pandas_kept_out:
        import pandas  # noqa: F401

    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=(spec, max_bytes)) as pool:
        yield pool


class BatchResults:
    """read_batch results in job order, read in this process or by the pool.

    With a pool, jobs are submitted up front until ``window_bytes`` of report text is in flight, so the
    workers inflate reports while this process reads the split/metadata tables; then one more each time
    a result is taken, so memory stays bounded whatever the corpus size (one job is always in flight).
    """

    def __init__(
        self,
        spec: tuple,
        jobs: list[np.ndarray],
        pool,
        window_bytes: int = PREFETCH_BYTES,
        max_bytes: int = DEFAULT_MAX_REPORT_BYTES,
    ):
        self.spec, self.jobs, self.pool, self.max_bytes = spec, jobs, pool, max_bytes
        self.window_bytes = window_bytes
        self._queue = iter(jobs)
        self._next = next(self._queue, None)
        self._pending: deque = deque()  # (async result, its expected bytes)
        self._in_flight = 0
        if pool is not None:
            self._submit()

    def _submit(self) -> None:
        while self._next is not None:
            size = batch_bytes(self.spec, self._next, self.max_bytes)
            if self._pending and self._in_flight + size > self.window_bytes:
                return
            self._pending.append((self.pool.apply_async(_worker_batch, (self._next,)), size))
            self._in_flight += size
            self._next = next(self._queue, None)

    def __iter__(self) -> Iterator:
        if self.pool is None:
            reader = MemberReader(self.spec, self.max_bytes)
            try:
                for locators in self.jobs:
                    yield read_batch(reader, locators)
            finally:
                reader.close()
            return
        while self._pending:
            pending, size = self._pending.popleft()
            result = pending.get()
            self._in_flight -= size
            self._submit()
            yield result
