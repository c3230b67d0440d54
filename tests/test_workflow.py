"""The README's main command on the embedded demo: every stage runs, every table keeps its contract, every
study is accounted for, a re-run does nothing, the HTML report renders, and the SLURM profile plans the
GPU branch with the right resources."""

from __future__ import annotations

import csv
import gzip
import os
import re
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from workflow_run import DEMO, embedded_file, named_config, prepare_workdir, run_snakemake

from workflow import contract

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `snakemake --cores 2` over the demo with the test configuration `.test/demo-mimic` (as the
    working directory's override.yaml, so every later call here sees it), in a scratch working directory."""
    override = yaml.safe_load(named_config("demo-mimic").read_text())
    workdir = prepare_workdir(tmp_path_factory.mktemp("demo_run"), override)
    run = run_snakemake(workdir, "--cores", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def _demo_study_ids() -> tuple[set[int], set[int]]:
    """Study ids with a report file in the demo zip, and study ids in the demo's split table."""
    with zipfile.ZipFile(DEMO / "mimic-cxr-reports.zip") as zf:
        reported = {int(Path(n).stem[1:]) for n in zf.namelist() if n.endswith(".txt")}
    with gzip.open(DEMO / "mimic-cxr-2.0.0-split.csv.gz", "rt") as fh:
        listed = {int(row["study_id"]) for row in csv.DictReader(fh)}
    return reported, listed


TABLES = {
    "ingest/studies.parquet": contract.STUDIES,
    "ingest/images.parquet": contract.IMAGES,
    "sections/sections.parquet": contract.SECTIONS,
    "keyinfo/rules/findings.parquet": contract.FINDINGS,
    "keyinfo/studies.parquet": contract.KEYINFO_STUDIES,
    "vqa/questions.parquet": contract.QUESTIONS,
    "rg4/rg4_sn.parquet": contract.RG4_RECORDS,
    "rg4/rg4_mw.parquet": contract.RG4_RECORDS,
}


@pytest.mark.parametrize("relpath", sorted(TABLES))
def test_tables_keep_the_contract(demo_run, relpath):
    table = pq.read_table(demo_run / "results" / relpath)
    assert table.schema.remove_metadata().equals(TABLES[relpath]), relpath
    assert table.num_rows > 0


def test_every_rejects_table_keeps_the_contract(demo_run):
    paths = sorted((demo_run / "results").rglob("rejects.parquet"))
    assert len(paths) >= 6
    for path in paths:
        assert pq.read_table(path).schema.remove_metadata().equals(contract.REJECTS), path


def test_every_demo_study_is_accounted_for(demo_run):
    reported, listed = _demo_study_ids()
    studies = set(pq.read_table(demo_run / "results/ingest/studies.parquet")["study_id"].to_pylist())
    rejected = set(pq.read_table(demo_run / "results/ingest/rejects.parquet")["study_id"].to_pylist())
    assert studies | rejected == reported | listed
    assert not studies & rejected
    # the demo plants exactly one of each bad input, and they are rejected with their reason
    reasons = pq.read_table(demo_run / "results/ingest/rejects.parquet")["reason"].to_pylist()
    assert sorted(reasons) == ["empty_report", "no_metadata", "no_report"]
    sections = set(pq.read_table(demo_run / "results/sections/sections.parquet")["study_id"].to_pylist())
    assert sections == studies


def test_stage_counts_add_up_and_match_the_logs(demo_run):
    counts = list(csv.DictReader((demo_run / "results/report/stage_counts.csv").read_text().splitlines()))
    by_stage = {row["stage"]: row for row in counts}
    assert int(by_stage["ingest"]["in"]) == len(set.union(*_demo_study_ids()))
    for row in counts:
        assert int(row["in"]) == int(row["out"]) + int(row["rejected"]), row
    ingest_log = (demo_run / "results/logs/ingest.log").read_text()
    row = by_stage["ingest"]
    assert f"ingest: {row['in']} studies in, {row['out']} out, {row['rejected']} rejected" in ingest_log


def test_every_read_study_has_a_status_and_the_status_agrees_with_the_findings(demo_run):
    status = pq.read_table(demo_run / "results/keyinfo/studies.parquet").to_pandas()
    sections = set(pq.read_table(demo_run / "results/sections/sections.parquet")["study_id"].to_pylist())
    rejected = set(pq.read_table(demo_run / "results/keyinfo/rules/rejects.parquet")["study_id"].to_pylist())
    assert set(status["study_id"]) == sections - rejected
    findings = pq.read_table(demo_run / "results/keyinfo/rules/findings.parquet").to_pandas()
    findings = findings[findings["name"] != "support device"]
    abnormal = set(findings.loc[findings["presence"].isin(["positive", "uncertain"]), "study_id"])
    assert set(status.loc[status["status"] == "abnormal", "study_id"]) == abnormal
    normal = status[status["status"] == "normal"]
    assert len(normal) > 0
    denied = set(findings.loc[findings["presence"] == "negative", "study_id"])
    assert all(
        sid in denied or ev for sid, ev in zip(normal["study_id"], normal["normal_evidence"], strict=True)
    )


def test_mit_csv_has_its_header_and_line_ends(demo_run):
    raw = (demo_run / "results/sections/mimic_cxr_sectioned.csv").read_bytes()
    assert raw.startswith(b"study,impression,findings,last_paragraph,comparison\r\n")


def test_rerun_has_nothing_to_do(demo_run):
    run = run_snakemake(demo_run, "--cores", "2", "-n")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def _layered(base: dict, change: dict) -> dict:
    """``base`` with ``change`` layered on, key by key (as Snakemake layers config files)."""
    merged = dict(base)
    for key, value in change.items():
        merged[key] = _layered(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def _planned_after(workdir: Path, override: dict) -> set[str]:
    """The rules `snakemake -n` (default re-run triggers) plans in a finished run once `override` is layered on."""
    path = workdir / "override.yaml"
    original = path.read_text()
    path.write_text(yaml.safe_dump(_layered(yaml.safe_load(original) or {}, override)))
    try:
        run = run_snakemake(workdir, "-n")
    finally:
        path.write_text(original)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(re.findall(r"^(?:local)?rule (\w+):", run.stdout + run.stderr, re.MULTILINE)) - {"all"}


def test_config_changes_rerun_only_the_rules_that_read_them(demo_run):
    # values repeated from config.yaml, and keys no rule of the rules backend reads (the LLM stages' and the
    # student's settings): nothing to do (one dry run for both, each is a full parse of the workflow)
    unchanged = {
        "vqa": {"seed": 0},
        "rg4": {"rewriter": "rules", "label_sections": True},
        "llm": {"backend": "rules", "keyinfo": {"temperature": 0.5}, "client": {"concurrency": 3}},
        "finetune": {"epochs": 9},
    }
    assert _planned_after(demo_run, unchanged) == set()
    # the rules rewriter reads no `rg4.llm` key (the RG4 card quotes the rg4 section, so it is rewritten)
    assert _planned_after(demo_run, {"rg4": {"llm": {"temperature": 0.7}}}) == {"release_rg4"}
    # a key rg4 reads re-runs rg4's jobs and what reads its tables, nothing else
    planned = _planned_after(demo_run, {"rg4": {"label_sections": False}})
    assert planned == {"rg4_shard", "rg4", "rg4_loader", "release_rg4", "report_figures"}


def test_html_report_shows_the_figures_tables_and_what_was_built(demo_run):
    run = run_snakemake(demo_run, "--report", "report.html")
    assert run.returncode == 0, run.stderr[-2000:]
    html = (demo_run / "report.html").read_text(errors="replace")
    for name in ("stage_counts.png", "label_prevalence.png", "questions.png", "vqa_type_mix.png", "rg4.png",
                 "rejects_by_reason.csv"):  # fmt: skip
        assert name in html, name
    # one answers figure per question type the build has
    types = set(pq.read_table(demo_run / "results/vqa/questions.parquet")["question_type"].to_pylist())
    assert len(types) >= 5
    for qtype in types:
        assert f"{qtype}.png" in html, qtype
    # every table is readable in the report, as an HTML page holding the CSV's rows
    for stem in ("stage_counts", "rejects_by_reason", "label_prevalence", "vqa_type_mix"):
        rows = list(csv.DictReader((demo_run / f"results/report/{stem}.csv").read_text().splitlines()))
        page = embedded_file(html, f"{stem}.html")
        cells = re.findall(r"<td>(.*?)</td>", page)
        first = next(iter(rows[0]))
        assert [r[first] for r in rows] == cells[:: len(rows[0])], stem
    # the landing text says what was built from which corpus with which backend
    landing = re.sub(r"<[^>]+>", "", html)
    assert "Corpus: mimic (corpus.format)" in landing
    assert "the embedded synthetic demo, not a real corpus" in landing
    assert "Key information: rules backend (llm.backend)" in landing


def test_report_type_mix_counts_the_questions_and_quotes_the_released_dataset(demo_run):
    mix = list(csv.DictReader((demo_run / "results/report/vqa_type_mix.csv").read_text().splitlines()))
    questions = pq.read_table(
        demo_run / "results/vqa/questions.parquet", columns=["question_type"]
    ).to_pandas()
    counted = questions["question_type"].value_counts().to_dict()  # an independent count
    assert {r["question_type"]: int(r["ours_n"]) for r in mix} == counted
    assert abs(sum(float(r["ours_share"]) for r in mix) - 1) < 1e-9
    released = {r["question_type"]: int(float(r["released_n"])) for r in mix}
    assert sum(released.values()) == 780_014 and released["presence"] > released["type"]


def test_slurm_profile_plans_the_gpu_branch(tmp_path):
    """The cluster recipe: LLM backend with a fine-tuned student; the dry run asks SLURM for the GPUs."""
    override = {
        "llm": {
            "backend": "llm",
            "endpoints": {"teacher": {"azure_endpoint": "https://example.openai.azure.com"}},
        },
        "finetune": {"base_model": "/models/Llama-2-70b-hf", "gpus": 6, "gpu_model": "a100"},
    }
    prepare_workdir(tmp_path, override)
    run = run_snakemake(
        tmp_path,
        "--profile",
        "profiles/slurm",
        "-n",
        timeout=300,
        env={**os.environ, "AZURE_OPENAI_API_KEY": "not-used-in-a-dry-run"},
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    for rule in ("finetune", "llm_gold", "llm_keyinfo_shard", "llm_followup", "report_llm"):
        assert f"rule {rule}:" in log or f"localrule {rule}:" in log, rule
    finetune = log[log.index("rule finetune:") :].split("\n\n")[0]
    assert "gpu=6" in finetune and "gpu_model=a100" in finetune, finetune
    shard = log[log.index("rule llm_keyinfo_shard:") :].split("\n\n")[0]
    assert "slurm_partition=gpu" in shard and "gpu=4" in shard, shard


def test_release_folders_load_with_datasets(demo_run, tmp_path):
    import datasets

    from workflow import cards

    cache = str(
        tmp_path / "hf"
    )  # a fresh cache: datasets may otherwise serve an older build of the same path
    vqa = datasets.load_dataset(str(demo_run / "results/release/medical_cxr_vqa"), "default", cache_dir=cache)
    questions = pq.read_table(demo_run / "results/vqa/questions.parquet")
    assert sum(part.num_rows for part in vqa.values()) == questions.num_rows
    assert set(vqa) == {cards.hf_split(s) for s in questions["split"].to_pylist()}  # validate -> validation
    rg4 = datasets.load_dataset(str(demo_run / "results/release/mimic_rg4"), "mw", cache_dir=cache)
    assert (
        sum(part.num_rows for part in rg4.values())
        == pq.read_table(demo_run / "results/rg4/rg4_mw.parquet").num_rows
    )
    card = (demo_run / "results/release/mimic_rg4/README.md").read_text()
    assert (
        "synthetic demo corpus" in card and "| `last_study_id` | `int64` | the prior study (sw, mw) |" in card
    )
