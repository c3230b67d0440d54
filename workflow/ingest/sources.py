"""MIMIC report files, from a ``files/`` directory or straight from ``mimic-cxr-reports.zip``.

The zip is read from its central directory once and each member is inflated from the raw bytes with
its size bounded and its CRC-32 checked; a folder is walked the way MIT-LCP's script walks it, links
that leave it never followed."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from workflow.ingest.common import DEFAULT_MAX_REPORT_BYTES, InputError

log = logging.getLogger(__name__)

MEMBER_RE = r"(?:^|/)p(?P<group>\d\d)/p(?P<subject>\d+)/s(?P<study>\d+)\.txt$"


def mit_candidate(path: str) -> bool:
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


def central_directory(path: str) -> tuple[list[str], np.ndarray]:
    """Names and (offset, compressed size, size, crc, method, flags) of every zip entry, in one pass.

    About 8x faster than ``zipfile.ZipFile`` on 227k entries because no ZipInfo objects are built and
    the headers are read as one numpy record array.
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
    entries = _entries_vectorised(cd, n_entries, concat)
    return entries if entries is not None else _entries_one_by_one(cd, n_entries, concat)


# The central directory file header as a numpy record, to read every entry's fields at once.
_CENTRAL_RECORD = np.dtype(
    [
        ("signature", "S4"), ("made_by", "<u2"), ("version_needed", "<u2"), ("flags", "<u2"),
        ("method", "<u2"), ("time", "<u2"), ("date", "<u2"), ("crc", "<u4"), ("csize", "<u4"),
        ("usize", "<u4"), ("n_name", "<u2"), ("n_extra", "<u2"), ("n_comment", "<u2"),
        ("disk", "<u2"), ("internal_attr", "<u2"), ("external_attr", "<u4"), ("offset", "<u4"),
    ]
)  # fmt: skip
assert _CENTRAL_RECORD.itemsize == _CENTRAL.size


def _entries_vectorised(cd: bytes, n_entries: int, concat: int) -> tuple[list[str], np.ndarray] | None:
    """``_entries_one_by_one`` without a Python step per entry (0.4 s -> 0.1 s for MIMIC's 227k).

    Every entry signature in the directory is taken as an entry start; that guess is used only when the
    starts chain exactly (each entry ends where the next begins, the first at 0, as many as the end
    record says), which is precisely the sequence the one-by-one walk visits. Anything else (a name that
    happens to hold a signature, a truncated directory) returns None and the walk decides.
    """
    data = np.frombuffer(cd, np.uint8)
    if n_entries == 0 or len(data) < _CENTRAL.size:
        return None
    starts = np.flatnonzero(data[:-3] == 0x50)  # "P", then the other three signature bytes
    starts = starts[(data[starts + 1] == 0x4B) & (data[starts + 2] == 1) & (data[starts + 3] == 2)]
    if len(starts) != n_entries or starts[0] != 0 or starts[-1] + _CENTRAL.size > len(data):
        return None
    headers = data[starts[:, None] + np.arange(_CENTRAL.size)].view(_CENTRAL_RECORD).ravel()
    name_starts = starts + _CENTRAL.size
    name_ends = name_starts + headers["n_name"]
    ends = name_ends + headers["n_extra"] + headers["n_comment"]
    if (ends[:-1] != starts[1:]).any() or ends[-1] > len(data):
        return None
    flags = headers["flags"].astype(np.int64)
    mode = headers["external_attr"] >> 16
    symlink = (headers["made_by"] >> 8 == 3) & (mode & 0o170000 == stat.S_IFLNK)
    flags[symlink] |= SYMLINK_FLAG
    table = np.empty((n_entries, 6), dtype=np.int64)
    table[:, 0] = headers["offset"]
    table[:, 1] = headers["csize"]
    table[:, 2] = headers["usize"]
    table[:, 3] = headers["crc"]
    table[:, 4] = headers["method"]
    table[:, 5] = flags
    zip64 = (table[:, 0] == 0xFFFFFFFF) | (table[:, 1] == 0xFFFFFFFF) | (table[:, 2] == 0xFFFFFFFF)
    for i in np.flatnonzero(zip64).tolist():
        offset, csize, usize = table[i, :3].tolist()
        usize, csize, offset = _zip64_extra(
            cd[name_ends[i] : name_ends[i] + headers["n_extra"][i]], usize, csize, offset
        )
        table[i, :3] = (offset, csize, usize)
    table[:, 0] += concat
    utf8 = (flags & 0x800).astype(bool).tolist()
    names = [
        cd[start:end].decode("utf-8" if is_utf8 else "cp437")
        for start, end, is_utf8 in zip(name_starts.tolist(), name_ends.tolist(), utf8, strict=True)
    ]
    return names, table


def _entries_one_by_one(cd: bytes, n_entries: int, concat: int) -> tuple[list[str], np.ndarray]:
    """The entries of a central directory, walked one header after the other."""
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


def zipfile_directory(path: str) -> tuple[list[str], np.ndarray]:
    """The same as ``central_directory`` through the standard library (the fallback for odd archives)."""
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
                self.names, self.entries = central_directory(self.path)
            except (zipfile.BadZipFile, struct.error, UnicodeDecodeError, ValueError) as exc:
                log.warning("%s: fast central-directory reader failed (%s); using zipfile", self.path, exc)
                self.names, self.entries = zipfile_directory(self.path)
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


class MemberReader:
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


def open_source(reports: str | os.PathLike):
    path = Path(reports)
    if path.is_dir():
        return DirSource(path)
    if path.is_file():
        return ZipSource(path)
    raise InputError(f"reports: {str(path)!r} does not exist")
