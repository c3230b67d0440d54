"""Ingest under hostile input (issue 18): oversized reports and zip bombs, ids beyond int64, symlinks,
patients in two splits and unknown split labels. Every corpus is built here, in tmp_path."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_ingest import REPORT, Corpus, check_contract, reasons, rejected

from workflow import ingest


def run(tmp_path: Path, corpus: Corpus, reports: Path, name="out", workers=1, **kw):
    out = tmp_path / name
    result = ingest.ingest_mimic(
        reports,
        corpus.split,
        corpus.metadata,
        out / "studies.parquet",
        out / "images.parquet",
        out / "rejects.parquet",
        workers=workers,
        batch_rows=3,
        **kw,
    )
    tables = {k: pq.read_table(out / f"{k}.parquet") for k in ("studies", "images", "rejects")}
    check_contract(result, tables)
    return result, tables


def details(tables, reason) -> list[str]:
    return [r["detail"] for r in tables["rejects"].to_pylist() if r["reason"] == reason]


# -- item 1: size cap and bounded inflation ------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_a_report_above_the_cap_is_rejected_too_large_the_rest_is_read(tmp_path, workers):
    cap = len(REPORT.encode()) * 3
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    corpus.study(10000001, 50000002, text=REPORT * 3)  # exactly the cap: kept
    corpus.study(10000002, 50000003, text=REPORT * 3 + "x")  # one byte over
    corpus.study(10000003, 50000004, text=REPORT * 400)
    corpus.write()
    for reports in (corpus.root / "files", corpus.zip):
        _, tables = run(tmp_path, corpus, reports, reports.name, workers, max_report_bytes=cap)
        assert tables["studies"]["study_id"].to_pylist() == [50000001, 50000002]
        assert rejected(tables, "too_large") == {50000003, 50000004}
        assert all("ingest.max_report_bytes" in d for d in details(tables, "too_large"))
    # The default cap keeps them all.
    _, tables = run(tmp_path, corpus, corpus.zip, "default")
    assert tables["studies"].num_rows == 4


def lie_about_size(zip_path: Path, member: str, declared: int) -> None:
    """Rewrite a member's declared uncompressed size (local header and central directory)."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    data = bytearray(zip_path.read_bytes())
    data[info.header_offset + 22 : info.header_offset + 26] = declared.to_bytes(4, "little")
    central = data.rfind(b"PK\x01\x02" + data[info.header_offset + 4 : info.header_offset + 6])
    while data[central + 46 : central + 46 + len(member)] != member.encode():
        central = data.rfind(b"PK\x01\x02", 0, central)
    data[central + 24 : central + 28] = declared.to_bytes(4, "little")
    zip_path.write_bytes(bytes(data))


def test_a_zip_member_lying_about_its_size_is_stopped_at_the_declared_size(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    bomb = REPORT.encode() + b" " * (64 << 20)  # 64 MB that deflate to ~64 KB
    corpus.study(10000002, 50000002, text=bomb)
    corpus.study(10000003, 50000003)
    corpus.write()
    member = "files/p10/p10000002/s50000002.txt"
    lie_about_size(corpus.zip, member, 1000)

    # Reading the bomb never holds more than the declared size (+1 byte) of inflated data.
    source = ingest.ZipSource(corpus.zip)
    reader = ingest._Reader(source.spec())
    tracemalloc.start()
    with pytest.raises(ingest.CorruptMember, match="past its declared size of 1000 bytes"):
        reader.read(source.names.index(member))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    reader.close()
    assert peak < 1 << 20

    _, tables = run(tmp_path, corpus, corpus.zip)
    assert tables["studies"]["study_id"].to_pylist() == [50000001, 50000003]
    assert rejected(tables, "corrupt_member") == {50000002}


def test_a_zip_member_declaring_more_than_the_cap_is_not_inflated(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    corpus.study(10000002, 50000002, text=REPORT + " " * (8 << 20))
    corpus.write()
    source = ingest.ZipSource(corpus.zip)
    reader = ingest._Reader(source.spec(), max_bytes=1 << 20)
    tracemalloc.start()
    with pytest.raises(ingest.TooLarge, match="declares"):
        reader.read(source.names.index("files/p10/p10000002/s50000002.txt"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    reader.close()
    assert peak < 1 << 20
    _, tables = run(tmp_path, corpus, corpus.zip, max_report_bytes=1 << 20)
    assert reasons(tables) == {"too_large": 1}
