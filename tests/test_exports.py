"""Exports: R2Gen cleaners, R2GenGPT/MeGPT annotation.json (MIMIC and IU X-Ray), RaDialog RG/INS."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from workflow_run import stage_outputs

from workflow.contract import FINDINGS, IMAGES, SECTIONS, STUDIES
from workflow.exports import build, r2gen, radialog
from workflow.exports.cleaners import clean_iu, clean_mimic
from workflow.tables import read_table, write_table

IU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray"


# --- cleaners ---------------------------------------------------------------------------------------------


def test_mimic_cleaner():
    assert (
        clean_mimic("The lungs are clear. Heart size is normal.")
        == "the lungs are clear . heart size is normal ."
    )
    # newlines, list numbers, ':' spacing, 1.5 -> 15, brackets and underscores removed
    got = clean_mimic("FINDINGS:\n 1. Nodule of 1.5 cm (stable).  2. No ___ effusion..")
    assert got == "findings : nodule of 15 cm stable . no  effusion ."
    assert clean_mimic("") == " ."
    # empty sentences are kept (the original's filter is always true)
    assert clean_mimic("Clear. . Normal.") == "clear .  . normal ."


def test_iu_cleaner_character_range_quirk():
    assert (
        clean_iu("The lungs are clear. Bony structures are intact.")
        == "the lungs are clear . bony structures are intact ."
    )
    # ':-\[' is a range: ':;<=>?@' are removed, the hyphen survives, no ':' spacing, newlines kept
    assert clean_iu("Heart: normal; <x> =y ?z @ T-spine") == "heart normal x y z  t-spine ."


# --- inputs -----------------------------------------------------------------------------------------------

REPORTS = {
    # study: (subject, split, findings, impression, images [(dicom, view)], findings rows)
    501: (
        1,
        "train",
        "Moderate cardiomegaly. Small left pleural effusion. ET tube in place.",
        "Cardiomegaly and effusion.",
        [("i501a", "PA"), ("i501b", "LATERAL")],
        [
            ("cardiomegaly", "positive", 0),
            ("pleural effusion", "positive", 23),
            ("support device", "positive", 53),
        ],
    ),
    502: (
        2,
        "train",
        # braces, quotes, a backslash and a non-ASCII letter: JSON escapes them, templates ignore them
        'The lungs are clear. No pleural effusion. Odd text {findings} and {0} braces }{. A "quote", \\ and café.',
        None,
        [("i502", "PA")],
        [("pleural effusion", "negative", 22)],
    ),
    503: (
        3,
        "train",
        "Possible right lower lobe pneumonia.",
        "Possible pneumonia.",
        [("i503", "AP")],
        [("pneumonia", "uncertain", 9)],
    ),
    504: (
        4,
        "validate",
        "Heart size is normal.",
        "Normal.",
        [("i504", "PA"), ("i504l", "LATERAL")],
        [("cardiomegaly", "negative", 0)],
    ),
    505: (5, "test", None, "No acute process.", [("i505", "PA")], []),
    506: (
        6,
        "train",
        "Right upper lobe nodule. Mild pulmonary edema.",
        "Edema.",
        [("i506", "PA")],
        [("nodule", "positive", 0), ("edema", "positive", 25)],
    ),
}


def write_inputs(tmp_path: Path, reports=REPORTS) -> dict[str, Path]:
    st = {n: [] for n in STUDIES.names}
    im = {n: [] for n in IMAGES.names}
    sec = {n: [] for n in SECTIONS.names}
    fnd = {n: [] for n in FINDINGS.names}
    for study, (subject, split, findings, impression, images, rows) in reports.items():
        for k, v in (
            ("subject_id", subject),
            ("study_id", study),
            ("split", split),
            ("study_datetime", None),
            ("report", "x"),
            ("source_path", "x"),
        ):
            st[k].append(v)
        for name in SECTIONS.names:
            sec[name].append(
                {
                    "subject_id": subject,
                    "study_id": study,
                    "findings": findings,
                    "impression": impression,
                }.get(name)
            )
        for dicom, view in images:
            for k, v in (
                ("dicom_id", dicom),
                ("subject_id", subject),
                ("study_id", study),
                ("split", split),
                ("view_position", view),
                ("view_code_meaning", ""),
                ("image_path", f"files/p10/p{subject}/s{study}/{dicom}.jpg"),
            ):
                im[k].append(v)
        for name, presence, start in rows:
            row = dict.fromkeys(FINDINGS.names)
            row.update(
                subject_id=subject,
                study_id=study,
                name=name,
                presence=presence,
                section="findings",
                start=start,
                end=start + 5,
                source="rules",
            )
            for k in FINDINGS.names:
                fnd[k].append(row[k])
    paths = {}
    for name, data, schema in (
        ("studies", st, STUDIES),
        ("images", im, IMAGES),
        ("sections", sec, SECTIONS),
        ("findings", fnd, FINDINGS),
    ):
        paths[name] = tmp_path / f"{name}.parquet"
        write_table(pa.Table.from_pydict(data, schema=schema), paths[name], schema)
    return paths


def frames(paths):
    return {k: read_table(p).to_pandas() for k, p in paths.items()}


def run_exports(inputs: dict[str, Path], outdir: Path, *options: str) -> dict[str, Path]:
    """The whole stage in one process (``python -m workflow.exports``), with the rules' file names."""
    outputs = stage_outputs("exports", outdir)
    build.main([*build.rule_args({**inputs, **outputs}), *options])
    return outputs


