"""Ingest: raw report files and their tables → the contract's ``studies``, ``images`` and ``rejects``.

Two corpus formats:

``mimic``
    Reports from the MIMIC-CXR ``files/`` directory **or straight from** ``mimic-cxr-reports.zip`` (never
    unzipped), joined with ``mimic-cxr-2.0.0-split.csv(.gz)`` and ``-metadata.csv(.gz)`` (extra columns are
    ignored). Report files are found the way MIT-LCP's ``create_section_files.py`` finds them: group folders
    ``p`` + 2 characters, patient folders starting with ``p``, study files ``s*.txt``; anything else (READMEs,
    image folders, other files) is ignored. Studies are written sorted by (subject_id, study_id).

    The zip is read from its central directory once and each member is inflated from the raw bytes
    (``zlib``, CRC-32 checked), which is several times faster than ``ZipFile.open`` per member; with
    ``--workers 2`` the members are read and decoded by two processes.

``iu``
    IU X-Ray ``indiana_reports.csv`` + ``indiana_projections.csv``. ``uid`` becomes both ``study_id`` and
    ``subject_id`` (IU has one study per patient). The report text is rebuilt in MIMIC layout (banner line,
    every line starting with one space, ``EXAMINATION:``/``INDICATION:``/``COMPARISON:``/``FINDINGS:``/
    ``IMPRESSION:`` headers, blank lines ``" "`` between sections) so the same MIT-compatible sectioner
    applies. Projection ``Frontal`` → view_position ``PA`` and ``Lateral`` → ``LATERAL`` (IU does not say
    whether a frontal image is PA or AP; most are PA, and downstream code treats PA/AP alike as frontal);
    view_code_meaning keeps IU's own word (``frontal`` / ``lateral``). IU has no official split: a
    patient-level split is drawn from a seeded hash of the uid (default 7:1:2 train/validate/test, the
    ratios R2Gen uses), so a uid's split never depends on which other rows are present.

Report text is kept verbatim except for newline translation (``\\r\\n`` and ``\\r`` → ``\\n``), which is
what Python's text mode, and so MIT's script, sees.

Joining (MIMIC): a study's split comes from the split table and its ``study_datetime`` is the earliest
StudyDate + StudyTime of its images in the metadata table (StudyTime is a float ``HHMMSS.fff`` whose
leading zeros are lost: ``5014.5`` is 00:50:14.5). ``images`` holds the images of the written studies
only, with ``image_path`` ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` (MIMIC-CXR-JPG layout).

Counting: "N studies in" is every report file found (each copy of a duplicate counts, as does a file
whose name does not parse) plus every table study without a report file; each of them ends in
``studies`` or in ``rejects``, so N = out + rejected.

Reject reasons (the ``rejects`` table; ``detail`` names the file or member, never report text):

- ``bad_filename``: a report file in the tree whose name is not ``pNN/pSUBJECT/sSTUDY.txt`` in digits.
- ``duplicate_study``: the same study_id twice (a member twice in a zip, or two patients claiming one
  study). The first copy whose patient matches the split/metadata tables is kept and the others are
  rejected; if none matches, every copy is rejected.
- ``no_metadata``: a report whose study is absent from the split and/or the metadata table (IU: absent
  from indiana_projections.csv).
- ``subject_mismatch``: the report's patient folder disagrees with the study's patient in the tables.
- ``split_conflict``: the images of one study carry different splits, or one patient's studies do.
  Splits must be patient-disjoint (a patient in train and test leaks into every dataset built from
  them), and which split such a patient belongs to cannot be known, so **every** study of that patient
  is rejected; the rest of the run goes on. A split label other than train / validate / test stops the
  run with an error naming the split file and the labels.
- ``corrupt_member``: a zip member that cannot be inflated, fails its CRC-32, or uses an unsupported
  compression method; the rest of the archive is read normally.
- ``unreadable``: a report file that cannot be read (OSError).
- ``bad_symlink``: a symbolic link in the reports folder whose target is outside it, that loops or that
  points nowhere (a link to a folder counts once), or a symlink entry of the zip. Never followed; links
  that stay inside the folder are followed.
- ``undecodable``: bytes that are not UTF-8. Rejected rather than decoded with replacement characters,
  because mangled text would silently flow into every dataset built from it.
- ``empty_report``: empty or whitespace-only report (IU: neither findings nor impression).
- ``too_large``: a report above ``ingest.max_report_bytes`` (default 1 MiB). A file is read only up to
  the bound; a zip member whose declared size is above it is not inflated at all, and one that inflates
  past its declared size is stopped there (``corrupt_member``), so a zip bomb costs no more than its bound.
- ``no_report``: a study in the split/metadata tables (IU: in the projections) without a report.
- ``bad_id``: an id that is not an integer fitting int64: a report file whose subject/study number is
  beyond int64, a split/metadata table row whose study_id/subject_id is (one reject per table row; the
  run goes on without it), an IU uid.

A missing input path, an unreadable zip, a table without its required columns, or a reports folder
without any report file stop the run with an error naming the option and its config key.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gzip
import hashlib
import itertools
import logging
import mmap
import multiprocessing
import os
import re
import stat
import struct
import sys
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from workflow.cli import parser as base_parser
from workflow.cli import setup_logging
from workflow.contract import IMAGES, SPLITS, STUDIES
from workflow.tables import Rejects, TableWriter, summary, write_table

if TYPE_CHECKING:  # pandas is imported where IU needs it: it costs ~0.3 s of every MIMIC run's start
    import pandas as pd

log = logging.getLogger(__name__)

STAGE = "ingest"
BATCH_ROWS = 8192
PREFETCH_BATCHES = 6  # batches read ahead by the workers (~50k reports, ~75 MB of MIMIC text at most)
IU_SPLIT_RATIOS = (0.7, 0.1, 0.2)
IU_BANNER = " " * 33 + "FINAL REPORT"
IU_VIEW_POSITION = {"frontal": "PA", "lateral": "LATERAL"}
# Far above any real report (MIMIC-CXR's longest is ~15 KB); a larger one is rejected as too_large
# before it is read in full, so a hostile file cannot exhaust memory or stall the extractors.
DEFAULT_MAX_REPORT_BYTES = 1 << 20


INT64_MAX = (1 << 63) - 1


def _fits_int64(digits: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which all-digit strings (nulls: False) are ids that fit int64; Python looks only at 19+ digits."""
    lengths = pc.fill_null(pc.utf8_length(digits), 0).to_numpy(zero_copy_only=False)
    fits = lengths > 0
    long_ = np.flatnonzero(lengths >= 19)
    if len(long_):
        for i, value in zip(long_.tolist(), digits.take(pa.array(long_)).to_pylist(), strict=True):
            fits[i] = int(value) <= INT64_MAX
    return fits


