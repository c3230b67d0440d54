"""The synthetic MIMIC-CXR corpus: layout, ids, split, truth, labels, and coverage of the parser branches."""

from __future__ import annotations

import ast
import csv
import gzip
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tools import synth
from workflow.sections import split_report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
DEMO_ARGS = {"studies": 300, "patients": 100, "seed": 0}  # how data/demo was made (see README)
REPORT_RE = re.compile(r"^files/(p1\d)/(p1\d{7})/s(5\d{7})\.txt$")
DICOM_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def _make(out: Path, **kw) -> Path:
    args = {"studies": 200, "patients": 60, "seed": 3} | kw
    synth.generate(synth.Options(out, **args))
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def _reports(root: Path) -> dict[str, str]:
    """Report files the way MIT's traversal sees them: files/p??/p*/s*.txt."""
    out = {}
    for group in (root / "files").iterdir():
        if not (group.is_dir() and group.name.startswith("p") and len(group.name) == 3):
            continue
        for patient in group.iterdir():
            if not (patient.is_dir() and patient.name.startswith("p")):
                continue
            for f in patient.iterdir():
                if f.is_file() and f.name.startswith("s") and f.name.endswith(".txt"):
                    out[f.relative_to(root).as_posix()] = f.read_text(encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("synth"))


def test_same_seed_same_bytes_other_seed_other_corpus(corpus, tmp_path):
    again = _make(tmp_path / "again")
    other = _make(tmp_path / "other", seed=4)
    for f in sorted(corpus.rglob("*")):
        if f.is_file():
            rel = f.relative_to(corpus)
            assert (again / rel).read_bytes() == f.read_bytes(), rel
    assert _reports(other) != _reports(corpus)


def _content(root: Path, name: str):
    """A corpus file's content, independent of the compressor's build (zlib versions differ in bytes)."""
    path = root / name
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def test_committed_demo_is_what_the_generator_writes(tmp_path):
    fresh = _make(tmp_path / "demo", **DEMO_ARGS)
    for name in (
        "mimic-cxr-reports.zip",
        "mimic-cxr-2.0.0-split.csv.gz",
        "mimic-cxr-2.0.0-metadata.csv.gz",
        "mimic-cxr-2.0.0-chexpert.csv.gz",
        "cxr-study-list.csv.gz",
        "truth.parquet",
        "truth_studies.parquet",
    ):
        assert _content(DEMO, name) == _content(fresh, name), f"data/demo/{name} is stale: run `make demo`"
    assert _reports(DEMO) == _reports(fresh), "data/demo/files is stale: run `make demo`"


def test_layout_ids_and_metadata(corpus):
    reports = _reports(corpus)
    assert len(reports) >= 190
    for rel in reports:
        m = REPORT_RE.match(rel)
        assert m, rel
        assert m.group(2)[:3] == m.group(1)
    meta = _csv(corpus / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta[0]) == synth.METADATA_COLUMNS
    for row in meta:
        assert DICOM_RE.match(row["dicom_id"])
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert 2100 <= int(row["StudyDate"][:4]) <= 2200 and len(row["StudyDate"]) == 8
        t = float(row["StudyTime"])
        assert 0 <= t < 240000 and int(t) % 100 < 60 and int(t) // 100 % 100 < 60
        assert row["ViewPosition"] in synth.VIEW_MEANING
    assert len({r["dicom_id"] for r in meta}) == len(meta)
    views = {r["ViewPosition"] for r in meta}
    assert {"PA", "AP", "LATERAL", ""} <= views
    # frontal + often lateral; some studies lack a frontal, some lack a lateral
    by_study = defaultdict(set)
    for r in meta:
        by_study[r["study_id"]].add(r["ViewPosition"])
    assert 1.4 < len(meta) / len(by_study) < 1.9
    assert any(not v & {"PA", "AP"} for v in by_study.values())
    assert any(not v & {"LATERAL", "LL"} for v in by_study.values())
    # distractors are in the tree but not among the reports
    assert (corpus / "files" / "README").exists() and (corpus / "files" / "p1").is_dir()
    assert not any("/p1/" in r or "x10" in r for r in reports)