# --- R2Gen annotation -------------------------------------------------------------------------------------


def test_mimic_annotation_shape(tmp_path):
    f = frames(write_inputs(tmp_path))
    ann = r2gen.mimic_annotation(f["studies"], f["images"], f["sections"])
    assert list(ann) == ["train", "val", "test"]
    items = [it for v in ann.values() for it in v]
    # one item per image of every study with findings (505 has none)
    assert sorted(it["id"] for it in items) == ["i501a", "i501b", "i502", "i503", "i504", "i504l", "i506"]
    for it in items:
        assert set(it) == {"id", "study_id", "subject_id", "report", "image_path", "split"}
        assert isinstance(it["image_path"], list) and len(it["image_path"]) == 1
        assert it["image_path"][0] == f"p10/p{it['subject_id']}/s{it['study_id']}/{it['id']}.jpg"
    assert {it["id"] for it in ann["val"]} == {"i504", "i504l"} and ann["test"] == []
    first = next(it for it in items if it["id"] == "i501a")
    assert first["report"] == REPORTS[501][2]
    both = r2gen.mimic_annotation(f["studies"], f["images"], f["sections"], "findings_impression", clean=True)
    first = next(it for it in both["train"] if it["id"] == "i501a")
    assert first["report"] == clean_mimic(REPORTS[501][2] + " " + REPORTS[501][3])


def test_streamed_annotation_is_the_json_document(tmp_path):
    """The rule writes annotation.json a chunk of items at a time: the same characters as json.dumps of
    the whole annotation, an empty split included; chunks out of split order are refused."""
    import io

    f = frames(write_inputs(tmp_path))
    whole = r2gen.mimic_annotation(f["studies"], f["images"], f["sections"], "findings_impression")
    assert whole["test"] == [] and len(whole["train"]) > 2
    buf = io.StringIO()
    columns = r2gen.mimic_columns(f["studies"], f["images"], f["sections"], "findings_impression", chunk=2)
    counts = r2gen.write_annotation(((c.split, r2gen.item_dicts(c)) for c in columns), buf)
    assert buf.getvalue() == json.dumps(whole, ensure_ascii=False)
    # the items as JSON texts, made without the dicts (the rule's way): the same characters
    buf = io.StringIO()
    columns = r2gen.mimic_columns(f["studies"], f["images"], f["sections"], "findings_impression", chunk=2)
    assert r2gen.write_annotation(((c.split, r2gen.item_json(c)) for c in columns), buf) == counts
    assert buf.getvalue() == json.dumps(whole, ensure_ascii=False)
    assert counts == {split: len(items) for split, items in whole.items()}
    with pytest.raises(ValueError, match="out of split order"):
        r2gen.write_annotation([("val", whole["val"]), ("train", whole["train"])], io.StringIO())