class InputError(Exception):
    """A problem with the inputs as a whole (missing file, missing column): stops the run with a message."""


# --------------------------------------------------------------------------------------------------
# Finding report files (directory or zip)

_MEMBER_RE = r"(?:^|/)p(?P<group>\d\d)/p(?P<subject>\d+)/s(?P<study>\d+)\.txt$"


def _mit_candidate(path: str) -> bool:
    """MIT's filter on the last three path parts: group ``p??``, patient ``p*``, study file ``s*.txt``."""
    parts = path.split("/")
    if len(parts) < 3:
        return False
    group, patient, name = parts[-3:]
    return (
        len(group) == 3
        and group.startswith("p")
        and patient.startswith("p")
        and name.startswith("s")
        and name.endswith(".txt")
    )


class CorruptMember(Exception):
    pass


class TooLarge(Exception):
    """A report above ``ingest.max_report_bytes``: never read in full, rejected as ``too_large``."""


# Our mark in an entry's flags column (zip's own flags are 16 bits) for a Unix symlink entry.
SYMLINK_FLAG = 1 << 20


class BadSymlink(Exception):
    """A symlink entry of a zip: never read as a report."""


# Central directory file header (46 bytes) and local file header (30 bytes) of the zip format.
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _central_directory(path: str) -> tuple[list[str], np.ndarray]:
    """Names and (offset, compressed size, size, crc, method, flags) of every zip entry, in one pass.

    About 5x faster than ``zipfile.ZipFile`` on 227k entries because no ZipInfo objects are built.
    Handles ZIP64 archives (MIMIC's 227,835 members need it) and data prepended to the archive.
    """
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail_len = min(size, _EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size)
        fh.seek(size - tail_len)
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0:
            raise zipfile.BadZipFile("end of central directory not found")
        _, _, _, _, n_entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        end = size - tail_len + at  # where the central directory should end
        if n_entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
            loc = at - _ZIP64_LOCATOR.size
            sig, _, eocd64_at, _ = _ZIP64_LOCATOR.unpack_from(tail, loc)
            if sig != b"PK\x06\x07":
                raise zipfile.BadZipFile("ZIP64 locator not found")
            fh.seek(eocd64_at)
            record = fh.read(_ZIP64_EOCD.size)
            sig, _, _, _, _, _, _, n_entries, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
            if sig != b"PK\x06\x06":
                raise zipfile.BadZipFile("ZIP64 end of central directory not found")
            end = eocd64_at
        concat = end - cd_size - cd_offset  # bytes prepended to the archive (self-extractors)
        if concat < 0:
            raise zipfile.BadZipFile("central directory offset out of range")
        fh.seek(cd_offset + concat)
        cd = fh.read(cd_size)
    names: list[str] = []
    table = np.zeros((n_entries, 6), dtype=np.int64)
    pos = 0
    unpack = _CENTRAL.unpack_from
    for i in range(n_entries):
        (
            sig,
            made_by,
            _,
            flags,
            method,
            _,
            _,
            crc,
            csize,
            usize,
            n_name,
            n_extra,
            n_comment,
            _,
            _,
            ext,
            offset,
        ) = unpack(cd, pos)
        if made_by >> 8 == 3 and stat.S_ISLNK(ext >> 16):  # a Unix symlink entry: its data is a path
            flags |= SYMLINK_FLAG
        if sig != b"PK\x01\x02":
            raise zipfile.BadZipFile(f"bad central directory entry {i}")
        raw_name = cd[pos + 46 : pos + 46 + n_name]
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, csize, offset = _zip64_extra(
                cd[pos + 46 + n_name : pos + 46 + n_name + n_extra], usize, csize, offset
            )
        names.append(raw_name.decode("utf-8" if flags & 0x800 else "cp437"))
        table[i] = (offset + concat, csize, usize, crc, method, flags)
        pos += 46 + n_name + n_extra + n_comment
    return names, table


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            if usize == 0xFFFFFFFF:
                usize = next(values)
            if csize == 0xFFFFFFFF:
                csize = next(values)
            if offset == 0xFFFFFFFF:
                offset = next(values)
            break
        pos += 4 + length
    return usize, csize, offset