def test_zip_holds_exactly_the_tree(corpus):
    with zipfile.ZipFile(corpus / "mimic-cxr-reports.zip") as zf:
        infos = zf.infolist()
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
        members = {i.filename: zf.read(i).decode("utf-8") for i in infos}
    assert members == _reports(corpus)


def test_split_is_patient_disjoint_with_all_three_splits(corpus, tmp_path):
    for root in (corpus, _make(tmp_path / "tiny", studies=12, patients=5)):
        rows = _csv(root / "mimic-cxr-2.0.0-split.csv.gz")
        by_subject = defaultdict(set)
        for r in rows:
            by_subject[r["subject_id"]].add(r["split"])
        assert all(len(s) == 1 for s in by_subject.values())
        assert {s for v in by_subject.values() for s in v} == {"train", "validate", "test"}
    studies = pq.read_table(corpus / "truth_studies.parquet").to_pandas()
    share = studies.split.value_counts(normalize=True)
    assert share["train"] > 0.9


def test_truth_uses_only_the_canonical_vocabulary(corpus):
    vocab = yaml.safe_load((ROOT / "libs" / "vocabulary.yaml").read_text())
    truth = pq.read_table(corpus / "truth.parquet").to_pandas()
    assert len(truth) > 500
    assert set(truth.name) <= set(vocab["findings"])
    assert set(truth.presence) == set(vocab["presence"])
    assert set(truth.level.dropna()) <= set(vocab["level"])
    assert set(truth.type.dropna()) <= set(vocab["type"])
    assert set(truth.change.dropna()) <= set(vocab["change"])
    assert set(truth.section) <= {"findings", "impression", "last_paragraph"}
    loc = vocab["location"]
    tokens = re.compile(
        rf"^(?:({'|'.join(loc['laterality'])}) ?)?(?:({'|'.join(loc['zone'])}) ?)?({'|'.join(loc['structure'])})?$"
    )
    for value in truth.location.dropna().unique():
        assert tokens.match(value) and value.strip() == value, value


def test_truth_sentences_sit_in_their_parsed_section_and_state_their_attributes(corpus):
    truth = pq.read_table(corpus / "truth.parquet").to_pandas()
    studies = pq.read_table(corpus / "truth_studies.parquet").to_pandas().set_index("study_id")
    texts = {int(REPORT_RE.match(k).group(3)): v for k, v in _reports(corpus).items()}
    for row in truth.itertuples():
        sections = split_report(texts[row.study_id])  # the pipeline's own parser
        assert " ".join(row.sentence.split()) in " ".join(sections[row.section].split())
        s = row.sentence.lower()
        if isinstance(row.level, str) and row.name != "tortuous aorta":
            words = synth.LEVEL_WORDS["size"].get(row.level, []) + synth.LEVEL_WORDS["severity"].get(
                row.level, []
            )
            assert any(w in s for w in words) or synth.LEVEL_ADVERBS.get(row.level, "#") in s, row
        if isinstance(row.location, str) and row.name != "support device":
            pre, post = synth.LOCATION_WORDS.get(row.location, ([], []))
            surfaces = pre + post + synth.LATERALITY_INSERT.get(row.location, [])
            assert any(x.strip() in s for x in surfaces), row
        assert not isinstance(studies.loc[row.study_id, "bad"], str)
    # indication text names findings but never reaches the truth
    assert not truth.sentence.str.contains(r"\?").any()