def test_iu_annotation_constructed(tmp_path):
    f = frames(write_inputs(tmp_path))
    ann = r2gen.iu_annotation(f["studies"], f["images"], f["sections"])
    items = [it for v in ann.values() for it in v]
    # only studies with findings and two images; the frontal first
    assert [len(it["image_path"]) for it in items] == [2, 2]
    assert [it["image_path"][0].rsplit("/", 1)[1] for it in items] == ["i501a.jpg", "i504.jpg"]
    assert r2gen.iu_id("2384_IM-0942-1001.dcm") == "CXR2384_IM-0942"
    assert r2gen.iu_id("21_IM-0729-1001-0001.dcm") == "CXR21_IM-0729"
    # the rule writes it with the MIMIC writer: the characters of json.dumps
    import io

    buf = io.StringIO()
    r2gen.write_annotation(ann.items(), buf)
    assert buf.getvalue() == json.dumps(ann, ensure_ascii=False)


@pytest.mark.skipif(not (IU_DIR / "indiana_reports.csv").exists(), reason="IU X-Ray reports not available")
def test_iu_annotation_matches_r2gen_item_set(tmp_path):
    from workflow import sections
    from workflow.ingest.iu import ingest_iu

    ingest_iu(
        IU_DIR / "indiana_reports.csv",
        IU_DIR / "indiana_projections.csv",
        tmp_path / "s.parquet",
        tmp_path / "i.parquet",
        tmp_path / "r.parquet",
    )
    sections.run(
        tmp_path / "s.parquet",
        tmp_path / "sec.parquet",
        tmp_path / "mit.csv",
        tmp_path / "rj.parquet",
        workers=1,
    )
    f = {k: read_table(tmp_path / f"{k}.parquet").to_pandas() for k in ("s", "i", "sec")}
    ann = r2gen.iu_annotation(f["s"], f["i"], f["sec"], clean=True)
    items = [it for v in ann.values() for it in v]
    # R2Gen's IU annotation: every uid with findings and >= 2 images, 2,955 items of 2 images each
    assert len(items) == 2955
    assert all(len(it["image_path"]) == 2 for it in items)
    assert len({it["id"] for it in items}) == 2955
    assert all(re.fullmatch(r"CXR\d+_IM-\d+", it["id"]) for it in items)
    assert all(it["report"].endswith(" .") and it["report"] == it["report"].lower() for it in items)


# --- RaDialog ---------------------------------------------------------------------------------------------


def test_safe_templating():
    assert (
        radialog.fill("Findings: {findings}.", findings="a {label} b {0} }{")
        == "Findings: a {label} b {0} }{."
    )
    with pytest.raises(KeyError):
        radialog.fill("{unknown}")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 2**16 + 1, 2**31 + 5, 2**32 - 1, 2**32, 2**40 + 3])
def test_bulk_draws_are_random_randrange(n):
    """The builders' bulk draws are random.Random's own: the same values and the generator left in the
    same state (n past 32 bits: drawn one at a time), for counts up to past a batch's rejections."""
    import random

    for count in (0, 1, 5, 1000):
        ours, reference = random.Random(f"draws:{n}"), random.Random(f"draws:{n}")
        assert radialog.randbelow_many(ours, n, count) == [reference.randrange(n) for _ in range(count)]
        assert ours.getstate() == reference.getstate()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 100, 4097])
def test_shuffle_is_random_shuffle(size):
    import random

    ours, reference = list(range(size)), list(range(size))
    rng, reference_rng = random.Random(size), random.Random(size)
    radialog.shuffle(rng, ours)
    reference_rng.shuffle(reference)
    assert ours == reference and rng.getstate() == reference_rng.getstate()


