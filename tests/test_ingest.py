"""Ingest: MIMIC-CXR from a directory or straight from the zip, IU X-Ray, and every kind of bad input."""

from __future__ import annotations

import csv
import gzip
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tools.synth import METADATA_COLUMNS as MIMIC_METADATA_COLUMNS
from workflow import sections
from workflow.contract import IMAGES, REJECTS, STUDIES
from workflow.ingest import sources
from workflow.ingest.__main__ import main
from workflow.ingest.common import InputError, read_csv_arrow
from workflow.ingest.iu import ingest_iu, iu_report_text, iu_split
from workflow.ingest.mimic import ingest_mimic
from workflow.ingest.mimic_tables import _drop_duplicate_keys
from workflow.ingest.sources import central_directory, zipfile_directory

REPO = Path(__file__).resolve().parents[1]
IU_DIR = REPO.parent / "shared" / "data" / "iu_xray"

REPORT = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n"
    " \n"
    " INDICATION:  ___ year old woman with cough  // ?pna\n"
    " \n"
    " FINDINGS: \n"
    " \n"
    " The lungs are clear.  No pleural effusion or pneumothorax.\n"
    " \n"
    " IMPRESSION: \n"
    " \n"
    " No acute cardiopulmonary process.\n"
)

SPLIT_HEADER = ["dicom_id", "study_id", "subject_id", "split"]
META_HEADER = MIMIC_METADATA_COLUMNS


def write_csv(path: Path, header, rows) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


class Corpus:
    """A small MIMIC-CXR layout: report files (tree and zip) plus split and metadata tables."""

    def __init__(self, root: Path):
        self.root = root
        self.reports: list[tuple[str, bytes]] = []  # (path relative to root, content)
        self.split_rows: list[list] = []
        self.meta_rows: list[list] = []

    def study(
        self,
        subject: int,
        study: int,
        text: str | bytes = REPORT,
        split="train",
        views=("PA", "LATERAL"),
        date="21800506",
        time="213014.531",
        report=True,
        tables=True,
    ):
        if report:
            content = text.encode() if isinstance(text, str) else text
            self.reports.append((f"files/p{str(subject)[:2]}/p{subject}/s{study}.txt", content))
        if tables:
            for k, view in enumerate(views):
                dicom = f"{study:08x}-{k:08x}-0000aaaa-1111bbbb-2222cccc"
                self.split_rows.append([dicom, study, subject, split])
                meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}.get(
                    view, ""
                )
                self.meta_rows.append(
                    [
                        dicom,
                        subject,
                        study,
                        "CHEST (PA AND LAT)",
                        view,
                        3056,
                        2544,
                        date,
                        time,
                        "CHEST (PA AND LAT)",
                        meaning,
                        "Erect",
                    ]
                )
        return self

    def write(self, gz: bool = True):
        suffix = ".csv.gz" if gz else ".csv"
        for rel, content in self.reports:
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        # Distractors that MIT's traversal ignores (and so must we).
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "files" / "README").write_text("not a report\n")
        (self.root / "files" / "p1").mkdir(exist_ok=True)
        (self.root / "files" / "p1" / "s1.txt").write_text(REPORT)
        if self.reports:
            patient = (self.root / self.reports[0][0]).parent
            (patient / "s99999999").mkdir(exist_ok=True)
            (patient / "s99999999" / "image.jpg").write_bytes(b"\xff\xd8")
            (patient / "notes.csv").write_text("x\n")
        self.zip = self.root / "mimic-cxr-reports.zip"
        with zipfile.ZipFile(self.zip, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("files/README", "not a report\n")
            for rel, content in self.reports:
                zf.writestr(rel, content)
        self.split = write_csv(self.root / f"mimic-cxr-2.0.0-split{suffix}", SPLIT_HEADER, self.split_rows)
        self.metadata = write_csv(
            self.root / f"mimic-cxr-2.0.0-metadata{suffix}", META_HEADER, self.meta_rows
        )
        return self


def run(tmp_path: Path, corpus: Corpus, reports: Path, name="out", workers=1):
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
    )
    tables = {k: pq.read_table(out / f"{k}.parquet") for k in ("studies", "images", "rejects")}
    return result, tables