def _zipfile_directory(path: str) -> tuple[list[str], np.ndarray]:
    """The same as ``_central_directory`` through the standard library (the fallback for odd archives)."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()

    def flags(i: zipfile.ZipInfo) -> int:
        link = i.create_system == 3 and stat.S_ISLNK(i.external_attr >> 16)
        return i.flag_bits | (SYMLINK_FLAG if link else 0)

    table = np.array(
        [(i.header_offset, i.compress_size, i.file_size, i.CRC, i.compress_type, flags(i)) for i in infos],
        dtype=np.int64,
    ).reshape(-1, 6)
    return [i.filename for i in infos], table


class ZipSource:
    """Report members of ``mimic-cxr-reports.zip``, read from the central directory once."""

    kind = "zip"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            try:
                self.names, self.entries = _central_directory(self.path)
            except (zipfile.BadZipFile, struct.error, UnicodeDecodeError, ValueError) as exc:
                log.warning("%s: fast central-directory reader failed (%s); using zipfile", self.path, exc)
                self.names, self.entries = _zipfile_directory(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"reports: {self.path} is not a readable zip archive ({exc})") from exc

    def spec(self) -> tuple:
        return ("zip", self.path, self.entries)


class DirSource:
    """Report files under a ``files/`` directory (or a folder that contains ``files/``), found like MIT.

    Symbolic links are never followed out of the reports folder: a link (file or folder, at any level
    MIT's traversal looks at) whose target lies outside it, that loops or that points nowhere is listed
    in ``bad_links`` (rejected as ``bad_symlink``) instead of being read. Links that stay inside are
    followed (their target is what gets read). The traversal has a fixed depth, so no link can make it
    recurse.
    """

    kind = "dir"

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        if (root / "files").is_dir() and not any(
            e.is_dir() and len(e.name) == 3 and e.name.startswith("p") for e in os.scandir(root)
        ):
            root = root / "files"
        self.root = root
        self._real_root = os.path.realpath(root)
        self.names: list[str] = []  # "files/pXX/pSUBJECT/sSTUDY.txt"
        self._abs: list[str] = []
        self.bad_links: list[tuple[str, str]] = []  # (name, why)
        for group in sorted(os.scandir(root), key=lambda e: e.name):
            if not (len(group.name) == 3 and group.name.startswith("p")):
                continue
            group_path = self._follow(group, f"files/{group.name}", want_dir=True)
            if group_path is None:
                continue
            for patient in os.scandir(group_path):
                if not patient.name.startswith("p"):
                    continue
                patient_path = self._follow(patient, f"files/{group.name}/{patient.name}", want_dir=True)
                if patient_path is None:
                    continue
                for study in os.scandir(patient_path):
                    if not (study.name.startswith("s") and study.name.endswith(".txt")):
                        continue
                    name = f"files/{group.name}/{patient.name}/{study.name}"
                    study_path = self._follow(study, name, want_dir=False)
                    if study_path is not None:
                        self.names.append(name)
                        self._abs.append(study_path)

    def _follow(self, entry: os.DirEntry, name: str, want_dir: bool) -> str | None:
        """The path to read for ``entry`` (None: not of the wanted kind, or a rejected link)."""
        if not entry.is_symlink():
            ok = entry.is_dir(follow_symlinks=False) if want_dir else entry.is_file(follow_symlinks=False)
            return entry.path if ok else None
        try:
            target = os.path.realpath(entry.path, strict=True)
        except OSError as exc:
            why = "symlink loop" if exc.errno == errno.ELOOP else "symlink to nothing"
            self.bad_links.append((name, f"{why}, not followed"))
            return None
        if os.path.commonpath([self._real_root, target]) != self._real_root:
            self.bad_links.append((name, "symlink pointing outside the reports folder, not followed"))
            return None
        ok = os.path.isdir(target) if want_dir else os.path.isfile(target)
        return target if ok else None

    def spec(self) -> tuple:
        return ("dir", self._abs)


class _Reader:
    """Reads the bytes of members in one process (the parent or a worker).

    No read holds more than ``max_bytes`` + 1 bytes of a report: a file is read up to that bound, and a
    zip member is inflated with its output bounded by its declared size, so a member that lies about its
    size (a zip bomb) is stopped as soon as it passes the declared size.
    """

    def __init__(self, spec: tuple, max_bytes: int = DEFAULT_MAX_REPORT_BYTES):
        self.kind = spec[0]
        self.max_bytes = int(max_bytes)
        if self.kind == "zip":
            _, path, self.entries = spec
            self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._size = len(self._map)
        else:
            _, self.paths = spec

    def read(self, locator: int) -> bytes:
        if self.kind == "dir":
            # The path is a regular file inside the reports folder (DirSource resolved any link): opened
            # without following a link swapped in since, and without blocking on a FIFO swapped in.
            fd = os.open(self.paths[locator], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                data = fh.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise TooLarge(f"more than {self.max_bytes} bytes (ingest.max_report_bytes)")
            return data
        offset, csize, usize, crc, method, flags = self.entries[locator].tolist()
        if flags & SYMLINK_FLAG:
            raise BadSymlink("symlink member, not followed")
        if flags & 0x1:
            raise CorruptMember("encrypted member")
        if usize > self.max_bytes:
            raise TooLarge(f"declares {usize} bytes, more than {self.max_bytes} (ingest.max_report_bytes)")
        if offset + _LOCAL.size > self._size:
            raise CorruptMember("local header beyond the end of the archive")
        signature, n_name, n_extra = _LOCAL.unpack_from(self._map, offset)
        if signature != b"PK\x03\x04":
            raise CorruptMember("bad local header signature")
        start = offset + _LOCAL.size + n_name + n_extra
        if method == zipfile.ZIP_STORED and csize != usize:
            raise CorruptMember(f"stored member of {csize} bytes declares {usize}")
        raw = self._map[start : start + csize]
        if len(raw) < csize:
            raise CorruptMember("member data truncated")
        if method == zipfile.ZIP_DEFLATED:
            inflater = zlib.decompressobj(-15)
            try:
                # One byte more than declared is enough to catch a liar; nothing beyond is inflated.
                data = inflater.decompress(raw, usize + 1)
            except zlib.error as exc:
                raise CorruptMember(f"inflate failed: {exc}") from None
            if len(data) > usize:
                raise CorruptMember(f"inflates past its declared size of {usize} bytes")
            if not inflater.eof:
                raise CorruptMember("inflate failed: incomplete or truncated stream")
        elif method == zipfile.ZIP_STORED:
            data = raw
        else:
            raise CorruptMember(f"unsupported compression method {method}")
        if len(data) != usize:
            raise CorruptMember(f"inflated to {len(data)} bytes, {usize} declared")
        if zlib.crc32(data) != crc:
            raise CorruptMember("CRC-32 mismatch")
        return data

    def close(self) -> None:
        if self.kind == "zip":
            self._map.close()
            self._file.close()


def read_batch(reader: _Reader, locators: np.ndarray) -> tuple[pa.StringArray, np.ndarray, list]:
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


_worker_reader: _Reader | None = None


def _worker_init(spec: tuple, max_bytes: int) -> None:
    global _worker_reader
    _worker_reader = _Reader(spec, max_bytes)


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
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=(spec, max_bytes)) as pool:
        yield pool


class BatchResults:
    """read_batch results in job order, read in this process or by the pool.

    With a pool, the first ``window`` jobs are submitted at once, so the workers inflate reports while
    this process reads the split/metadata tables; never more than ``window`` batches are in flight, so
    memory stays bounded whatever the corpus size.
    """

    def __init__(
        self,
        spec: tuple,
        jobs: list[np.ndarray],
        pool,
        window: int = PREFETCH_BATCHES,
        max_bytes: int = DEFAULT_MAX_REPORT_BYTES,
    ):
        self.spec, self.jobs, self.pool, self.max_bytes = spec, jobs, pool, max_bytes
        self._queue = iter(jobs)
        self._pending: deque = deque()
        if pool is not None:
            for locators in itertools.islice(self._queue, max(1, window)):
                self._pending.append(pool.apply_async(_worker_batch, (locators,)))

    def __iter__(self) -> Iterator:
        if self.pool is None:
            reader = _Reader(self.spec, self.max_bytes)
            try:
                for locators in self.jobs:
                    yield read_batch(reader, locators)
            finally:
                reader.close()
            return
        while self._pending:
            result = self._pending.popleft().get()
            nxt = next(self._queue, None)
            if nxt is not None:
                self._pending.append(self.pool.apply_async(_worker_batch, (nxt,)))
            yield result


# --------------------------------------------------------------------------------------------------
# The MIMIC tables (split, metadata)


def _csv_header(path: str | os.PathLike) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as fh:
            return next(csv.reader(fh), [])
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc


def read_csv_arrow(
    path: str | os.PathLike,
    required: Sequence[str],
    optional: Sequence[str] = (),
    ids: Sequence[str] = (),
    multiline: bool = False,
    key: str = "",
    rejects: Rejects | None = None,
) -> pa.Table:
    """The wanted columns of a .csv or .csv.gz (extra columns ignored; a missing optional one is null).

    ``key`` names the config key of the file in error messages.

    ``ids`` columns become int64; a row where one of them is not an integer that fits int64 is dropped
    and, with ``rejects``, recorded there as ``bad_id`` (one row per table row; its study_id when that one
    is readable). Every other column is read as text.
    """
    header = _csv_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        where = f"{key} ({path})" if key else str(path)
        raise InputError(f"{where}: missing column(s) {missing}; found {header}")
    wanted = [c for c in (*required, *optional) if c in header]

    def read(types):
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=multiline),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types),
        )

    text_types = dict.fromkeys(wanted, pa.string())
    try:
        try:
            table = read({**text_types, **dict.fromkeys(ids, pa.int64())})
        except pa.ArrowInvalid:
            # Some id is not an integer (or not one that fits int64): read as text, keep the rows whose
            # ids all are, reject the others.
            table = read(text_types)
            good = np.ones(table.num_rows, dtype=bool)
            fits = {}
            for column in ids:
                text = pc.utf8_trim_whitespace(table[column])
                digits = pc.fill_null(pc.match_substring_regex(text, r"^\d+$"), False).to_numpy(
                    zero_copy_only=False
                )
                fits[column] = digits & _fits_int64(pc.if_else(digits, text, None))
                table = table.set_column(table.schema.get_field_index(column), column, text)
                good &= fits[column]
            bad = np.flatnonzero(~good)
            log.warning("%s: %d rows with unreadable or out-of-range ids rejected (bad_id)", path, len(bad))
            if rejects is not None:
                name = Path(path).name
                for i in bad.tolist():
                    row_ids = {c: table[c][i].as_py() for c in ids}
                    wrong = ", ".join(f"{c} {str(row_ids[c])[:40]!r}" for c in ids if not fits[c][i])
                    study = int(row_ids["study_id"]) if "study_id" in fits and fits["study_id"][i] else None
                    rejects.add(study, "bad_id", f"{name}: row {i + 2}: {wrong} is not an int64 id")
            table = table.filter(pa.array(good))
            for column in ids:
                idx = table.schema.get_field_index(column)
                table = table.set_column(idx, column, pc.cast(table[column], pa.int64()))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot parse as CSV ({exc})") from exc
    for column in optional:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
    return table


def _drop_duplicate_keys(table: pa.Table, key: str, what: str) -> pa.Table:
    """Keep the first row of each ``key`` (and drop rows with a null key), logging how many went."""
    table = table.filter(pc.is_valid(table[key]))
    # Sorting finds repeats as fast as hashing here and needs a third of the memory (a peak-RSS matter).
    keys = table[key].take(pc.sort_indices(table[key]))
    if table.num_rows < 2 or not pc.any(pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1))).as_py():
        return table
    first = (
        table.append_column("_row", pa.array(np.arange(table.num_rows)))
        .group_by(key, use_threads=False)
        .aggregate([("_row", "min")])["_row_min"]
    )
    log.warning("%s: %d duplicate %s rows ignored", what, table.num_rows - len(first), key)
    return table.take(pc.sort_indices(first))


def study_datetime(dates: pa.ChunkedArray, times: pa.ChunkedArray) -> pa.Array:
    """StudyDate ``YYYYMMDD`` + StudyTime ``HHMMSS.fff`` (a float: leading zeros lost) → timestamp[ms].

    An unreadable date gives null; a date with an unreadable time keeps midnight.
    """
    day = pc.strptime(pc.utf8_trim_whitespace(dates), format="%Y%m%d", unit="ms", error_is_null=True)
    text = pc.utf8_trim_whitespace(times)
    numeric = pc.fill_null(pc.match_substring_regex(text, r"^\d+(\.\d*)?$"), False)
    seconds = pc.cast(pc.if_else(numeric, text, None), pa.float64()).to_numpy(zero_copy_only=False)
    hours, minutes, secs = np.floor(seconds / 10000), np.floor(seconds / 100) % 100, seconds % 100
    with np.errstate(invalid="ignore"):
        valid = (hours < 24) & (minutes < 60) & (secs < 60)
    millis = np.where(valid, np.round((hours * 3600 + minutes * 60 + secs) * 1000), 0).astype(np.int64)
    day_ms = pc.cast(day, pa.int64()).to_numpy(zero_copy_only=False)
    stamps = pa.array(day_ms + millis, pa.int64(), mask=pc.is_null(day).to_numpy(zero_copy_only=False))
    return stamps.cast(pa.timestamp("ms"))


def read_mimic_tables(split_path, metadata_path, rejects: Rejects | None = None) -> tuple[pa.Table, pa.Table]:
    """(images, facts): the image rows of both tables, and one row per study_id of either table.

    Rows with ids that are not int64 integers go to ``rejects`` as ``bad_id``.

    ``facts``: study_id, subject_id (null when the tables disagree), split, n_splits, patient_splits (of
    the study's patient in the split table), study_datetime, in_split, in_metadata.

    An unknown split label stops the run (:class:`InputError` naming the file and the labels).
    """
    split = read_csv_arrow(
        split_path,
        ("dicom_id", "study_id", "subject_id", "split"),
        ids=("study_id", "subject_id"),
        key="corpus.mimic.split",
        rejects=rejects,
    )
    meta = read_csv_arrow(
        metadata_path,
        ("dicom_id", "subject_id", "study_id"),
        ("ViewPosition", "ViewCodeSequence_CodeMeaning", "StudyDate", "StudyTime"),
        ids=("study_id", "subject_id"),
        key="corpus.mimic.metadata",
        rejects=rejects,
    )
    labels = pc.unique(pc.fill_null(split["split"], "")).to_pylist()
    unknown = sorted(set(labels) - set(SPLITS))
    if unknown:
        counts = {label: 0 for label in unknown}
        for label in pc.fill_null(split["split"], "").to_pylist():
            if label in counts:
                counts[label] += 1
        found = ", ".join(f"{label!r} ({n} rows)" for label, n in counts.items())
        raise InputError(
            f"corpus.mimic.split ({split_path}): unknown split label(s) {found} in column 'split'; "
            f"expected only {', '.join(SPLITS)}"
        )
    split = _drop_duplicate_keys(split, "dicom_id", f"split table {split_path}")
    meta = _drop_duplicate_keys(meta, "dicom_id", f"metadata table {metadata_path}")
    meta = pa.table(
        {
            "dicom_id": meta["dicom_id"],
            "subject_id": meta["subject_id"],
            "study_id": meta["study_id"],
            "view_position": meta["ViewPosition"],
            "view_code_meaning": meta["ViewCodeSequence_CodeMeaning"],
            "study_datetime": study_datetime(meta["StudyDate"], meta["StudyTime"]),
        }
    )
    images = meta.drop_columns(["study_datetime"]).join(
        split.select(["dicom_id", "subject_id", "study_id"]).rename_columns(
            ["dicom_id", "subj_s", "study_s"]
        ),
        keys="dicom_id",
        join_type="full outer",
    )
    images = pa.table(
        {
            "dicom_id": images["dicom_id"],
            "subject_id": pc.coalesce(images["subject_id"], images["subj_s"]),
            "study_id": pc.coalesce(images["study_id"], images["study_s"]),
            "view_position": images["view_position"],
            "view_code_meaning": images["view_code_meaning"],
        }
    )
    ids = pa.concat_tables(
        [meta.select(["study_id", "subject_id"]), split.select(["study_id", "subject_id"])]
    )
    facts = ids.group_by("study_id").aggregate([("subject_id", "min"), ("subject_id", "count_distinct")])
    split_facts = split.group_by("study_id").aggregate([("split", "min"), ("split", "count_distinct")])
    split_facts = split_facts.append_column("in_split", pa.array(np.ones(split_facts.num_rows, bool)))
    meta_facts = meta.group_by("study_id").aggregate([("study_datetime", "min")])
    meta_facts = meta_facts.append_column("in_metadata", pa.array(np.ones(meta_facts.num_rows, bool)))
    facts = facts.join(split_facts, "study_id").join(meta_facts, "study_id")
    agreed = pc.equal(facts["subject_id_count_distinct"], 1)
    # Splits must be patient-disjoint: how many splits each patient's rows carry.
    patient_splits = split.group_by("subject_id").aggregate([("split", "count_distinct")])
    facts = facts.append_column("_subject", pc.if_else(agreed, facts["subject_id_min"], None)).join(
        patient_splits.rename_columns(["_subject", "patient_splits"]), "_subject", join_type="left outer"
    )
    agreed = pc.equal(facts["subject_id_count_distinct"], 1)  # again: the join reorders rows
    facts = pa.table(
        {
            "study_id": facts["study_id"],
            "subject_id_tables": pc.if_else(agreed, facts["subject_id_min"], None),
            "split": facts["split_min"],
            "n_splits": pc.fill_null(facts["split_count_distinct"], 0),
            "patient_splits": pc.fill_null(facts["patient_splits"], 0),
            "study_datetime": facts["study_datetime_min"],
            "in_split": pc.fill_null(facts["in_split"], False),
            "in_metadata": pc.fill_null(facts["in_metadata"], False),
        }
    )
    return images, facts


# --------------------------------------------------------------------------------------------------
# MIMIC ingest


@dataclass
class Result:
    n_in: int
    n_out: int
    n_images: int
    rejects: Rejects

    @property
    def reasons(self) -> Counter:
        return Counter(self.rejects.rows["reason"])


def open_source(reports: str | os.PathLike):
    path = Path(reports)
    if path.is_dir():
        return DirSource(path)
    if path.is_file():
        return ZipSource(path)
    raise InputError(f"reports: {str(path)!r} does not exist")


def _catalog(source, rejects: Rejects) -> pa.Table:
    """Every report member as a row (subject_id, study_id, path, locator), sorted; bad names rejected."""
    names = pa.array(source.names, pa.string())
    parts = pc.extract_regex(names, _MEMBER_RE)
    good = pc.is_valid(parts).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~good).tolist():
        name = source.names[i]
        if _mit_candidate(name):  # looks like a report file but does not parse
            study = re.fullmatch(r"s(\d+)\.txt", name.rsplit("/", 1)[-1])
            study_id = int(study.group(1)) if study else None
            rejects.add(study_id if study_id is None or study_id <= INT64_MAX else None, "bad_filename", name)
    # Ids beyond int64 cannot be a MIMIC id (nor fit the contract): the file is rejected, the run goes on.
    for field in ("subject", "study"):
        long_ids = np.flatnonzero(
            good & (pc.utf8_length(pc.fill_null(parts.field(field), "")).to_numpy() >= 19)
        )
        for i in long_ids.tolist():
            if int(parts.field(field)[i].as_py()) > INT64_MAX:
                good[i] = False
                study_id = int(parts.field("study")[i].as_py())
                rejects.add(
                    study_id if study_id <= INT64_MAX else None,
                    "bad_id",
                    f"{source.names[i]}: {field} id beyond int64",
                )
    locator = np.flatnonzero(good)
    parts = parts.filter(pa.array(good))
    tail = pc.extract_regex(names.filter(pa.array(good)), r"(?P<tail>p\d\d/p\d+/s\d+\.txt)$").field("tail")
    catalog = pa.table(
        {
            "subject_id": pc.cast(parts.field("subject"), pa.int64()),
            "study_id": pc.cast(parts.field("study"), pa.int64()),
            "path": pc.binary_join_element_wise("files/", tail, ""),
            "locator": pa.array(locator, pa.int64()),
        }
    )
    return catalog.sort_by([("subject_id", "ascending"), ("study_id", "ascending"), ("locator", "ascending")])


def _resolve(catalog: pa.Table, facts: pa.Table, rejects: Rejects) -> tuple[pa.Table, np.ndarray]:
    """Apply the duplicate and join rules.

    Returns the catalog (same rows, same order) joined with each study's split and datetime, and the
    mask of the members to write; the others are in ``rejects``.
    """
    joined = (
        catalog.append_column("_order", pa.array(np.arange(catalog.num_rows)))
        .join(facts, "study_id", join_type="left outer")
        .sort_by("_order")
    )
    n = joined.num_rows
    study = joined["study_id"].to_numpy()
    subject = joined["subject_id"].to_numpy()
    tables_subject = pc.fill_null(joined["subject_id_tables"], -1).to_numpy()
    matches = subject == tables_subject
    in_split = pc.fill_null(joined["in_split"], False).to_numpy(zero_copy_only=False)
    in_meta = pc.fill_null(joined["in_metadata"], False).to_numpy(zero_copy_only=False)
    n_splits = pc.fill_null(joined["n_splits"], 0).to_numpy()
    patient_splits = pc.fill_null(joined["patient_splits"], 0).to_numpy()
    paths = joined["path"]

    keep = np.ones(n, dtype=bool)
    _, inverse, counts = np.unique(study, return_inverse=True, return_counts=True)
    copies = counts[inverse]
    if (copies > 1).any():
        keep[copies > 1] = False
        # Keep the first copy (in sorted order) whose patient matches the tables; reject the others.
        seen: set[int] = set()
        for i in np.flatnonzero(copies > 1).tolist():
            if matches[i] and study[i] not in seen:
                seen.add(int(study[i]))
                keep[i] = True
            else:
                rejects.add(
                    int(study[i]), "duplicate_study", f"{paths[i]}: study_id claimed {copies[i]} times"
                )
    missing = keep & ~(in_split & in_meta)
    mismatch = keep & ~missing & ~matches
    conflict = keep & ~missing & ~mismatch & ((n_splits > 1) | (patient_splits > 1))
    for i in np.flatnonzero(missing | mismatch | conflict).tolist():
        if missing[i]:
            absent = " and ".join(
                name for name, flag in (("split", in_split[i]), ("metadata", in_meta[i])) if not flag
            )
            rejects.add(int(study[i]), "no_metadata", f"{paths[i]}: study absent from the {absent} table")
        elif mismatch[i]:
            said = "disagree" if tables_subject[i] < 0 else f"say p{tables_subject[i]}"
            rejects.add(int(study[i]), "subject_mismatch", f"{paths[i]}: the split/metadata tables {said}")
        elif n_splits[i] > 1:
            rejects.add(int(study[i]), "split_conflict", f"{paths[i]}: images in {n_splits[i]} splits")
        else:
            rejects.add(
                int(study[i]),
                "split_conflict",
                f"{paths[i]}: patient p{subject[i]} has studies in {patient_splits[i]} splits",
            )
    return joined, keep & ~missing & ~mismatch & ~conflict


def ingest_mimic(
    reports: str | os.PathLike,
    split: str | os.PathLike,
    metadata: str | os.PathLike,
    studies_out: str | os.PathLike,
    images_out: str | os.PathLike,
    rejects_out: str | os.PathLike,
    workers: int = 1,
    batch_rows: int = BATCH_ROWS,
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
) -> Result:
    for key, value in (("reports", reports), ("split", split), ("metadata", metadata)):
        if not Path(value).exists():
            raise InputError(
                f"--{key} (config key corpus.mimic.{key}) points to {str(value)!r}, which does not exist"
            )
    rejects = Rejects(STAGE)
    source = open_source(reports)
    spec = source.spec()
    with reader_pool(spec, workers, max_report_bytes) as pool:
        catalog = _catalog(source, rejects)
        linked = []  # studies whose report file is a rejected link (not also "no_report")
        for name, why in getattr(source, "bad_links", ()):
            study = re.fullmatch(r"s(\d{1,18})\.txt", name.rsplit("/", 1)[-1])
            rejects.add(int(study.group(1)) if study else None, "bad_symlink", f"{name}: {why}")
            if study:
                linked.append(int(study.group(1)))
        n_bad_names = len(rejects)
        if catalog.num_rows + n_bad_names == 0:
            raise InputError(
                f"--reports (config key corpus.mimic.reports): no report files files/pXX/pSUBJECT/sSTUDY.txt in "
                f"{str(reports)!r} (the reports are in MIMIC-CXR's mimic-cxr-reports.zip, not in MIMIC-CXR-JPG)"
            )
        log.info("reports: %d report files in %s (%s)", catalog.num_rows + n_bad_names, reports, source.kind)
        source.names = (
            None  # the catalog has what is needed; 227k Python strings less for the rest of the run
        )
        pa.default_memory_pool().release_unused()
        # Every member is queued for reading now (sorted order); the ones the tables reject are dropped
        # after reading. This lets the workers inflate reports while the tables are being read.
        locators = catalog["locator"].to_numpy()
        jobs = [locators[start : start + batch_rows] for start in range(0, len(locators), batch_rows)]
        results = BatchResults(spec, jobs, pool, max_bytes=max_report_bytes)
        n_before_tables = len(rejects)
        images, facts = read_mimic_tables(split, metadata, rejects)
        n_bad_rows = len(rejects) - n_before_tables
        pa.default_memory_pool().release_unused()  # give the CSV/join scratch memory back before reading on
        log.info("tables: %d images of %d studies", images.num_rows, facts.num_rows)

        joined, accepted = _resolve(catalog, facts, rejects)
        written = []
        bar = tqdm(total=len(locators), unit="study", desc="ingest", mininterval=2, disable=None)
        with TableWriter(studies_out, STUDIES) as writer:
            start = 0
            for texts, ok, problems in results:
                n = len(ok)
                chunk = joined.slice(start, n)
                wanted = accepted[start : start + n]
                start += n
                for i, reason, detail in problems:
                    if wanted[i]:  # a member rejected by the tables keeps that first reason
                        rejects.add(chunk["study_id"][i].as_py(), reason, f"{chunk['path'][i]}: {detail}")
                mask = pa.array(wanted & ok)
                chunk = chunk.filter(mask)
                writer.write(
                    pa.table(
                        {
                            "subject_id": chunk["subject_id"],
                            "study_id": chunk["study_id"],
                            "split": chunk["split"],
                            "study_datetime": chunk["study_datetime"],
                            "report": texts.filter(mask),
                            "source_path": chunk["path"],
                        }
                    )
                )
                written.append(chunk.select(["study_id", "split"]))
                bar.update(n)
            bar.close()
            n_out = writer.rows

        # Studies of the tables without any report file (rejected copies still count as having one).
        has_file = pa.concat_arrays([*catalog["study_id"].chunks, pa.array(linked, pa.int64())])
        no_report = facts.filter(pc.invert(pc.is_in(facts["study_id"], has_file)))["study_id"]
        for study_id in pc.sort_indices(no_report).to_numpy():
            rejects.add(
                no_report[int(study_id)].as_py(), "no_report", "in the split/metadata tables, no report file"
            )

        kept = (
            pa.concat_tables(written)
            if written
            else pa.table({"study_id": pa.array([], pa.int64()), "split": pa.array([], pa.string())})
        )
        images = images.join(kept, "study_id", join_type="inner").sort_by(
            [("subject_id", "ascending"), ("study_id", "ascending"), ("dicom_id", "ascending")]
        )
        subject = pc.cast(images["subject_id"], pa.string())
        image_path = pc.binary_join_element_wise(
            "files/p",
            pc.utf8_slice_codeunits(subject, 0, 2),
            "/p",
            subject,
            "/s",
            pc.cast(images["study_id"], pa.string()),
            "/",
            images["dicom_id"],
            ".jpg",
            "",
        )
        images = images.append_column("image_path", image_path).select(IMAGES.names)
        write_table(images, images_out, IMAGES)
        rejects.write(rejects_out)
        # In: every report file found (parsable or not), every table study without one, and every table
        # row rejected for its ids.
        return Result(
            catalog.num_rows + n_bad_names + n_bad_rows + len(no_report), n_out, images.num_rows, rejects
        )


# --------------------------------------------------------------------------------------------------
# IU X-Ray


def _to_id(series: pd.Series) -> pd.Series:
    """Integer ids as nullable Int64; anything that is not all digits, or beyond int64, becomes <NA>."""
    import pandas as pd

    text = series.astype("string").str.strip()
    digits = text.str.fullmatch(r"\d+", na=False).to_numpy(dtype=bool)
    usable = digits & _fits_int64(pa.array(text.where(digits, None).astype(object), pa.string()))
    values = [int(v) if ok else None for v, ok in zip(text.to_numpy(dtype=object), usable, strict=True)]
    return pd.Series(pd.array(values, dtype="Int64"), index=series.index)


def iu_split(
    subject_ids: Sequence[int], seed: int = 0, ratios: Sequence[float] = IU_SPLIT_RATIOS
) -> list[str]:
    """Deterministic patient-level split: a seeded hash of each id mapped onto the train/validate/test ratios."""
    total = float(sum(ratios))
    edges = np.cumsum(ratios) / total
    names = ("train", "validate", "test")
    out = []
    for subject_id in subject_ids:
        digest = hashlib.sha256(f"iu-split:{seed}:{subject_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        out.append(names[int(np.searchsorted(edges, u, side="right"))])
    return out


def _clean(value) -> str:
    """One line of IU text: None/NaN → '', internal whitespace runs (incl. newlines) → one space."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def iu_report_text(examination: str, indication: str, comparison: str, findings: str, impression: str) -> str:
    """An IU report in MIMIC layout, so the MIT-compatible sectioner reads it like a MIMIC report."""
    lines = [IU_BANNER, " "]
    for header, value in (
        ("EXAMINATION", examination),
        ("INDICATION", indication),
        ("COMPARISON", comparison),
    ):
        if value:
            lines += [f" {header}:  {value}", " "]
    for header, value in (("FINDINGS", findings), ("IMPRESSION", impression)):
        if value:
            lines += [f" {header}: ", " ", f" {value}", " "]
    return "\n".join(lines[:-1]) + "\n"


def _dicom_id(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    for suffix in (".png", ".jpg", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def ingest_iu(
    reports: str | os.PathLike,
    projections: str | os.PathLike,
    studies_out: str | os.PathLike,
    images_out: str | os.PathLike,
    rejects_out: str | os.PathLike,
    split_seed: int = 0,
    split_ratios: Sequence[float] = IU_SPLIT_RATIOS,
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
) -> Result:
    import pandas as pd

    for key, value in (("reports", reports), ("projections", projections)):
        if not Path(value).exists():
            raise InputError(
                f"--{key} (config key corpus.iu.{key}) points to {str(value)!r}, which does not exist"
            )
    rejects = Rejects(STAGE)
    name = Path(reports).name
    frame = read_csv_arrow(
        reports,
        ("uid", "findings", "impression"),
        ("image", "indication", "comparison"),
        multiline=True,
        key="corpus.iu.reports",
    ).to_pandas()
    proj = read_csv_arrow(
        projections, ("uid", "filename", "projection"), multiline=True, key="corpus.iu.projections"
    ).to_pandas()
    n_in = len(frame)

    frame["study_id"] = _to_id(frame["uid"])
    for row in frame[frame["study_id"].isna()].itertuples():
        rejects.add(None, "bad_id", f"{name}: row {row.Index + 2}: uid is not an int64 integer")
    frame = frame[frame["study_id"].notna()]
    dup = frame.duplicated("study_id")
    for row in frame[dup].itertuples():
        rejects.add(
            int(row.study_id), "duplicate_study", f"{name}: row {row.Index + 2}: uid {row.study_id} repeated"
        )
    frame = frame[~dup]

    proj["study_id"] = _to_id(proj["uid"])
    bad_proj = proj["study_id"].isna() | proj["filename"].isna() | proj.duplicated("filename")
    if bad_proj.any():
        log.warning(
            "%s: %d projection rows without a readable uid/filename or repeated, ignored",
            Path(projections).name,
            int(bad_proj.sum()),
        )
    proj = proj[~bad_proj]
    has_images = frame["study_id"].isin(proj["study_id"])

    studies = {c: [] for c in STUDIES.names}
    for row in frame.itertuples():
        study_id = int(row.study_id)
        where = f"{name}#uid={row.uid.strip()}"
        findings, impression = _clean(row.findings), _clean(row.impression)
        if not (findings or impression):
            rejects.add(study_id, "empty_report", f"{where}: neither findings nor impression")
            continue
        if not has_images[row.Index]:
            rejects.add(study_id, "no_metadata", f"{where}: no rows in {Path(projections).name}")
            continue
        text = iu_report_text(
            _clean(row.image), _clean(row.indication), _clean(row.comparison), findings, impression
        )
        if len(text.encode()) > max_report_bytes:
            rejects.add(study_id, "too_large", f"{where}: more than {max_report_bytes} bytes")
            continue
        studies["subject_id"].append(study_id)
        studies["study_id"].append(study_id)
        studies["study_datetime"].append(None)
        studies["report"].append(text)
        studies["source_path"].append(where)
    studies["split"] = iu_split(studies["study_id"], split_seed, split_ratios)
    table = pa.Table.from_pydict(studies, schema=STUDIES).sort_by([("subject_id", "ascending")])
    write_table(table, studies_out, STUDIES)

    orphan = sorted(set(proj["study_id"].astype("int64")) - set(frame["study_id"].astype("int64")))
    for study_id in orphan:
        rejects.add(int(study_id), "no_report", f"uid in {Path(projections).name}, not in {name}")

    split_of = dict(zip(studies["study_id"], studies["split"], strict=True))
    proj = proj[proj["study_id"].isin(split_of)].copy()
    proj["study_id"] = proj["study_id"].astype("int64")
    proj["projection"] = proj["projection"].fillna("").str.strip()
    images = pd.DataFrame(
        {
            "dicom_id": proj["filename"].map(_dicom_id),
            "subject_id": proj["study_id"],
            "study_id": proj["study_id"],
            "split": proj["study_id"].map(split_of),
            "view_position": proj["projection"].str.lower().map(IU_VIEW_POSITION).fillna(""),
            "view_code_meaning": proj["projection"].str.lower(),
            "image_path": proj["filename"],
        }
    ).sort_values(["subject_id", "study_id", "dicom_id"], ignore_index=True)
    write_table(pa.Table.from_pandas(images, schema=IMAGES, preserve_index=False), images_out, IMAGES)
    rejects.write(rejects_out)
    return Result(n_in + len(orphan), table.num_rows, len(images), rejects)


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = base_parser("Ingest raw reports into the studies/images/rejects tables of the data contract.")
    sub = p.add_subparsers(dest="format", required=True)
    mimic = sub.add_parser("mimic", help="MIMIC-CXR reports (files/ directory or mimic-cxr-reports.zip)")
    mimic.add_argument("--reports", required=True, help="files/ directory or mimic-cxr-reports.zip")
    mimic.add_argument("--split", required=True, help="mimic-cxr-2.0.0-split.csv(.gz)")
    mimic.add_argument("--metadata", required=True, help="mimic-cxr-2.0.0-metadata.csv(.gz)")
    iu = sub.add_parser("iu", help="IU X-Ray (indiana_reports.csv + indiana_projections.csv)")
    iu.add_argument("--reports", required=True, help="indiana_reports.csv")
    iu.add_argument("--projections", required=True, help="indiana_projections.csv")
    iu.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    iu.add_argument("--split-ratios", default="0.7,0.1,0.2", help="train,validate,test (default 0.7,0.1,0.2)")
    for sp in (mimic, iu):
        sp.add_argument("--studies", required=True, help="output studies.parquet")
        sp.add_argument("--images", required=True, help="output images.parquet")
        sp.add_argument("--rejects", required=True, help="output rejects.parquet")
        sp.add_argument(
            "--workers",
            type=int,
            default=min(2, os.cpu_count() or 1),
            help="processes inflating and decoding MIMIC reports (default: up to 2; IU is read in one)",
        )
        sp.add_argument(
            "--max-report-bytes",
            type=int,
            default=DEFAULT_MAX_REPORT_BYTES,
            help="larger reports are rejected as too_large, never read in full (config ingest.max_report_bytes)",
        )
        sp.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> Result:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.format == "mimic":
            result = ingest_mimic(
                args.reports,
                args.split,
                args.metadata,
                args.studies,
                args.images,
                args.rejects,
                workers=args.workers,
                max_report_bytes=args.max_report_bytes,
            )
        else:
            try:
                ratios = [float(x) for x in args.split_ratios.split(",")]
            except ValueError:
                ratios = []
            if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
                p.error(f"--split-ratios: expected three non-negative numbers, got {args.split_ratios!r}")
            result = ingest_iu(
                args.reports,
                args.projections,
                args.studies,
                args.images,
                args.rejects,
                split_seed=args.split_seed,
                split_ratios=ratios,
                max_report_bytes=args.max_report_bytes,
            )
    except InputError as exc:
        p.error(str(exc))
    summary(STAGE, result.n_in, result.n_out, len(result.rejects))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(result.reasons.items())) or "none"
    log.info("ingest: %d images; rejected by reason: %s", result.n_images, reasons)
    return result


if __name__ == "__main__":
    main()