def test_sentence_spans_are_the_pieces_between_sentence_ends():
    """sentence_spans finds the ends from their end mark on: the non-blank pieces between the matches of
    _SENTENCE_END (abbreviations, list numbers, several spaces and newlines between sentences)."""
    import random

    from workflow.rg4.rewrite import _SENTENCE_END

    def by_end_pattern(text):
        bounds = [0, *(x for m in _SENTENCE_END.finditer(text) for x in (m.start(), m.end())), len(text)]
        pairs = zip(bounds[::2], bounds[1::2], strict=True)
        return [(a, b) for a, b in pairs if text[a:b].strip()]

    rng = random.Random(0)
    pieces = ["Dr. X", "1. A", "No. 2 tube", "12. B", "e.g. C", "a.m. D", "(E) F", "x", "Y", "?", "!", "."]
    texts = ["", " ", "A. B.", "\n 1. Lungs clear.  Heart normal! "] + [
        "".join(rng.choice([*pieces, " ", "  ", "\n", ". "]) for _ in range(rng.randint(1, 12)))
        for _ in range(5000)
    ]
    for text in texts:
        assert radialog.sentence_spans(text) == by_end_pattern(text), repr(text)


def test_continuation_extends_the_conversation():
    turns = [("first {x} question", "a reply }{")]
    before = radialog.conversation("system", [*turns, ("second", None)])
    after = radialog.conversation("system", [*turns, ("second", "its reply"), ("third", None)])
    assert after == before + radialog.continuation("its reply", "third")


def test_chexpert_labels_from_canonical_findings(tmp_path):
    f = frames(write_inputs(tmp_path))
    prompts = radialog.load_prompts()
    positives, uncertain = radialog.chexpert_labels(f["findings"], prompts)
    assert positives[501] == ["Cardiomegaly", "Pleural Effusion", "Support Devices"]  # RaDialog's label order
    assert positives[506] == ["Lung Lesion", "Edema"]
    assert uncertain[503] == {"Pneumonia"}
    assert radialog.with_no_finding([], set()) == ["No Finding"]
    assert radialog.with_no_finding(["Support Devices"], set()) == ["No Finding", "Support Devices"]
    assert radialog.with_no_finding([], {"Pneumonia"}) == []  # only uncertain: "no common findings"
    assert radialog.findings_slot([], prompts) == "no common findings"


def big_corpus(n=120):
    """Many train studies: every third normal, others with 1-2 findings (evidence offsets real)."""
    reports = {}
    for k in range(n):
        sid = 7000 + k
        if k % 3 == 0:
            text, rows = "The lungs are clear. Heart size is normal.", [("cardiomegaly", "negative", 21)]
        elif k % 3 == 1:
            text = "Moderate cardiomegaly. The lungs are clear. Small right pleural effusion."
            rows = [("cardiomegaly", "positive", 9), ("pleural effusion", "positive", 47)]
        else:
            text = "Left lower lobe consolidation. Sternal wires are intact. Mild {edema}."
            rows = [("consolidation", "positive", 16), ("edema", "positive", 64)]
        impression = "Impression text {0}." if k % 2 else None
        reports[sid] = (100 + k, "train", text, impression, [(f"d{sid}", "PA")], rows)
    return reports


def radialog_builder(f: dict, seed: int) -> radialog.Builder:
    return radialog.builder_for(f["studies"], f["images"], f["sections"], f["findings"], seed=seed)


def test_radialog_files(tmp_path):
    paths = write_inputs(tmp_path, big_corpus())
    f = frames(paths)
    rg, ins, counts = radialog.build(radialog_builder(f, 3))
    # stratification: images with findings twice + int(2F/13) normal ones
    n_find = 80
    assert counts["report_generation"] == len(rg) == 2 * n_find + int(2 * n_find / 13)
    assert sum(1 for r in rg if "Predicted Findings: no finding." in r["instruction"]) == int(2 * n_find / 13)
    for rec in ins:
        assert set(rec) == {"instruction", "input", "output", "dicom"} and rec["input"] == ""
        assert rec["output"].strip()  # no empty answers
        assert rec["instruction"].startswith("A conversation between") and rec["instruction"].endswith(
            "ASSISTANT:"
        )
        assert rec["instruction"].count("<IMG>") == 32
    # every task built; the instruct part uses each image at most once
    assert all(
        counts[t] > 0 for t in ("correction", "summarise", "region_qa", "binary_qa", "all_findings_qa")
    )
    instruct = [r for r in ins if r["instruction"].count("USER:") == 2]
    assert len(instruct) == sum(v for k, v in counts.items() if k != "report_generation")
    assert len({r["dicom"] for r in instruct}) == len(instruct)
    assert len(ins) == len(rg) + len(instruct)
    # braces in reports survive verbatim
    assert any("Mild {edema}." in r["output"] for r in rg)
    # the encoded form the rule writes holds the same records
    import io

    docs = []
    for encoded in radialog.build_encoded(radialog_builder(f, 3))[:2]:
        buf = io.BytesIO()
        radialog.write_json_list(encoded, buf, chunk=7)
        docs.append(buf.getvalue())
    # the bytes of json.dumps of the records (the RG instructions are encoded once, shared)
    assert docs == [json.dumps(r, ensure_ascii=False).encode() for r in (rg, ins)]
    # deterministic for a seed, different for another
    again = radialog.build(radialog_builder(f, 3))
    assert again[1] == ins
    assert radialog.build(radialog_builder(f, 4))[1] != ins