def check_contract(result, tables):
    assert tables["studies"].schema.equals(STUDIES)
    assert tables["images"].schema.equals(IMAGES)
    assert tables["rejects"].schema.equals(REJECTS)
    # Every study that came in is written or rejected, never dropped.
    assert result.n_in == tables["studies"].num_rows + tables["rejects"].num_rows
    assert set(tables["images"]["study_id"].to_pylist()) <= set(tables["studies"]["study_id"].to_pylist())


def clean_corpus(root: Path) -> Corpus:
    corpus = Corpus(root)
    corpus.study(10000032, 50414267, time="5014.5")  # StudyTime 00:50:14.5 with its leading zeros lost
    corpus.study(10000032, 53189527, split="train", views=("AP",))
    corpus.study(11000011, 51000001, split="validate")
    corpus.study(19999987, 58000002, split="test", text=REPORT.replace(" FINDINGS", "FINDINGS"))
    corpus.study(12000005, 52000003, text=REPORT.replace("\n", "\r\n"))  # CRLF, as text mode would see it
    return corpus.write()


@pytest.mark.parametrize("workers", [1, 2])
def test_dir_and_zip_give_identical_tables(tmp_path, workers):
    corpus = clean_corpus(tmp_path / "corpus")
    r_dir, t_dir = run(tmp_path, corpus, corpus.root / "files", "dir", workers)
    r_zip, t_zip = run(tmp_path, corpus, corpus.zip, "zip", workers)
    for tables in (t_dir, t_zip):
        check_contract(r_dir, tables)
    for name in ("studies", "images", "rejects"):
        assert t_dir[name].equals(t_zip[name]), name
    # The folder that contains files/ works too.
    _, t_parent = run(tmp_path, corpus, corpus.root, "parent")
    assert t_parent["studies"].equals(t_dir["studies"])

    studies = t_zip["studies"].to_pylist()
    assert [(s["subject_id"], s["study_id"]) for s in studies] == sorted(
        [
            (10000032, 50414267),
            (10000032, 53189527),
            (11000011, 51000001),
            (19999987, 58000002),
            (12000005, 52000003),
        ]
    )
    first = studies[0]
    assert first["report"] == REPORT  # verbatim, including the leading spaces
    assert first["source_path"] == "files/p10/p10000032/s50414267.txt"
    assert first["split"] == "train"
    assert first["study_datetime"].isoformat() == "2180-05-06T00:50:14.500000"
    assert studies[1]["study_datetime"].isoformat() == "2180-05-06T21:30:14.531000"
    by_study = {s["study_id"]: s for s in studies}
    assert by_study[52000003]["report"] == REPORT
    assert by_study[51000001]["split"] == "validate"

    images = t_zip["images"].to_pylist()
    assert len(images) == 9
    ap = [i for i in images if i["study_id"] == 53189527]
    assert [(i["view_position"], i["view_code_meaning"]) for i in ap] == [("AP", "antero-posterior")]
    assert ap[0]["image_path"] == f"files/p10/p10000032/s53189527/{ap[0]['dicom_id']}.jpg"
    assert t_zip["rejects"].num_rows == 0
    assert (r_zip.n_in, r_zip.n_out) == (5, 5)


def test_plain_csv_and_gz_tables_give_the_same_result(tmp_path):
    plain = clean_corpus(tmp_path / "plain")
    plain.write(gz=False)
    gz = clean_corpus(tmp_path / "gz")
    _, t_plain = run(tmp_path, plain, plain.zip, "plain")
    _, t_gz = run(tmp_path, gz, gz.zip, "gz")
    assert plain.split.suffix == ".csv" and gz.split.suffix == ".gz"
    assert t_plain["studies"].equals(t_gz["studies"])
    assert t_plain["images"].equals(t_gz["images"])


def reasons(tables) -> Counter:
    return Counter(tables["rejects"]["reason"].to_pylist())