def test_chexpert_labels_follow_the_truth_of_the_conclusion(corpus):
    truth = pq.read_table(corpus / "truth.parquet").to_pandas()
    studies = pq.read_table(corpus / "truth_studies.parquet").to_pandas()
    labels = {int(r["study_id"]): r for r in _csv(corpus / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    good = studies[studies.bad.isna()]
    assert set(labels) == set(good.study_id)
    value = {"positive": 1.0, "uncertain": -1.0, "negative": 0.0}
    rank = {1.0: 3, -1.0: 2, 0.0: 1}
    seen = set()
    for st in good.itertuples():
        rows = truth[(truth.study_id == st.study_id) & (truth.section == st.conclusion_section)]
        expect: dict[str, float] = {}
        for r in rows.itertuples():
            label = synth.CHEXPERT_OF.get(r.name)
            if label and (label not in expect or rank[value[r.presence]] > rank[expect[label]]):
                expect[label] = value[r.presence]
        if not any(v != 0.0 for k, v in expect.items() if k != "Support Devices"):
            expect["No Finding"] = 1.0
        got = {
            k: float(v) for k, v in labels[st.study_id].items() if k not in ("subject_id", "study_id") and v
        }
        assert got == expect, st.study_id
        seen.update(got.values())
    assert seen == {1.0, 0.0, -1.0}


def test_every_section_parser_branch_is_in_the_demo():
    studies = pq.read_table(DEMO / "truth_studies.parquet").to_pandas()
    texts = {int(REPORT_RE.match(k).group(3)): v for k, v in _reports(DEMO).items()}
    headers = {h for hs in studies.headers for h in hs}
    wanted = [h for hs in synth.HEADER_ALIASES.values() for h in hs]
    wanted += [h for hs in synth.HEADER_SUBSTRING.values() for h in hs]
    wanted += synth.HEADER_WHOLE_STUDY + synth.HEADER_UNMAPPED + ["NDICATION", "CHEST, PA LATERAL", "NOTE"]
    assert set(wanted) - headers == set()
    assert set(studies.report_type) == set("ABCDEFG")
    assert set(studies.conclusion_section.dropna()) == {
        "impression",
        "findings",
        "last_paragraph",
        "comparison",
    }
    assert studies.conclusion_section.isna().any()

    def one(feature: str) -> str:
        ids = studies[studies.features.apply(lambda f: feature in f)].study_id
        assert len(ids), feature
        return texts[int(ids.iloc[0])]

    names = lambda text: synth.mit_sections(text)[0]  # noqa: E731
    swallowed = split_report(one("swallow"))
    assert swallowed["findings"].startswith("IMPRESSION:") and swallowed["impression"] is None
    assert "note" in names(one("note_false_header"))
    assert names(one("dup_impression")).count("impression") == 2
    assert len(re.findall(r"\n FINDINGS: \n FINDINGS:", one("dup_findings_empty"))) == 1
    assert "\nIMPRESSION:" in one("no_leading_space")
    assert "\nFindings:" in one("lowercase_header")
    assert " ADDENDUM 1:" in one("digit_header") and "addendum" not in names(one("digit_header"))
    wet = one("wet_read")
    assert "wet read" in names(wet) and wet.count("FINAL REPORT") == 2 and "_" * 78 in wet
    assert "\n NDICATION:" in one("ndication")
    assert "\n CHEST, PA LATERAL: \n" in one("empty_title")
    assert re.search(r"\n 1\.  ", one("numbered_impression"))
    assert "In comparison with the study of ___" in "".join(texts.values())
    assert re.search(r"at \d{1,2}:\d\d [AP]M", one("communication"))
    # MIT's special studies: the named section exists, the slice fits
    specials = studies[studies.features.apply(lambda f: any(x.startswith("custom_") for x in f))]
    assert len(specials) >= 6
    for st in specials.itertuples():
        feature = next(x for x in st.features if x.startswith("custom_"))
        kind, _, arg = feature.partition(":")
        if kind == "custom_section_names":
            assert arg in names(texts[st.study_id])
        else:
            assert len(texts[st.study_id]) >= int(arg.split(":")[1])
    # the bad inputs the ingest must reject
    assert set(studies.bad.dropna()) == {"empty_report", "no_report", "no_metadata"}
    meta_ids = {int(r["study_id"]) for r in _csv(DEMO / "mimic-cxr-2.0.0-metadata.csv.gz")}
    for st in studies[studies.bad.notna()].itertuples():
        if st.bad == "empty_report":
            assert texts[st.study_id] == "" and st.study_id in meta_ids
        elif st.bad == "no_report":
            assert st.study_id not in texts and st.study_id in meta_ids
        else:
            assert texts[st.study_id] and st.study_id not in meta_ids


def test_reports_follow_mimic_line_conventions(corpus):
    studies = pq.read_table(corpus / "truth_studies.parquet").to_pandas().set_index("study_id")
    for rel, text in _reports(corpus).items():
        if not text:
            continue
        assert "\r" not in text and text.endswith("\n")
        assert text.startswith(" " * 33 + "FINAL REPORT\n")
        features = studies.loc[int(REPORT_RE.match(rel).group(3)), "features"]
        for line in text.split("\n")[:-1]:
            assert len(line) <= 79, (rel, line)
            if not line.startswith(" "):
                assert {"no_leading_space", "lowercase_header"} & set(features), (rel, line)
            assert line.strip() or line == " ", (rel, repr(line))


def test_small_corpora_and_bad_arguments(tmp_path):
    out = _make(tmp_path / "one", studies=3, patients=3, seed=1)
    assert len(_reports(out)) == 3
    with pytest.raises(ValueError):
        synth.generate(synth.Options(tmp_path / "x", studies=2, patients=3))


def test_cli_writes_without_tree_or_zip(tmp_path):
    synth.main(["--out", str(tmp_path / "c"), "--studies", "20", "--patients", "8", "--no-tree", "--no-zip"])
    assert not (tmp_path / "c" / "files").exists() and not (tmp_path / "c" / "mimic-cxr-reports.zip").exists()
    assert len(_csv(tmp_path / "c" / "mimic-cxr-2.0.0-chexpert.csv.gz")) >= 17


def test_worker_processes_write_the_same_corpus(corpus, tmp_path):
    pooled = _make(tmp_path / "pooled", jobs=2)
    for name in (
        "mimic-cxr-reports.zip",
        "mimic-cxr-2.0.0-metadata.csv.gz",
        "truth.parquet",
        "truth_studies.parquet",
    ):
        assert (pooled / name).read_bytes() == (corpus / name).read_bytes(), name
    assert _reports(pooled) == _reports(corpus)


def test_generator_parser_agrees_with_the_pipeline_parser(corpus):
    """The truth is placed with synth.mit_sections; the sections stage must see the same four MIT fields."""
    for text in _reports(corpus).values():
        if not text:
            continue
        ours = synth.last_sections(text)
        theirs = split_report(text)
        for name in ("impression", "findings", "last_paragraph", "comparison"):
            assert (ours[name].strip() if name in ours else None) == theirs[name], name


def test_no_accidental_headers_in_wrapped_text(corpus):
    """Only the headers the generator means to write match MIT's header regex (wrapping never makes one)."""
    studies = pq.read_table(corpus / "truth_studies.parquet").to_pandas()
    known = {h for hs in synth.HEADER_ALIASES.values() for h in hs}
    known |= {h for hs in synth.HEADER_SUBSTRING.values() for h in hs}
    known |= (
        set(synth.HEADER_WHOLE_STUDY)
        | set(synth.HEADER_UNMAPPED)
        | {"NDICATION", "CHEST, PA LATERAL", "NOTE"}
    )
    assert {h for hs in studies.headers for h in hs} <= known


def test_the_pipeline_never_imports_the_tools():
    """tools/ (this generator, the tiny model) serves tests and the demo: a pipeline run must not need it."""
    offenders = []
    for path in sorted((ROOT / "workflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "tools"
            ]
    for path in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        text = path.read_text()
        offenders += [
            f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"(?:from|import|-m) tools\b\S*", text)
        ]
    assert not offenders