def test_radialog_instruct_answers(tmp_path):
    f = frames(write_inputs(tmp_path, big_corpus()))
    _, ins, _ = radialog.build(radialog_builder(f, 1))
    instruct = [r for r in ins if r["instruction"].count("USER:") == 2]
    by_answer = {}
    for r in instruct:
        by_answer.setdefault(r["output"].split()[0], []).append(r)
    # region QA "yes" answers quote the report's sentence
    quoted = [r for r in instruct if r["output"].startswith("Yes. ")]
    assert quoted and all(r["output"][5:] in r["instruction"] for r in quoted)
    # binary QA answers yes/no only about labels that are (not) positive
    binary = [r for r in instruct if r["output"] in ("Yes.", "No.")]
    assert binary

    # correction: the assistant's first reply is an edited report; the answer is the true findings
    def task(r):
        return r["instruction"].rsplit("USER:", 1)[1].lower()

    corrections = [r for r in instruct if re.search(r"correct|update the report|revise the report", task(r))]
    assert corrections
    for r in corrections:
        first_reply = r["instruction"].split("ASSISTANT: ", 1)[1].split("</s>", 1)[0]
        assert first_reply != r["output"]
        assert r["output"] in {v[2] for v in big_corpus().values()}


def test_exports_rule(tmp_path):
    paths = write_inputs(tmp_path)
    out = run_exports(paths, tmp_path / "one")
    ann = json.loads(out["r2gen"].read_text())
    assert sum(len(v) for v in ann.values()) == 7
    assert json.loads(out["radialog_rg"].read_text())
    assert json.loads(out["summary"].read_text())["r2gen"] == {"train": 5, "val": 2, "test": 0}
    rejects = read_table(out["rejects"]).to_pylist()
    assert [(r["study_id"], r["reason"]) for r in rejects] == [(505, "no_findings")]


@pytest.mark.parametrize("dataset", ["mimic", "iu"])
def test_rejects_name_why_a_study_is_in_no_export(dataset):
    """Every study in no export, in the studies' order, with the first reason that applies: outside the
    splits, then without findings, then without (enough) images; exported studies are not rejects."""
    import pandas as pd

    studies = pd.DataFrame(
        {
            "study_id": [7, 1, 2, 3, 4, 5, 6, 3],
            "split": ["train", "train", None, "other", "validate", "test", "train", "other"],
        }
    )
    sections = pd.DataFrame({"study_id": [1, 2, 3, 4, 5, 6], "findings": ["a", "b", "c", None, "  ", "d"]})
    rejects = build.rejects_for(studies, sections, {1}, dataset).rows
    no_images = "too_few_images" if dataset == "iu" else "no_images"
    assert list(zip(rejects["study_id"], rejects["reason"], strict=True)) == [
        (7, "no_findings"),  # no sections row
        (2, "not_in_split"),
        (3, "not_in_split"),
        (4, "no_findings"),
        (5, "no_findings"),
        (6, no_images),
        (3, "not_in_split"),
    ]
    assert set(rejects["stage"]) == {"exports"}