def rejected(tables, reason) -> set:
    rows = tables["rejects"].to_pylist()
    return {r["study_id"] for r in rows if r["reason"] == reason}


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_reports_are_rejected_with_a_reason(tmp_path, workers):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)  # fine
    corpus.study(10000001, 50000002, text=b"")  # empty file
    corpus.study(10000002, 50000003, text=b" \n \n   \n")  # whitespace only
    corpus.study(10000002, 50000004, text=REPORT.encode() + b"\xff\xfe bad bytes\n")  # not UTF-8
    corpus.study(10000003, 50000005, report=False)  # metadata, no report
    corpus.study(10000003, 50000006, tables=False)  # report, no metadata
    corpus.study(10000003, 50000009, text=b"", tables=False)  # both: one row, the first reason
    corpus.study(10000004, 50000007, split="train")
    corpus.split_rows[-1][3] = "test"  # one image of the study in another split
    corpus.write()
    # A report that only the split table knows about.
    corpus.study(10000004, 50000008, views=("PA",))
    corpus.meta_rows.pop()
    corpus.write()
    # A study file name that passes MIT's filter but does not parse.
    bad = corpus.root / "files" / "p10" / "p10000001" / "s5000000x.txt"
    bad.write_text(REPORT)
    with zipfile.ZipFile(corpus.zip, "a") as zf:
        zf.writestr("files/p10/p10000001/s5000000x.txt", REPORT)

    for reports in (corpus.root / "files", corpus.zip):
        result, tables = run(tmp_path, corpus, reports, reports.name, workers)
        check_contract(result, tables)
        assert tables["studies"]["study_id"].to_pylist() == [50000001]
        assert rejected(tables, "empty_report") == {50000002, 50000003}
        assert rejected(tables, "undecodable") == {50000004}
        assert rejected(tables, "no_report") == {50000005}
        assert rejected(tables, "no_metadata") == {50000006, 50000008, 50000009}
        assert rejected(tables, "split_conflict") == {50000007}
        assert rejected(tables, "bad_filename") == {None}
        assert result.n_in == 10
        details = " ".join(tables["rejects"]["detail"].to_pylist())
        assert "No acute" not in details  # report text never appears in rejects
        assert "absent from the metadata table" in details
        assert set(tables["images"]["study_id"].to_pylist()) == {50000001}


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_duplicate_study_ids(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    corpus.study(10000002, 50000001, tables=False)  # a second patient claims the same study
    corpus.study(10000003, 50000002)
    corpus.study(10000004, 50000002, tables=False)
    corpus.study(10000003, 50000002, tables=False)  # the same member twice (zip only, below)
    corpus.study(10000005, 50000003, tables=False)  # two patients, neither matches the tables
    corpus.study(10000006, 50000003, tables=False)
    corpus.split_rows.append(["ffff", 50000003, 10000007, "train"])
    corpus.meta_rows.append(["ffff", 10000007, 50000003, "", "PA", 1, 1, "21800101", "0", "", "", ""])
    corpus.write()

    # In the zip the same member appears twice.
    result, tables = run(tmp_path, corpus, corpus.zip, "zip")
    check_contract(result, tables)
    rows = tables["studies"].to_pylist()
    assert [(r["subject_id"], r["study_id"]) for r in rows] == [(10000001, 50000001), (10000003, 50000002)]
    assert reasons(tables) == Counter({"duplicate_study": 5})
    assert rejected(tables, "duplicate_study") == {50000001, 50000002, 50000003}

    # In a directory a file exists once: two patients claiming one study remain.
    result, tables = run(tmp_path, corpus, corpus.root / "files", "dir")
    check_contract(result, tables)
    assert reasons(tables) == Counter({"duplicate_study": 4})


def test_subject_mismatch(tmp_path):
    corpus = Corpus(tmp_path / "corpus")
    corpus.study(10000001, 50000001)
    corpus.study(10000002, 50000002, tables=False)
    corpus.split_rows.append(["eeee", 50000002, 10000009, "train"])
    corpus.meta_rows.append(["eeee", 10000009, 50000002, "", "PA", 1, 1, "21800101", "0", "", "", ""])
    corpus.write()
    result, tables = run(tmp_path, corpus, corpus.zip)
    check_contract(result, tables)
    assert rejected(tables, "subject_mismatch") == {50000002}


def first_row_of_each_key(table: pa.Table, key: str) -> pa.Table:
    """What ``mimic_tables._drop_duplicate_keys`` promises, row by row: rows with a null key dropped,
    then the first row of each key kept, in input order."""
    seen: set = set()
    rows = []
    for i, value in enumerate(table[key].to_pylist()):
        if value is not None and value not in seen:
            seen.add(value)
            rows.append(i)
    return table.take(pa.array(rows, pa.int64()))


def has_repeats_by_sorting(table: pa.Table, key: str) -> bool:
    """How ``_drop_duplicate_keys`` found repeats before it hashed: sorted keys equal to a neighbour."""
    keys = table.filter(pc.is_valid(table[key]))[key]
    keys = keys.take(pc.sort_indices(keys))
    return len(keys) > 1 and pc.any(pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1))).as_py()


