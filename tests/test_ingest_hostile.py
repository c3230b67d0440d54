"""Ingest under hostile input (issue 18): oversized reports and zip bombs, ids beyond int64, symlinks,
patients in two splits and unknown split labels. Every corpus is built here, in tmp_path."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_ingest import REPORT, Corpus, check_contract, reasons, rejected, write_csv

from workflow.ingest.common import InputError
from workflow.ingest.iu import ingest_iu
from workflow.ingest.mimic import ingest_mimic
from workflow.ingest.sources import (
    SYMLINK_FLAG,
    CorruptMember,
    MemberReader,
    TooLarge,
    ZipSource,
    zipfile_directory,
)


def run(tmp_path: Path, corpus: Corpus, reports: Path, name="out", workers=1, **kw):
    out = tmp_path / name
    result = ingest_mimic(
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
    source = ZipSource(corpus.zip)
    reader = MemberReader(source.spec())
    tracemalloc.start()
    with pytest.raises(CorruptMember, match="past its declared size of 1000 bytes"):
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
    source = ZipSource(corpus.zip)
    reader = MemberReader(source.spec(), max_bytes=1 << 20)
    tracemalloc.start()
    with pytest.raises(TooLarge, match="declares"):
        reader.read(source.names.index("files/p10/p10000002/s50000002.txt"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    reader.close()
    assert peak < 1 << 20
    _, tables = run(tmp_path, corpus, corpus.zip, max_report_bytes=1 << 20)
    assert reasons(tables) == {"too_large": 1}


# -- item 2: ids beyond int64 --------------------------------------------------------------------
BIG = 2**63  # one beyond int64


def test_ids_beyond_int64_reject_their_row_and_the_run_goes_on(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    corpus.study(10000002, 50000002)
    corpus.study(10000003, 50000003)
    corpus.study(10000004, BIG + 5, tables=False)  # a report file named beyond int64
    corpus.study(BIG, 50000006, tables=False)
    corpus.write()
    corpus.split_rows[2][1] = str(BIG)  # study_id of one split row (study 50000002's first image)
    corpus.meta_rows[5][1] = str(2**64 + 1)  # subject_id of one metadata row (study 50000003's second image)
    corpus.split_rows.append(["big-dicom", 50000001, 10000001, "train"])
    corpus.split_rows[-1][0] = "9" * 40  # a dicom id is a string: any length is fine
    corpus.split_rows.append(["na-dicom", "n/a", 10000001, "train"])  # not a number at all
    corpus.write()

    for reports in (corpus.root / "files", corpus.zip):
        result, tables = run(tmp_path, corpus, reports, reports.name)
        bad = [r for r in tables["rejects"].to_pylist() if r["reason"] == "bad_id"]
        assert sorted(r["study_id"] or 0 for r in bad) == [0, 0, 0, 50000003, 50000006]
        text = " ".join(r["detail"] for r in bad)
        assert "mimic-cxr-2.0.0-split.csv.gz: row 4: study_id" in text
        assert "mimic-cxr-2.0.0-metadata.csv.gz: row 7: subject_id" in text
        assert "study_id 'n/a' is not an int64 id" in text
        assert f"s{BIG + 5}.txt: study id beyond int64" in text
        # Studies that lost one image row still have the other, so they come through.
        assert set(tables["studies"]["study_id"].to_pylist()) == {50000001, 50000002, 50000003}
        assert result.n_in == tables["studies"].num_rows + tables["rejects"].num_rows


def test_iu_uid_beyond_int64_is_bad_id_and_an_oversized_report_too_large(tmp_path):
    header = ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]
    reports = write_csv(
        tmp_path / "indiana_reports.csv",
        header,
        [
            [1, "", "", "Chest", "", "", "Clear lungs.", "Normal."],
            [BIG, "", "", "Chest", "", "", "Clear lungs.", "Normal."],
            [9223372036854775807, "", "", "Chest", "", "", "Clear lungs.", "Normal."],  # int64 max: fine
            [3, "", "", "Chest", "", "", "Clear lungs. " * 200, "Normal."],
        ],
    )
    projections = write_csv(
        tmp_path / "indiana_projections.csv",
        ["uid", "filename", "projection"],
        [[u, f"{u}_IM-1.dcm.png", "Frontal"] for u in (1, 3, 9223372036854775807)],
    )
    out = tmp_path / "out"
    result = ingest_iu(
        reports, projections, out / "s.parquet", out / "i.parquet", out / "r.parquet", max_report_bytes=1000
    )
    assert pq.read_table(out / "s.parquet")["study_id"].to_pylist() == [1, 9223372036854775807]
    rejects = pq.read_table(out / "r.parquet").to_pylist()
    assert [(r["study_id"], r["reason"]) for r in rejects] == [(None, "bad_id"), (3, "too_large")]
    assert result.n_in == result.n_out + len(result.rejects)


# -- item 3: symlinks ----------------------------------------------------------------------------
def test_symlinks_out_of_the_reports_folder_loops_and_dangling_links_are_rejected_never_followed(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    for study in range(50000001, 50000007):
        corpus.study(10000001, study, report=study == 50000001)
    corpus.study(11000001, 51000001, report=False)
    corpus.write()
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("SECRET not a report\n")
    (tmp_path / "outside" / "p11000001").mkdir()
    (tmp_path / "outside" / "p11000001" / "s51000001.txt").write_text(REPORT)
    files = corpus.root / "files"
    patient = files / "p10" / "p10000001"
    (patient / "s50000002.txt").symlink_to(secret)  # a file outside
    (patient / "s50000003.txt").symlink_to(patient / "s50000003.txt")  # a loop
    (patient / "s50000004.txt").symlink_to(patient / "missing.txt")  # points nowhere
    (files / "p11").symlink_to(tmp_path / "outside")  # a folder outside
    (files / "store").mkdir()  # not a report folder (MIT ignores it): a link into it stays inside
    (files / "store" / "r5.txt").write_text(REPORT.replace("clear", "well expanded"))
    (patient / "s50000005.txt").symlink_to(Path("..") / ".." / "store" / "r5.txt")
    (patient / "p10000009").symlink_to(files / "p10")  # a folder loop (inside): bounded depth, nothing read
    (files / "p10" / "p10000007").symlink_to(files / "p10")

    result, tables = run(tmp_path, corpus, files)
    assert sorted((r["study_id"] or 0, r["reason"], r["detail"]) for r in tables["rejects"].to_pylist()) == [
        (0, "bad_symlink", "files/p11: symlink pointing outside the reports folder, not followed"),
        (
            50000002,
            "bad_symlink",
            "files/p10/p10000001/s50000002.txt: symlink pointing outside the reports folder, not followed",
        ),
        (50000003, "bad_symlink", "files/p10/p10000001/s50000003.txt: symlink loop, not followed"),
        (50000004, "bad_symlink", "files/p10/p10000001/s50000004.txt: symlink to nothing, not followed"),
        (50000006, "no_report", "in the split/metadata tables, no report file"),
        (51000001, "no_report", "in the split/metadata tables, no report file"),  # behind the p11 link
    ]
    studies = tables["studies"].to_pylist()
    reports = {s["study_id"]: s["report"] for s in studies}
    assert sorted(reports) == [50000001, 50000005]
    assert "well expanded" in reports[50000005]  # the in-folder link was followed
    assert not any("SECRET" in r for r in reports.values())


def test_a_symlink_entry_in_the_zip_is_rejected(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    corpus.study(10000001, 50000002, report=False)
    corpus.write()
    link = zipfile.ZipInfo("files/p10/p10000001/s50000002.txt")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(corpus.zip, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    # Both central-directory readers (ours and the standard-library fallback) mark it.
    source = ZipSource(corpus.zip)
    assert source.entries[source.names.index(link.filename), 5] & SYMLINK_FLAG
    names, table = zipfile_directory(str(corpus.zip))
    assert table[names.index(link.filename), 5] & SYMLINK_FLAG
    _, tables = run(tmp_path, corpus, corpus.zip)
    assert rejected(tables, "bad_symlink") == {50000002}
    assert tables["studies"]["study_id"].to_pylist() == [50000001]


# -- item 4: the split table ---------------------------------------------------------------------
def test_a_patient_in_two_splits_has_every_study_rejected(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001, split="train")
    corpus.study(10000001, 50000002, split="test")  # the same patient in test
    corpus.study(10000001, 50000003, split="train")
    corpus.study(10000002, 50000004, split="test")
    corpus.study(10000002, 50000005, split="test")
    corpus.study(10000003, 50000006, split="validate", report=False)
    corpus.write()
    for reports in (corpus.root / "files", corpus.zip):
        _, tables = run(tmp_path, corpus, reports, reports.name)
        assert tables["studies"]["study_id"].to_pylist() == [50000004, 50000005]
        assert rejected(tables, "split_conflict") == {50000001, 50000002, 50000003}
        assert all(
            "patient p10000001 has studies in 2 splits" in d for d in details(tables, "split_conflict")
        )
        assert set(tables["images"]["study_id"].to_pylist()) == {50000004, 50000005}
        # What is written is patient-disjoint.
        rows = tables["studies"].to_pylist()
        assert len({(r["subject_id"], r["split"]) for r in rows}) == len({r["subject_id"] for r in rows})


@pytest.mark.parametrize("labels", [["dev"], ["val", "Train"], [""]])
def test_unknown_split_labels_stop_the_run_naming_the_file_and_labels(tmp_path, labels):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    for k, label in enumerate(labels):
        corpus.study(10000002 + k, 50000002 + k, split=label)
    corpus.write()
    with pytest.raises(InputError) as err:
        run(tmp_path, corpus, corpus.zip)
    message = str(err.value)
    assert "corpus.mimic.split" in message and corpus.split.name in message
    assert all(repr(label) in message for label in labels)
    assert "train, validate, test" in message
    assert not (tmp_path / "out" / "studies.parquet").exists()