def test_rules_parts_write_the_stage_files(tmp_path):
    """The rules' jobs (R2Gen, RaDialog, then the summary from their parts) write the files of the whole
    stage in one process, byte for byte."""
    paths = write_inputs(tmp_path, big_corpus())
    options = ("--seed", "2")  # a RaDialog option: given to its job
    whole = run_exports(paths, tmp_path / "one", *options)
    parts = stage_outputs("exports", tmp_path / "parts")
    for command in ("r2gen", "radialog", "summary"):
        build.main(
            [*build.rule_args({**paths, **parts}, command), *(options if command == "radialog" else ())]
        )
    for name in ("r2gen", "radialog_rg", "radialog_ins", "summary", "card", "rejects", "llm_requests"):
        assert parts[name].read_bytes() == whole[name].read_bytes(), name
    assert json.loads(parts["summary"].read_text())["radialog_tasks"]["report_generation"] > 0


def test_job_processes_write_the_files_of_the_stage_in_one_process(tmp_path):
    """``python -m workflow.exports r2gen|radialog`` as the rules run them: each process ends once its
    files are written without freeing what it built (workflow.cli.exit_leaving_objects), with exit code
    0, its log flushed and the files of the stage in one process, byte for byte."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    paths = write_inputs(tmp_path, big_corpus())
    whole = run_exports(paths, tmp_path / "one")
    parts = stage_outputs("exports", tmp_path / "parts")
    env = {**os.environ, "PYTHONPATH": str(root)}
    for command, last_log in (("r2gen", "r2gen annotation"), ("radialog", "radialog llm tasks")):
        done = subprocess.run(
            [sys.executable, "-m", "workflow.exports", *build.rule_args({**paths, **parts}, command)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert last_log in done.stderr.splitlines()[-1]
    for name in ("r2gen", "radialog_rg", "radialog_ins"):
        assert parts[name].read_bytes() == whole[name].read_bytes(), name
    assert read_table(parts["r2gen_rejects"]).equals(read_table(whole["rejects"]))


def test_region_qa_without_evidence_spans():
    """LLM findings may come without spans: a positive finding still answers "yes", by name."""
    import random

    import pandas as pd

    text = "The heart is enlarged. The lungs are clear."
    img = radialog.Image("d1", 1, text, "", ["Cardiomegaly"], set())
    findings = pd.DataFrame(
        {
            "study_id": [1],
            "name": ["cardiomegaly"],
            "presence": ["positive"],
            "section": ["findings"],
            "start": [None],
        }
    )
    builder = radialog.Builder([img], findings, seed=0)
    answers = {builder.region_qa(img, random.Random(seed)).output for seed in range(60)}
    assert "Yes, there is cardiomegaly." in answers
    assert "No, the lungs appear clear." in answers
    assert not any(a.startswith("No, the heart") for a in answers)


# --- R2Gen report sections: the default per corpus --------------------------------------------------------


def test_report_sections_default_per_corpus(tmp_path):
    """MIMIC: findings + impression (R2GenGPT's own MIMIC file); IU X-Ray: findings only (R2Gen's)."""
    paths = write_inputs(tmp_path)
    mimic = run_exports(paths, tmp_path / "mimic")
    ann = json.loads(mimic["r2gen"].read_text())
    reports = {it["id"]: it["report"] for items in ann.values() for it in items}
    assert reports["i501a"] == REPORTS[501][2] + " " + REPORTS[501][3]
    assert reports["i502"] == REPORTS[502][2]  # no impression: the findings alone
    assert "i505" not in reports  # impression without findings: not an item (same item set as R2Gen)
    summary = json.loads(mimic["summary"].read_text())
    assert summary["r2gen_report_sections"] == "findings_impression"
    card = mimic["card"].read_text()
    assert "Corpus: MIMIC-CXR" in card and "`report`: findings + impression" in card
    assert "the default for this corpus" in card
    assert "Easy language, reasoning: absent" in card  # rules backend

    iu = run_exports(paths, tmp_path / "iu", "--dataset", "iu")
    ann = json.loads(iu["r2gen"].read_text())
    assert [it["report"] for items in ann.values() for it in items] == [REPORTS[501][2], REPORTS[504][2]]
    assert json.loads(iu["summary"].read_text())["r2gen_report_sections"] == "findings"
    card = iu["card"].read_text()
    assert "Corpus: IU X-Ray" in card and "`report`: findings only (R2Gen's convention" in card

    # an explicit choice wins over the corpus default
    only = run_exports(paths, tmp_path / "only", "--report-sections", "findings")
    ann = json.loads(only["r2gen"].read_text())
    assert next(it for it in ann["train"] if it["id"] == "i501a")["report"] == REPORTS[501][2]
    assert (
        r2gen.report_sections("mimic") == "findings_impression" and r2gen.report_sections("iu") == "findings"
    )


# --- RaDialog prompts from the user's checkout ------------------------------------------------------------

# Placeholders of our own: the test only needs strings the build must carry over verbatim.
FAKE_KEY = "img_matching_examples_ig2_noexamples_IMG_findings"
FAKE_INSTRUCTION = (
    "Picture: " + "<IMG>" * 32 + ". Labels seen: {findings}. PLACEHOLDER-RG-INSTRUCTION, one paragraph."
)
FAKE_SYSTEM = "PLACEHOLDER-SYSTEM for the evaluation.  Two spaces kept."


def fake_checkout(root: Path, system_in_json: bool = False, scripts: bool = True) -> Path:
    """A folder shaped like a RaDialog checkout: vicuna_prompts.json (RG prompt keys, each a format string
    with a {findings} slot) at the top, test.py / demo.py building a Conversation(system=...)."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = {
        FAKE_KEY: FAKE_INSTRUCTION,
        FAKE_KEY.replace("matching_examples", "neg_matching_examples"): "PLACEHOLDER-NEG {findings}",
        "img_matching_examples_ig2_noexamples": "PLACEHOLDER-TEXT-ONLY {findings}",
    }
    if system_in_json:
        prompts["system"] = FAKE_SYSTEM + " (from json)"
    (root / "vicuna_prompts.json").write_text(json.dumps(prompts, indent=2))
    if scripts:
        (root / "test.py").write_text(
            "import json\n\n\nclass Conversation:\n    def __init__(self, **kw):\n        self.kw = kw\n\n\n"
            "def item(text):\n    conv = Conversation(\n"
            f"        system={FAKE_SYSTEM[:20]!r}\n               {FAKE_SYSTEM[20:]!r},\n"
            "        roles=['USER', 'ASSISTANT'], messages=[], offset=0, sep=' ', sep2='</s>',\n    )\n"
            "    return conv\n"
        )
        (root / "demo.py").write_text("conv = Conversation(system='PLACEHOLDER-DEMO-SYSTEM', roles=[])\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "README.md").write_text("placeholder checkout\n")
    return root


def test_radialog_prompts_from_checkout(tmp_path):
    checkout = fake_checkout(tmp_path / "RaDialog")
    paths = write_inputs(tmp_path, big_corpus())
    out = run_exports(paths, tmp_path / "theirs", "--radialog-prompts-from", str(checkout))
    rg = json.loads(out["radialog_rg"].read_text())
    ins = json.loads(out["radialog_ins"].read_text())
    before, after = FAKE_INSTRUCTION.split("{findings}")
    for rec in rg + ins:
        # RaDialog's rendering: system, " USER: ", its instruction with the findings filled in, " ASSISTANT:"
        assert rec["instruction"].startswith(FAKE_SYSTEM + " USER: " + before)
        assert after + " ASSISTANT:" in rec["instruction"]
        assert "A conversation between" not in rec["instruction"]  # none of our paraphrases
        assert rec["instruction"].count("<IMG>") == 32  # the checkout's image block, not ours on top
    filled = {r["instruction"].split(before, 1)[1].split(after, 1)[0] for r in rg}
    assert "cardiomegaly, pleural effusion" in filled and "no finding" in filled
    # the same records as with our prompts, only the wording differs
    own = run_exports(paths, tmp_path / "own")
    own_rg = json.loads(own["radialog_rg"].read_text())
    assert [(r["dicom"], r["output"]) for r in own_rg] == [(r["dicom"], r["output"]) for r in rg]
    # summary.json says which source, by file and key, never the text
    summary = json.loads(out["summary"].read_text())["radialog_prompts"]
    assert (
        summary["source"]
        == f"RaDialog checkout: vicuna_prompts.json[{FAKE_KEY}], system message from test.py"
    )
    assert len(summary["sha256"]) == 64 and "PLACEHOLDER" not in json.dumps(summary)
    assert json.loads(own["summary"].read_text())["radialog_prompts"]["source"].startswith("ours:")
    card = out["card"].read_text()
    assert f"Prompts: RaDialog checkout: vicuna_prompts.json[{FAKE_KEY}], system message from test.py" in card
    assert "PLACEHOLDER" not in card and str(tmp_path) not in card  # no wording, no absolute paths
    assert "Prompts: ours: libs/radialog_prompts.yaml" in own["card"].read_text()


def test_radialog_prompts_from_file(tmp_path):
    from workflow.exports import prompt_source

    # the file itself may carry the system message
    src = fake_checkout(tmp_path / "a", system_in_json=True) / "vicuna_prompts.json"
    loaded = prompt_source.load(src)
    assert loaded.system == FAKE_SYSTEM + " (from json)"
    assert loaded.instruction("edema") == FAKE_INSTRUCTION.replace("{findings}", "edema")
    # a bare file: the system message comes from test.py next to it, else demo.py
    checkout = fake_checkout(tmp_path / "b")
    assert prompt_source.load(checkout / "vicuna_prompts.json").system == FAKE_SYSTEM
    (checkout / "test.py").unlink()
    assert prompt_source.load(checkout).system == "PLACEHOLDER-DEMO-SYSTEM"
    # another key of the file (test.py --prompt)
    other = prompt_source.load(checkout, "img_matching_examples_ig2_noexamples")
    assert other.instruction("x") == "PLACEHOLDER-TEXT-ONLY x"


def test_radialog_prompts_from_errors_name_the_key(tmp_path):
    from workflow import configcheck
    from workflow.exports import prompt_source

    key = "`exports.radialog.prompts_from`"
    with pytest.raises(prompt_source.PromptSourceError, match=f"{re.escape(key)}.*does not exist"):
        prompt_source.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(prompt_source.PromptSourceError, match="without vicuna_prompts.json"):
        prompt_source.load(tmp_path / "empty")
    checkout = fake_checkout(tmp_path / "c")
    with pytest.raises(
        prompt_source.PromptSourceError, match=f"{re.escape(key)}.*lacks the prompt keys no_such_key"
    ):
        prompt_source.load(checkout, "no_such_key")
    bare = fake_checkout(tmp_path / "d", scripts=False)
    with pytest.raises(prompt_source.PromptSourceError, match="no system message.*lacks the key 'system'"):
        prompt_source.load(bare)
    (checkout / "vicuna_prompts.json").write_text(json.dumps({FAKE_KEY: "no slot here"}))
    with pytest.raises(prompt_source.PromptSourceError, match=r"no \{findings\} slot"):
        prompt_source.load(checkout)
    (checkout / "vicuna_prompts.json").write_text(json.dumps({FAKE_KEY: "{findings} and {label}"}))
    with pytest.raises(prompt_source.PromptSourceError, match=r"slot \{label\}"):
        prompt_source.load(checkout)
    # validated at start-up, with the rest of the configuration
    cfg = {"exports": {"radialog": {"prompts_from": "c", "prompt_key": FAKE_KEY}}}
    assert any(p.startswith(key) for p in configcheck.problems(cfg, tmp_path))
    cfg["exports"]["radialog"]["prompts_from"] = str(fake_checkout(tmp_path / "ok"))
    assert configcheck.problems(cfg, tmp_path) == []


def test_llm_tasks_endpoint_checked_at_start_up(tmp_path):
    from workflow import configcheck

    cfg = {"llm": {"backend": "llm", "endpoints": {"student": {}}}}
    cfg["exports"] = {"radialog": {"llm": {"endpoint": "nope"}}}
    assert any(
        "`exports.radialog.llm.endpoint` names the endpoint 'nope'" in p for p in configcheck.problems(cfg)
    )
    cfg["exports"]["radialog"]["llm"]["endpoint"] = "student"
    assert configcheck.problems(cfg) == []
    cfg = {"llm": {"backend": "rules"}, "exports": {"radialog": {"llm": {"endpoint": "nope"}}}}
    assert configcheck.problems(cfg) == []  # the rules backend never asks it