def repeated_dicom_corpus(root: Path) -> Corpus:
    """Both tables repeat dicom_ids: the first row of an image wins, so a repeat naming another study
    leaves that study out of the table (no_metadata) and a repeat naming another patient is ignored."""
    corpus = Corpus(root)
    for k in range(6):
        corpus.study(10000001 + k, 50000001 + k, views=("PA", "LATERAL", "AP")[: 1 + k % 3])
    corpus.study(10000009, 50000009, tables=False)  # its only table rows repeat an image of another study
    dicom = corpus.split_rows[0][0]  # the PA of study 50000001
    corpus.split_rows.append([dicom, 50000009, 10000009, "train"])
    corpus.meta_rows.append([dicom, 10000009, 50000009, "", "PA", 1, 1, "21800101", "0", "", "", ""])
    corpus.split_rows.insert(4, list(corpus.split_rows[3]))  # an exact repeat
    corpus.meta_rows.append([corpus.meta_rows[5][0], 10000099, 50000003, "", "AP", 1, 1, "", "", "", "", ""])
    corpus.split_rows.append(["", 50000002, 10000002, "train"])  # an empty id, twice: one image row
    corpus.split_rows.append(["", 50000002, 10000002, "train"])
    return corpus.write()


def test_repeated_dicom_ids_keep_the_first_row_of_each_image(tmp_path, caplog):
    corpus = repeated_dicom_corpus(tmp_path / "corpus")
    split = read_csv_arrow(corpus.split, SPLIT_HEADER, ids=("study_id", "subject_id"))
    meta = read_csv_arrow(corpus.metadata, META_HEADER, ids=("study_id", "subject_id"))
    nulls = pa.table({c: pa.nulls(2, split[c].type) for c in SPLIT_HEADER})
    with_nulls = pa.concat_tables([split.slice(0, 5), nulls, split.slice(5)])
    tables = (split, meta, with_nulls, with_nulls.slice(4), split.slice(0, 3), nulls, split.slice(5, 8))
    for table in tables:
        kept = _drop_duplicate_keys(table, "dicom_id", "table")
        assert kept.equals(first_row_of_each_key(table, "dicom_id"))
        repeats = kept.num_rows < table.num_rows - table["dicom_id"].null_count
        assert repeats == has_repeats_by_sorting(table, "dicom_id")
    assert has_repeats_by_sorting(split, "dicom_id") and has_repeats_by_sorting(meta, "dicom_id")

    caplog.clear()
    result, tables = run(tmp_path, corpus, corpus.zip, workers=2)
    check_contract(result, tables)
    # The split table's repeat of 50000001's PA for 50000009 is ignored: 50000009 has no split rows.
    assert {(r["study_id"], r["reason"]) for r in tables["rejects"].to_pylist()} == {
        (50000009, "no_metadata")
    }
    images = tables["images"].to_pylist()
    assert [r["study_id"] for r in images] == [50000001, 50000002, 50000002, 50000002, *[50000003] * 3] + [
        50000004,
        *[50000005] * 2,
        *[50000006] * 3,
    ]
    assert [r["dicom_id"] for r in images].count("") == 1  # an empty id is an id: kept once
    assert all(r["subject_id"] != 10000099 for r in images)  # the metadata repeat naming another patient
    warnings = [r.getMessage() for r in caplog.records if "duplicate dicom_id" in r.getMessage()]
    assert [w.split()[0] for w in warnings] == ["split", "metadata"]
    assert [w.rsplit(": ", 1)[1] for w in warnings] == [
        f"{n} duplicate dicom_id rows ignored" for n in (3, 2)
    ]


