"""The clinicians' review: the stratified sample, the page's items, the scorer's statistics, and the whole
loop in a real browser — `snakemake review` on the demo, judge items with the keyboard in headless
Chromium, reload (verdicts survive), export verdicts.csv, `snakemake review_score` on it."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from workflow_run import prepare_workdir, run_snakemake

from workflow.contract import REVIEW_AGREEMENT, REVIEW_PRECISION, REVIEW_VERDICT_COLUMNS
from workflow.review import items as review_items
from workflow.review.build import build as build_page
from workflow.review.build import render
from workflow.review.sample import read_exclusions, stratified_sample, study_strata
from workflow.review.score import (
    agreement_table,
    cohen_kappa,
    consensus,
    figure,
    precision_table,
    read_verdicts,
    score,
    wilson_interval,
)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# --- sampling -----------------------------------------------------------------------------------------------


def _population() -> dict[int, set[str]]:
    """300 studies: most have positive and negative findings and common question types; 4 have an
    uncertain finding, 5 an `type` question, 6 are in RG4's mw."""
    strata = {}
    for i in range(300):
        labels = {"presence:positive", "question:presence", "rg4:sn"} if i % 2 else {"presence:negative"}
        if i % 3 == 0:
            labels.add("question:view")
        strata[50_000_000 + i] = labels
    for i in (7, 70, 170, 270):
        strata[50_000_000 + i].add("presence:uncertain")
    for i in (11, 111, 211, 251, 291):
        strata[50_000_000 + i].add("question:type")
    for i in (13, 31, 131, 231, 233, 299):
        strata[50_000_000 + i].add("rg4:mw")
    return strata


def test_sample_is_seeded():
    strata = _population()
    first = stratified_sample(strata, 40, seed=3)
    assert first == stratified_sample(strata, 40, seed=3)
    assert first != stratified_sample(strata, 40, seed=4)
    assert len(first) == len(set(first)) == 40


def test_sample_covers_rare_strata_that_random_sampling_misses():
    strata = _population()
    chosen = stratified_sample(strata, 30, seed=0)
    covered = Counter(label for s in chosen for label in strata[s])
    # every uncertain / `type` / mw study is in (each stratum is at most 6 studies, the sample is 30)
    assert covered["presence:uncertain"] == 4
    assert covered["question:type"] == 5
    assert covered["rg4:mw"] == 6
    # and the common strata are not crowded out: both halves of the population are there
    assert covered["presence:negative"] >= 5 and covered["presence:positive"] >= 5


def test_sample_respects_exclusions_and_small_populations():
    strata = _population()
    first = stratified_sample(strata, 50, seed=0)
    second = stratified_sample(strata, 50, seed=0, exclude=first)
    assert not set(first) & set(second)
    assert len(second) == 50
    # asking for more than is left gives everything that is left, once
    rest = stratified_sample(strata, 1000, seed=0, exclude=first)
    assert sorted(rest) == sorted(set(strata) - set(first))


def test_exclusion_files(tmp_path):
    plain = tmp_path / "reviewed.txt"
    plain.write_text("# first round\n50000001\n\n50000002\n")
    assert read_exclusions(plain) == {50000001, 50000002}
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"study_id": [3, 4], "strata": ["a", "b"]}).to_csv(sample, index=False)
    assert read_exclusions(sample) == {3, 4}
    bad = tmp_path / "bad.txt"
    bad.write_text("50000001\n\nstudy fifty\n")
    with pytest.raises(ValueError, match="review.exclude.*line 3"):
        read_exclusions(bad)
    with pytest.raises(FileNotFoundError, match="review.exclude"):
        read_exclusions(tmp_path / "missing.txt")


def test_strata_from_tables():
    findings = pa.table(
        {"study_id": [1, 1, 2, 1], "presence": ["positive", "negative", "uncertain", "positive"]}
    )
    questions = pa.table({"study_id": [2, 3], "question_type": ["view", "level"]})
    rg4 = {"sn": pa.table({"study_id": [1, 3]}), "mw": pa.table({"study_id": [3]})}
    assert study_strata(findings, questions, rg4) == {
        1: {"presence:positive", "presence:negative", "rg4:sn"},
        2: {"presence:uncertain", "question:view"},
        3: {"question:level", "rg4:sn", "rg4:mw"},
    }


# --- items --------------------------------------------------------------------------------------------------


def test_overlapping_evidence_spans_are_each_labelled_once():
    text = "No effusion or pneumothorax. Mild cardiomegaly."
    spans = [(3, 11, 1), (3, 27, 2), (34, 46, 3)]  # "effusion", "effusion or pneumothorax", "cardiomegaly"
    segs = review_items.segments(text, spans)
    assert "".join(s[0] for s in segs) == text
    covering = {n: "".join(s[0] for s in segs if n in s[1]) for n in (1, 2, 3)}
    assert covering == {1: "effusion", 2: "effusion or pneumothorax", 3: "cardiomegaly"}
    assert Counter(n for s in segs for n in s[2]) == {1: 1, 2: 1, 3: 1}


def test_finding_without_offsets_is_found_by_its_quote():
    sections = {"findings": "Heart size normal.", "impression": "Small LEFT effusion."}
    assert review_items.locate(sections, "findings", None, None, "left effusion") == ("impression", 6, 19)
    assert review_items.locate(sections, "findings", 0, 5, "Heart") == ("findings", 0, 5)
    assert review_items.locate(sections, "findings", 0, 500, "nowhere") is None


def test_rg4_items_mark_removed_words_and_share_identical_rewrites():
    original = (
        "Compared to the prior study, there is a small left effusion. Findings were discussed with Dr. ___."
    )

    def record(finding):
        return pd.Series(
            {
                "finding": finding,
                "impression": None,
                "original_finding": original,
                "original_impression": None,
                "rewriter": "rules",
                "last_study_id": None,
            }
        )

    records = {
        "sn": record("There is a small left effusion."),
        "mn": record("There is a small left effusion."),
        "mw": record("Compared to the prior study, there is a small left effusion."),
    }
    items = review_items.rg4_items(7, records)
    by_id = {it["id"]: it for it in items}
    assert set(by_id) == {"rg4:7:sn+mn", "rg4:7:mw"}
    assert by_id["rg4:7:sn+mn"]["categories"] == ["pc", "comm"]
    assert by_id["rg4:7:mw"]["categories"] == ["comm"]
    left = by_id["rg4:7:mw"]["fields"][0]["original"]
    removed = " ".join(w for w, mark in left if mark in ("del", "rep"))
    assert "discussed" in removed and "prior" not in removed


# --- scoring ------------------------------------------------------------------------------------------------


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(10, 10)  # a perfect score still has an interval below 1
    assert high == 1.0 and round(low, 4) == 0.7225
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_cohen_kappa():
    # 50 items: both yes 20, a yes/b no 5, a no/b yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["correct"] * 25 + ["wrong"] * 25
    b = ["correct"] * 20 + ["wrong"] * 5 + ["correct"] * 10 + ["wrong"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["correct"] * 3, ["correct"] * 3))