def corrupt(zip_path: Path, member: str, how: str) -> None:
    """Damage one member's compressed bytes in place (the central directory stays valid)."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    data = bytearray(zip_path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len
    if how == "flip":
        data[start + info.compress_size // 2] ^= 0xFF
    elif how == "truncate":  # a deflate stream cut short: zero the tail, which never ends the stream
        data[start + 4 : start + info.compress_size] = bytes(info.compress_size - 4)
    elif how == "crc":
        central = data.rfind(info.filename.encode()) - 46
        data[central + 16 : central + 20] = (info.CRC ^ 1).to_bytes(4, "little")
    elif how == "header":
        data[info.header_offset : info.header_offset + 4] = b"XXXX"
    zip_path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "crc", "header"])
def test_corrupt_zip_member_is_rejected_and_the_rest_survive(tmp_path, how):
    corpus = Corpus(tmp_path / "corpus")
    for k in range(6):
        corpus.study(10000001 + k, 50000001 + k, text=REPORT * (k + 1))
    corpus.write()
    corrupt(corpus.zip, "files/p10/p10000003/s50000003.txt", how)
    result, tables = run(tmp_path, corpus, corpus.zip)
    check_contract(result, tables)
    assert reasons(tables) == Counter({"corrupt_member": 1})
    assert rejected(tables, "corrupt_member") == {50000003}
    assert tables["studies"].num_rows == 5
    assert tables["studies"]["report"][3].as_py() == REPORT * 5


def test_synthetic_corpus_dir_equals_zip_and_rejects_exactly_the_planted_bad_inputs(tmp_path):
    out = tmp_path / "synth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.synth",
            "--out",
            str(out),
            "--studies",
            "300",
            "--patients",
            "90",
            "--seed",
            "3",
        ],
        check=True,
        cwd=REPO,
    )
    truth = pq.read_table(out / "truth_studies.parquet", columns=["study_id", "bad"]).to_pylist()
    planted = {(t["study_id"], t["bad"]) for t in truth if t["bad"]}
    assert planted, "the generator plants bad inputs by default"
    results = {}
    for name, reports in (("dir", out / "files"), ("zip", out / "mimic-cxr-reports.zip")):
        o = tmp_path / name
        result = ingest_mimic(
            reports,
            out / "mimic-cxr-2.0.0-split.csv.gz",
            out / "mimic-cxr-2.0.0-metadata.csv.gz",
            o / "studies.parquet",
            o / "images.parquet",
            o / "rejects.parquet",
            workers=2,
        )
        tables = {k: pq.read_table(o / f"{k}.parquet") for k in ("studies", "images", "rejects")}
        check_contract(result, tables)
        results[name] = tables
        assert result.n_in == len(truth)
        rejects = {(r["study_id"], r["reason"]) for r in tables["rejects"].to_pylist()}
        assert rejects == planted
        assert tables["studies"].num_rows == len(truth) - len(planted)
    for name in ("studies", "images", "rejects"):
        assert results["dir"][name].equals(results["zip"][name]), name
    studies = results["zip"]["studies"]
    assert set(studies["split"].to_pylist()) <= {"train", "validate", "test"}
    assert studies["study_datetime"].null_count == 0


def test_cli_names_the_missing_input(tmp_path):
    corpus = clean_corpus(tmp_path / "corpus")
    cmd = [
        sys.executable,
        "-m",
        "workflow.ingest",
        "mimic",
        "--reports",
        str(tmp_path / "nope.zip"),
        "--split",
        str(corpus.split),
        "--metadata",
        str(corpus.metadata),
        "--studies",
        str(tmp_path / "s.pq"),
        "--images",
        str(tmp_path / "i.pq"),
        "--rejects",
        str(tmp_path / "r.pq"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "corpus.mimic.reports" in proc.stderr and "nope.zip" in proc.stderr
    assert not (tmp_path / "s.pq").exists()


def test_cli_runs_and_logs_the_summary(tmp_path):
    corpus = clean_corpus(tmp_path / "corpus")
    (corpus.root / "files" / "p10" / "p10000032" / "s50414267.txt").write_bytes(b"  \n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "workflow.ingest",
        "mimic",
        "--reports",
        str(corpus.root / "files"),
        "--split",
        str(corpus.split),
        "--metadata",
        str(corpus.metadata),
        "--studies",
        str(out / "s.parquet"),
        "--images",
        str(out / "i.parquet"),
        "--rejects",
        str(out / "r.parquet"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    assert "ingest: 5 studies in, 4 out, 1 rejected" in proc.stderr
    assert "empty_report=1" in proc.stderr


def test_missing_table_column_is_a_clear_error(tmp_path):
    corpus = clean_corpus(tmp_path / "corpus")
    write_csv(corpus.split, ["dicom_id", "study_id", "subject_id"], [["a", 1, 2]])
    with pytest.raises(InputError, match=r"corpus\.mimic\.split.*missing column.*split"):
        run(tmp_path, corpus, corpus.zip)


def test_iu_report_text_sections_like_mimic():
    text = iu_report_text("Xray Chest PA and Lateral", "Positive TB test", "None.", "Clear lungs.", "Normal.")
    lines = text.splitlines()
    assert lines[0].strip() == "FINAL REPORT"
    assert all(line.startswith(" ") for line in lines)
    assert " FINDINGS: \n \n Clear lungs.\n" in text
    assert text.endswith(" IMPRESSION: \n \n Normal.\n")
    assert "INDICATION:  Positive TB test" in text


def test_iu_split_is_deterministic_and_patient_level():
    ids = list(range(1, 4001))
    a, b = iu_split(ids, seed=0), iu_split(ids[::-1], seed=0)[::-1]
    assert a == b  # a uid's split does not depend on the other rows
    counts = Counter(a)
    assert abs(counts["train"] / 4000 - 0.7) < 0.03 and abs(counts["test"] / 4000 - 0.2) < 0.03
    assert iu_split(ids, seed=1) != a


def iu_inputs(root: Path):
    root.mkdir(parents=True)
    reports = write_csv(
        root / "indiana_reports.csv",
        ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"],
        [
            [
                1,
                "normal",
                "normal",
                "Xray Chest PA and Lateral",
                "Positive TB test",
                "None.",
                "Clear\nlungs.",
                "Normal.",
            ],
            [2, "", "", "Chest 2 views", "", "", "", ""],  # nothing to report
            [3, "", "", "Chest", "", "", "", "No acute disease."],  # no images
            [3, "", "", "Chest", "", "", "Again.", "Again."],  # duplicate uid
            ["x4", "", "", "Chest", "", "", "Text.", "Text."],  # unreadable uid
        ],
    )
    projections = write_csv(
        root / "indiana_projections.csv",
        ["uid", "filename", "projection"],
        [
            [1, "1_IM-0001-4001.dcm.png", "Frontal"],
            [1, "1_IM-0001-3001.dcm.png", "Lateral"],
            [2, "2_IM-0652-1001.dcm.png", "Frontal"],
            [9, "9_IM-9-1.dcm.png", "Frontal"],
        ],
    )
    return reports, projections


def test_iu_bad_rows(tmp_path):
    reports, projections = iu_inputs(tmp_path / "iu")
    out = tmp_path / "out"
    result = ingest_iu(reports, projections, out / "s.parquet", out / "i.parquet", out / "r.parquet")
    tables = {k: pq.read_table(out / f"{k[0]}.parquet") for k in ("studies", "images", "rejects")}
    check_contract(result, tables)
    study = tables["studies"].to_pylist()
    assert [s["study_id"] for s in study] == [1]
    assert "Clear lungs." in study[0]["report"]
    assert study[0]["source_path"] == "indiana_reports.csv#uid=1"
    assert Counter(tables["rejects"]["reason"].to_pylist()) == Counter(
        {"empty_report": 1, "no_metadata": 1, "duplicate_study": 1, "bad_id": 1, "no_report": 1}
    )
    images = tables["images"].to_pylist()
    assert [(i["dicom_id"], i["view_position"], i["view_code_meaning"]) for i in images] == [
        ("1_IM-0001-3001", "LATERAL", "lateral"),
        ("1_IM-0001-4001", "PA", "frontal"),
    ]
    assert images[0]["image_path"] == "1_IM-0001-3001.dcm.png"


def test_iu_command_line_writes_what_the_in_process_call_writes(tmp_path):
    """The job's __main__ keeps pandas out of pyarrow for MIMIC only: IU's tables are pandas frames, and a
    pyarrow that took them for plain sequences would write other types (or fail)."""
    reports, projections = iu_inputs(tmp_path / "iu")
    ingest_iu(
        reports, projections, *(tmp_path / "a" / f"{k}.parquet" for k in ("studies", "images", "rejects"))
    )
    outputs = [tmp_path / "b" / f"{k}.parquet" for k in ("studies", "images", "rejects")]
    cmd = [sys.executable, "-m", "workflow.ingest", "iu", "--reports", str(reports), "--projections",
           str(projections), "--studies", str(outputs[0]), "--images", str(outputs[1]), "--rejects",
           str(outputs[2])]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    for k, path in zip(("studies", "images", "rejects"), outputs, strict=True):
        assert pq.read_table(path).equals(pq.read_table(tmp_path / "a" / f"{k}.parquet")), k


@pytest.mark.skipif(not IU_DIR.is_dir(), reason="IU X-Ray reports not available")
def test_iu_real_files(tmp_path):
    out = tmp_path / "out"
    result = main(
        [
            "iu",
            "--reports",
            str(IU_DIR / "indiana_reports.csv"),
            "--projections",
            str(IU_DIR / "indiana_projections.csv"),
            "--studies",
            str(out / "s.parquet"),
            "--images",
            str(out / "i.parquet"),
            "--rejects",
            str(out / "r.parquet"),
        ]
    )
    tables = {k: pq.read_table(out / f"{k[0]}.parquet") for k in ("studies", "images", "rejects")}
    check_contract(result, tables)
    n_reports = sum(1 for _ in csv.reader((IU_DIR / "indiana_reports.csv").open())) - 1
    assert result.n_in == n_reports
    assert tables["studies"].num_rows > 0.95 * n_reports
    # Every rejected study is an IU row with neither findings nor impression.
    assert set(tables["rejects"]["reason"].to_pylist()) <= {"empty_report"}
    splits = Counter(tables["studies"]["split"].to_pylist())
    assert splits["train"] > splits["test"] > splits["validate"] > 0
    # Subject ids are per study, so the split is patient-disjoint by construction.
    views = set(tables["images"]["view_position"].to_pylist())
    assert views <= {"PA", "LATERAL", ""}
    studies_with_images = set(tables["images"]["study_id"].to_pylist())
    assert studies_with_images == set(tables["studies"]["study_id"].to_pylist())


def test_missing_iu_input_names_the_config_key(tmp_path):
    reports, projections = iu_inputs(tmp_path / "iu")
    shutil.move(projections, tmp_path / "gone.csv")
    with pytest.raises(InputError, match=r"corpus\.iu\.projections"):
        ingest_iu(reports, projections, tmp_path / "s", tmp_path / "i", tmp_path / "r")


def test_fast_central_directory_matches_zipfile_on_zip64_and_prefixed_archives(tmp_path):
    # More than 65,535 members forces the ZIP64 end record, as in the real mimic-cxr-reports.zip.
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as zf:
        for i in range(66_000):
            zf.writestr(f"files/p10/p1{i:07d}/s5{i:07d}.txt", b"")
    assert b"PK\x06\x06" in big.read_bytes()[-200:]
    names, table = central_directory(str(big))
    ref_names, ref_table = zipfile_directory(str(big))
    assert names == ref_names and (table == ref_table).all()

    # Bytes prepended to an archive (self-extractor style) shift every offset.
    corpus = clean_corpus(tmp_path / "corpus")
    prefixed = tmp_path / "prefixed.zip"
    prefixed.write_bytes(b"#!/bin/sh\nexit 0\n" + corpus.zip.read_bytes())
    names, table = central_directory(str(prefixed))
    ref_names, ref_table = zipfile_directory(str(prefixed))
    assert names == ref_names and (table == ref_table).all()
    _, plain = run(tmp_path, corpus, corpus.zip, "plain")
    _, shifted = run(tmp_path, corpus, prefixed, "prefixed")
    assert plain["studies"]["report"].equals(shifted["studies"]["report"])


def test_vectorised_central_directory_matches_the_one_by_one_walk_and_zipfile(tmp_path):
    # Names with and without the UTF-8 flag, a symlink entry, comments and extra fields, and a name
    # holding the entry signature itself (which must send the reader back to the one-by-one walk).
    def archive(path, names):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, name in enumerate(names):
                info = zipfile.ZipInfo(name)
                info.comment = b"c" * i
                info.extra = b"\xfe\xca\x02\x00ab" if i % 2 else b""
                if i == 2:
                    info.create_system = 3
                    info.external_attr = 0o120777 << 16
                zf.writestr(info, f"report {i}\n")
        return str(path)

    plain = ["files/p10/p10000001/s50000001.txt", "files/p10/p10000001/s5000000\u00e9.txt", "link", "README"]
    hostile = [*plain, "files/p10/PK\x01\x02/s50000009.txt"]
    for path in (archive(tmp_path / "a.zip", plain), archive(tmp_path / "b.zip", hostile)):
        names, table = central_directory(path)
        ref_names, ref_table = zipfile_directory(path)
        assert names == ref_names and (table == ref_table).all()
    # The plain archive is read without the walk; the hostile one through it.
    for name, n_entries, vectorised in (("a.zip", 4, True), ("b.zip", 5, False)):
        with zipfile.ZipFile(tmp_path / name) as zf:
            start = zf.start_dir
        data = (tmp_path / name).read_bytes()
        cd = data[start : data.rindex(b"PK\x05\x06")]
        fast = sources._entries_vectorised(cd, n_entries, 0)
        assert (fast is not None) == vectorised
        if fast is not None:
            walked = sources._entries_one_by_one(cd, n_entries, 0)
            assert fast[0] == walked[0] and (fast[1] == walked[1]).all()
    assert table[names.index("link"), 5] & sources.SYMLINK_FLAG


def test_unreadable_zip_is_a_clear_error(tmp_path):
    corpus = clean_corpus(tmp_path / "corpus")
    corpus.zip.write_bytes(corpus.zip.read_bytes()[:100])
    with pytest.raises(InputError, match="not a readable zip"):
        run(tmp_path, corpus, corpus.zip)


@pytest.mark.skipif(not IU_DIR.is_dir(), reason="IU X-Ray reports not available")
def test_iu_reports_section_back_to_their_fields(tmp_path):
    """The rebuilt MIMIC-style text gives each IU field back through the MIT-compatible sectioner."""
    out = tmp_path / "out"
    ingest_iu(
        IU_DIR / "indiana_reports.csv",
        IU_DIR / "indiana_projections.csv",
        out / "s.parquet",
        out / "i.parquet",
        out / "r.parquet",
    )
    reports = {int(r["uid"]): r for r in csv.DictReader((IU_DIR / "indiana_reports.csv").open())}
    studies = pq.read_table(out / "s.parquet", columns=["study_id", "report"]).to_pylist()
    for study in studies:
        raw = reports[study["study_id"]]
        parsed = sections.split_report(study["report"])
        for field in ("indication", "comparison", "findings", "impression"):
            expected = " ".join(raw[field].split()) or None
            assert parsed[field] == expected, (study["study_id"], field)


def test_a_reports_folder_without_reports_is_a_clear_error(tmp_path):
    corpus = clean_corpus(tmp_path / "corpus")
    jpg_tree = tmp_path / "mimic-cxr-jpg" / "files" / "p10" / "p10000032" / "s50414267"
    jpg_tree.mkdir(parents=True)
    (jpg_tree / "x.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(InputError, match=r"corpus\.mimic\.reports.*no report files"):
        run(tmp_path, corpus, tmp_path / "mimic-cxr-jpg" / "files")