def _write_verdicts(path: Path, reviewer: str, rows: list[tuple]) -> Path:
    """rows: (item_id, kind, verdict, finding, presence, question_type, rg4_category)."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REVIEW_VERDICT_COLUMNS)
        w.writeheader()
        for item_id, kind, verdict, finding, presence, qtype, category in rows:
            w.writerow(
                {
                    "item_id": item_id,
                    "kind": kind,
                    "study_id": "1",
                    "verdict": verdict,
                    "comment": "",
                    "reviewer": reviewer,
                    "build": "b1",
                    "corpus": "demo",
                    "finding": finding,
                    "presence": presence,
                    "question_type": qtype,
                    "rg4_category": category,
                    "scenarios": "",
                }
            )
    return path


def test_precision_per_group_from_two_reviewers(tmp_path):
    rows_a = [
        ("f:1:effusion:findings:0", "finding", "correct", "effusion", "positive", "", ""),
        ("f:1:edema:findings:9", "finding", "correct", "edema", "negative", "", ""),
        ("f:2:edema:findings:3", "finding", "wrong", "edema", "negative", "", ""),
        ("f:2:nodule:findings:5", "finding", "unsure", "nodule", "uncertain", "", ""),
        ("q:1", "question", "correct", "", "", "presence", ""),
        ("q:2", "question", "wrong", "", "", "view", ""),
        ("rg4:1:sn", "rg4", "correct", "", "", "", "pc;comm"),
        ("rg4:2:mw", "rg4", "wrong", "", "", "", "comm"),
    ]
    rows_b = [r if r[0] != "f:1:edema:findings:9" else (*r[:2], "wrong", *r[3:]) for r in rows_a]
    a = _write_verdicts(tmp_path / "a.csv", "AB", rows_a)
    b = _write_verdicts(tmp_path / "b.csv", "CD", rows_b)
    precision, agreement = score([a, b])
    assert list(precision.columns) == REVIEW_PRECISION.names
    assert list(agreement.columns) == REVIEW_AGREEMENT.names
    get = precision.set_index(["kind", "group", "value"])
    # f:1 edema: AB correct, CD wrong -> a tie -> unsure; f:2 nodule unsure by both
    assert tuple(get.loc[("finding", "all", "all"), ["items", "correct", "wrong", "unsure"]]) == (4, 1, 1, 2)
    assert get.loc[("finding", "presence", "negative"), "wrong"] == 1
    assert get.loc[("finding", "presence", "negative"), "unsure"] == 1
    assert math.isnan(get.loc[("finding", "presence", "uncertain"), "precision"])
    assert get.loc[("finding", "finding", "effusion"), "precision"] == 1.0
    assert get.loc[("question", "question_type", "view"), "precision"] == 0.0
    # an rg4 item counts in every category its rewrite touched
    assert get.loc[("rg4", "rg4_category", "comm"), "items"] == 2
    assert get.loc[("rg4", "rg4_category", "pc"), "precision"] == 1.0
    low, high = wilson_interval(1, 2)
    assert get.loc[("rg4", "rg4_category", "comm"), "ci_low"] == pytest.approx(low)
    assert get.loc[("rg4", "rg4_category", "comm"), "ci_high"] == pytest.approx(high)
    figure(precision, tmp_path / "precision.png")  # 0/n and n/n groups included
    assert (tmp_path / "precision.png").stat().st_size > 5_000
    everything = agreement.set_index("kind").loc["all"]
    assert everything["items"] == 8 and everything["observed_agreement"] == pytest.approx(7 / 8)
    labels_a = [r[2] for r in rows_a]
    labels_b = [r[2] for r in rows_b]
    assert everything["kappa"] == pytest.approx(cohen_kappa(labels_a, labels_b))


def test_majority_of_three_reviewers_decides(tmp_path):
    row = ("q:9", "question", None, "", "", "level", "")
    files = [
        _write_verdicts(tmp_path / f"{r}.csv", r, [(*row[:2], v, *row[3:])])
        for r, v in (("AA", "wrong"), ("BB", "correct"), ("CC", "wrong"))
    ]
    items = consensus(read_verdicts(files))
    assert items.set_index("item_id").loc["q:9", "verdict"] == "wrong"
    pairs = agreement_table(read_verdicts(files))
    assert sorted(zip(pairs["reviewer_a"], pairs["reviewer_b"], pairs["kind"], strict=True)) == [
        ("AA", "BB", "all"),
        ("AA", "BB", "question"),
        ("AA", "CC", "all"),
        ("AA", "CC", "question"),
        ("BB", "CC", "all"),
        ("BB", "CC", "question"),
    ]


def test_verdict_files_are_checked(tmp_path, caplog):
    good = _write_verdicts(
        tmp_path / "v.csv",
        "AB",
        [
            ("q:1", "question", "correct", "", "", "view", ""),
            ("q:2", "question", "maybe", "", "", "view", ""),
            ("q:1", "question", "wrong", "", "", "view", ""),
        ],
    )
    verdicts = read_verdicts([good])
    assert verdicts[["item_id", "verdict"]].values.tolist() == [["q:1", "wrong"]]  # last export wins
    assert "maybe" in caplog.text
    other = tmp_path / "other.csv"
    other.write_text("study_id,label\n1,x\n")
    with pytest.raises(ValueError, match="missing"):
        read_verdicts([other])
    with pytest.raises(FileNotFoundError, match="review.verdicts"):
        read_verdicts([tmp_path / "nope.csv"])
    with pytest.raises(ValueError, match="review.verdicts"):
        read_verdicts([])
    assert precision_table(consensus(verdicts)).shape[0] == 2  # question/all and question_type/view


def test_page_escapes_report_text():
    study = {
        "study_id": 1,
        "subject_id": 1,
        "split": "train",
        "strata": [],
        "sections": [{"name": "findings", "segments": [["</script><script>alert(1)</script>", [], []]]}],
        "items": [],
    }
    html = render([study], {"corpus": "c", "notice": "n", "seed": 0})
    assert html.count("<script") == 2  # the data block and the page's own script, nothing injected
    data = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(data)["studies"][0]["sections"][0]["segments"][0][0].startswith("</script>")


def test_build_with_llm_findings_locates_quotes_and_shows_the_rules_reading():
    from workflow.contract import FINDINGS, QUESTIONS, SECTIONS

    text = "Small right pleural effusion.  No pneumothorax."
    sections = pa.Table.from_pylist(
        [
            {
                "subject_id": 10,
                "study_id": 1,
                "indication": "dyspnea",
                "findings": text,
                "impression": "Effusion.",
            }
        ],
        schema=SECTIONS,
    )

    def finding(name, presence, source, evidence, start=None, end=None, flags=None):
        row = dict.fromkeys(FINDINGS.names)
        row.update(
            subject_id=10,
            study_id=1,
            name=name,
            raw_name=name,
            presence=presence,
            section="findings",
            start=start,
            end=end,
            source=source,
            evidence=evidence,
            flags=flags,
        )
        return row

    llm = pa.Table.from_pylist(
        [
            finding("pleural effusion", "positive", "llm", "small right pleural effusion"),
            finding("pneumothorax", "uncertain", "followup", "No pneumothorax", flags="presence_disagrees"),
        ],
        schema=FINDINGS,
    )
    rules = pa.Table.from_pylist(
        [
            finding("pleural effusion", "positive", "rules", "pleural effusion", 12, 28),
            finding("pneumothorax", "negative", "rules", "pneumothorax", 35, 47),
        ],
        schema=FINDINGS,
    )
    question = dict.fromkeys(QUESTIONS.names)
    question.update(
        qa_id=5,
        subject_id=10,
        study_id=1,
        dicom_id="d1",
        image_path="files/x.jpg",
        split="train",
        question_type="presence",
        question="is there an effusion?",
        answer="yes",
        template_id="t",
    )
    images = pa.table({"study_id": [1], "dicom_id": ["d1"], "view_position": ["PA"]})
    html, sample = build_page(
        sections,
        images,
        llm,
        pa.Table.from_pylist([question], schema=QUESTIONS),
        {},
        n=5,
        seed=0,
        rules_findings=rules,
        meta={"corpus": "test", "notice": "n"},
    )
    study = _page_data_of(html)["studies"][0]
    assert sample.to_pylist() == [
        {
            "study_id": 1,
            "subject_id": 10,
            "strata": "presence:positive;presence:uncertain;question:presence",
            "items": 3,
        }
    ]
    effusion, pneumothorax, qa = study["items"]
    assert (effusion["located"], effusion["section"], effusion["n"]) == (True, "findings", 1)
    marked = "".join(seg[0] for seg in study["sections"][1]["segments"] if 1 in seg[1])
    assert marked == "Small right pleural effusion"  # the quote, found case-insensitively
    assert pneumothorax["flags"] == ["presence_disagrees"]
    assert (qa["answer"], qa["view"]) == ("yes", "PA")
    assert study["disagreements"] == [{"name": "pneumothorax", "llm": "uncertain", "rules": "negative"}]


def _page_data_of(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', html, re.S)
    return json.loads(block.group(1))


# --- the demo run: page, sample, exclusions, scoring ---------------------------------------------------------


@pytest.fixture(scope="module")
def review_run(tmp_path_factory):
    """`snakemake review` on the demo in a scratch working directory (builds the stages it needs)."""
    workdir = prepare_workdir(tmp_path_factory.mktemp("review_run"))
    run = run_snakemake(workdir, "--cores", "2", "review")
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def _page_data(page: Path) -> dict:
    return _page_data_of(page.read_text())


@pytest.mark.slow
def test_page_is_self_contained_and_says_where_it_came_from(review_run):
    page = review_run / "results/review/index.html"
    html = page.read_text()
    assert page.stat().st_size < 2_000_000
    # nothing to fetch: no external scripts, styles, fonts or images, and a policy that forbids any
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.I)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert "default-src 'none'" in html
    data = _page_data(page)
    meta = data["meta"]
    assert meta["corpus"] == "synthetic demo (MIMIC-CXR layout)" and re.fullmatch(
        r"[0-9a-f]{12}", meta["build"]
    )
    assert meta["build"] in html and "PhysioNet Credentialed Health Data License" in html
    assert meta["n_studies"] == len(data["studies"]) == 100


@pytest.mark.slow
def test_page_items_carry_the_tables(review_run):
    results = review_run / "results"
    studies = _page_data(results / "review/index.html")["studies"]
    findings = pd.read_parquet(results / "keyinfo/rules/findings.parquet")
    questions = pd.read_parquet(results / "vqa/questions.parquet")
    chosen = {s["study_id"] for s in studies}
    ids = [it["id"] for s in studies for it in s["items"]]
    assert len(ids) == len(set(ids))
    strata = Counter(label for s in studies for label in s["strata"])
    for label in (
        "presence:positive",
        "presence:negative",
        "presence:uncertain",
        "rg4:sn",
        "rg4:sw",
        "rg4:mn",
        "rg4:mw",
        *(f"question:{t}" for t in questions["question_type"].unique()),
    ):
        assert strata[label] > 0, label
    # every question of a sampled study is on the page, with its answer
    page_q = {it["id"]: it["answer"] for s in studies for it in s["items"] if it["kind"] == "question"}
    expected = questions[questions["study_id"].isin(chosen)]
    assert page_q == {f"q:{r.qa_id}": r.answer for r in expected.itertuples()}
    # each finding's highlighted text is its evidence, in the section the table names
    checked = 0
    for s in studies:
        for it in (it for it in s["items"] if it["kind"] == "finding"):
            assert it["located"], it["id"]
            section = next(sec for sec in s["sections"] if sec["name"] == it["section"])
            marked = "".join(seg[0] for seg in section["segments"] if it["n"] in seg[1])
            assert marked == it["evidence"], it["id"]
            checked += 1
    n_rows = findings[findings["study_id"].isin(chosen)].drop_duplicates(
        ["study_id", "name", "section", "start"]
    )
    assert checked == len(n_rows)


@pytest.mark.slow
def test_exclusions_and_scoring_without_verdicts(review_run, tmp_path):
    first = pd.read_csv(review_run / "results/review/sample.csv")
    assert len(first) == 100
    exclude = tmp_path / "reviewed.csv"
    shutil.copy(review_run / "results/review/sample.csv", exclude)
    workdir = prepare_workdir(tmp_path / "w2", {"review": {"n": 50, "exclude": str(exclude)}})
    # the first run's tables (not its review): only the review rule runs again
    shutil.copytree(review_run / "results", workdir / "results", ignore=shutil.ignore_patterns("review"))
    run = run_snakemake(workdir, "--cores", "1", "review")
    assert run.returncode == 0, run.stderr[-3000:]
    second = pd.read_csv(workdir / "results/review/sample.csv")
    assert len(second) == 50 and not set(second["study_id"]) & set(first["study_id"])
    run = run_snakemake(workdir, "--cores", "1", "review_score")
    assert run.returncode != 0 and "review.verdicts" in run.stderr
    # neither review target is part of `all`
    run = run_snakemake(workdir, "-n", "--forceall")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = set(re.findall(r"^rule (\w+):", run.stdout + run.stderr, re.M))
    assert "rg4" in jobs and not jobs & {"review", "review_score"}


@pytest.mark.slow
def test_llm_backend_review_reads_the_last_round_and_the_rules(tmp_path):
    workdir = prepare_workdir(
        tmp_path / "w",
        {
            "llm": {
                "backend": "llm",
                "endpoints": {
                    "teacher": {
                        "kind": "azure",
                        "azure_endpoint": "https://example.openai.azure.com",
                        "model": "gpt-4o",
                        "api_key_env": "CXR_TEST_AZURE_KEY",
                    },
                    "student": {
                        "kind": "openai",
                        "base_url": "http://127.0.0.1:9/v1",
                        "model": "student",
                        "api_key_env": None,
                    },
                },
            },
            "finetune": {"enabled": False},
        },
    )
    run = run_snakemake(workdir, "-n", "-p", "review", env={**os.environ, "CXR_TEST_AZURE_KEY": "x"})
    assert run.returncode == 0, run.stderr[-3000:]
    command = next(line for line in run.stdout.splitlines() if "workflow.review.build" in line)
    assert "--findings results/llm/followup/round2/findings.parquet" in command
    assert "--rules-findings results/keyinfo/rules/findings.parquet" in command


# --- the browser -------------------------------------------------------------------------------------------


def _chrome(download_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1366,860",
    ):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='review-chrome-')}")
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
    )
    return driver


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Debian chromium + chromium-driver not installed (make browser)",
)
def test_review_in_headless_chromium(review_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = review_run / "results/review/index.html"
    data = _page_data(page)
    first_items = data["studies"][0]["items"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _chrome(downloads)
    try:
        driver.get(page.as_uri())
        body = driver.find_element(By.TAG_NAME, "body")

        def progress():
            return driver.find_element(By.CSS_SELECTOR, "#progress .text").text

        assert progress().startswith(f"0 / {data['meta']['n_items']} items judged")
        # 1 correct, 2 wrong, 3 unsure: each judges the current item and moves on; k goes back, j skips
        body.send_keys("1", "2", "3", "k", "k", "1", "j", "j", "3")
        # then a comment on the current item: c focuses it, Enter leaves it, and the keys judge again
        body.send_keys("c")
        driver.switch_to.active_element.send_keys("laterality not stated in the report\n")
        driver.switch_to.active_element.send_keys("2")

        def verdict_of(i):
            box = driver.find_element(By.ID, f"item-{i}")
            on = box.find_elements(By.CSS_SELECTOR, ".verdict button.on")
            return on[0].get_attribute("data-verdict") if on else None

        expected = {0: "correct", 1: "correct", 2: "unsure", 3: None, 4: "unsure", 5: "wrong"}
        assert {i: verdict_of(i) for i in range(6)} == expected
        assert progress().startswith("5 / ") and "item 7" in progress()
        driver.find_element(By.ID, "reviewer").send_keys("JD")

        driver.refresh()  # verdicts, comment, initials and position survive a reload
        body = driver.find_element(By.TAG_NAME, "body")
        assert {i: verdict_of(i) for i in range(6)} == expected
        assert driver.find_element(By.CSS_SELECTOR, "#item-5 input.comment").get_attribute("value") == (
            "laterality not stated in the report"
        )
        assert driver.find_element(By.ID, "reviewer").get_attribute("value") == "JD"
        assert progress().startswith("5 / ") and "item 7" in progress()
        body.send_keys("p", "u")  # back to the study's first item, then the next one without a verdict
        assert "item 4" in progress()
        body.send_keys("u")
        assert "item 7" in progress()
        # n moves to the next study: its report and items replace the first study's
        body.send_keys("n", "1")
        assert (
            driver.find_element(By.CSS_SELECTOR, ".study-head h2").text
            == f"Study {data['studies'][1]['study_id']}"
        )

        driver.find_element(By.ID, "export").click()
        target = downloads / "verdicts.csv"
        WebDriverWait(driver, 20).until(lambda d: target.exists() and target.stat().st_size > 0)
        time.sleep(0.2)
        driver.find_element(By.ID, "export")  # the page is still there
        body.send_keys("p", "p", "j", "j", "j")  # back into the first study for the screenshot
        shot = tmp_path / "review_page.png"
        driver.save_screenshot(str(shot))
        if os.environ.get(
            "REVIEW_SCREENSHOT"
        ):  # the README's picture: REVIEW_SCREENSHOT=docs/review_page.png
            shutil.copy(shot, os.environ["REVIEW_SCREENSHOT"])
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()

    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 6
    assert set(rows[0]) == set(REVIEW_VERDICT_COLUMNS)
    by_id = {r["item_id"]: r for r in rows}
    judged = {i: v for i, v in expected.items() if v}
    assert first_items[3]["id"] not in by_id  # never judged, never exported
    for i, verdict in judged.items():
        row = by_id[first_items[i]["id"]]
        assert (row["verdict"], row["reviewer"], row["kind"]) == (verdict, "JD", first_items[i]["kind"])
        assert row["study_id"] == str(data["studies"][0]["study_id"])
    assert by_id[first_items[5]["id"]]["comment"] == "laterality not stated in the report"
    assert by_id[data["studies"][1]["items"][0]["id"]]["verdict"] == "correct"

    # the exported file is what the scorer reads
    workdir = review_run
    run = run_snakemake(
        workdir, "--cores", "1", "review_score", "--config", f"review={{'verdicts': ['{target}']}}"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    precision = pd.read_csv(workdir / "results/review/precision.csv")
    kinds = precision[precision["group"] == "all"].set_index("kind")
    counts = Counter((first_items[i]["kind"], v) for i, v in judged.items())
    counts[(data["studies"][1]["items"][0]["kind"], "correct")] += 1
    assert set(kinds.index) == {kind for kind, _ in counts}
    for kind in kinds.index:
        for verdict in ("correct", "wrong", "unsure"):
            assert kinds.loc[kind, verdict] == counts[(kind, verdict)], (kind, verdict)
    assert (workdir / "results/review/precision.png").stat().st_size > 0


def test_llm_and_rules_readings_side_by_side():
    llm = [
        {"name": "effusion", "presence": "positive"},
        {"name": "edema", "presence": "negative"},
        {"name": "nodule", "presence": "uncertain"},
    ]
    rules = [
        {"name": "effusion", "presence": "positive"},
        {"name": "edema", "presence": "positive"},
        {"name": "pneumothorax", "presence": "negative"},
    ]
    assert review_items.disagreements(llm, rules) == [
        {"name": "edema", "llm": "negative", "rules": "positive"},
        {"name": "nodule", "llm": "uncertain", "rules": None},
        {"name": "pneumothorax", "llm": None, "rules": "negative"},
    ]
