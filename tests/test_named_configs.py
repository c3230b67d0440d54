"""The IU X-Ray test configuration (`.test/iu/`) end to end through Snakemake: the public IU reports go through
every stage, and what a user takes away says IU, not MIMIC-CXR (cards, licence, the RG4 configurations
that exist on a corpus without priors, R2Gen's findings-only reports, the report's landing text).

The IU files are not in the repository: `.test/iu/config.yaml` names them at ../shared/data/iu_xray (next to
the clone, as on CI); `CXR_IU_DIR` points elsewhere. The test skips only when the files are absent.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from workflow_run import REPO, landing_text, run_named_config

pytestmark = pytest.mark.slow

CONFIGURED_IU_DIR = (
    REPO.parent / "shared" / "data" / "iu_xray"
)  # .test/iu/config.yaml's ../shared/data/iu_xray
IU_DIR = Path(os.environ.get("CXR_IU_DIR") or CONFIGURED_IU_DIR)
IU_FILES = ("indiana_reports.csv", "indiana_projections.csv")


def _iu_reports() -> dict[int, dict]:
    with (IU_DIR / "indiana_reports.csv").open(newline="") as fh:
        return {int(row["uid"]): row for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def iu_run(tmp_path_factory):
    """One `snakemake --cores 2 --configfile .test/iu/config.yaml` over the whole IU collection."""
    if not all((IU_DIR / name).is_file() for name in IU_FILES):
        pytest.skip(f"the IU X-Ray files are not at {IU_DIR} (set CXR_IU_DIR)")
    local = None
    if IU_DIR.resolve() != CONFIGURED_IU_DIR.resolve():
        local = {"corpus": {"iu": {k: str(IU_DIR / f"indiana_{k}.csv") for k in ("reports", "projections")}}}
    workdir = tmp_path_factory.mktemp("iu_run")
    run = run_named_config("iu", workdir, "--cores", "2", local=local)
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def test_every_iu_report_is_accounted_for(iu_run):
    uids = set(_iu_reports())
    studies = set(pq.read_table(iu_run / "results/ingest/studies.parquet")["study_id"].to_pylist())
    rejects = pq.read_table(iu_run / "results/ingest/rejects.parquet").to_pandas()
    assert studies | set(rejects["study_id"]) == uids and not studies & set(rejects["study_id"])
    assert len(studies) > 0.95 * len(uids)
    # the only IU reports dropped at ingest are those with neither findings nor impression
    empty = {
        u for u, row in _iu_reports().items() if not (row["findings"].strip() or row["impression"].strip())
    }
    assert set(rejects["study_id"]) == empty and set(rejects["reason"]) <= {"empty_report"}


def _card_header(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---")[1])


def test_release_cards_name_iu_and_advertise_only_the_rg4_configs_it_has(iu_run):
    for dataset in ("medical_cxr_vqa", "mimic_rg4"):
        card = (iu_run / "results/release" / dataset / "README.md").read_text()
        assert "The **IU X-Ray** collection (Indiana University, Open-i), not MIMIC-CXR" in card, dataset
        assert "synthetic demo" not in card and "**MIMIC-CXR 2.0.0** reports" not in card, dataset
        assert _card_header(iu_run / "results/release" / dataset / "README.md")["license_name"] == (
            "open-i-iu-chest-x-ray-non-commercial"
        )
    # IU has one study per patient, so no priors: sw and mw are empty, and neither listed nor loaded
    rg4_card = iu_run / "results/release/mimic_rg4/README.md"
    assert [c["config_name"] for c in _card_header(rg4_card)["configs"]] == ["sn", "mn"]
    text = rg4_card.read_text()
    assert (
        'load_dataset("<this folder>", "sw")' not in text
        and 'load_dataset("<this folder>", "mw")' not in text
    )
    assert "Empty in this build, so not published: sw, mw." in text
    for scenario in ("sw", "mw"):
        assert pq.read_table(iu_run / f"results/rg4/rg4_{scenario}.parquet").num_rows == 0
    sn = pq.read_table(iu_run / "results/rg4/rg4_sn.parquet").num_rows
    assert (
        sn > 1000
        and sum(
            pq.read_table(p).num_rows for p in (iu_run / "results/release/mimic_rg4/sn").glob("*.parquet")
        )
        == sn
    )


def test_r2gen_reports_are_the_iu_findings_only(iu_run):
    annotation = json.loads((iu_run / "results/exports/r2gen/annotation.json").read_text())
    source = _iu_reports()
    items = [item for split in annotation.values() for item in split]
    assert len(items) > 2000
    for item in items:
        uid = int(re.match(r"CXR(\d+)_", item["id"]).group(1))
        # R2Gen's IU convention: the findings, never the impression, and two images per item
        assert item["report"].split() == source[uid]["findings"].split(), item["id"]
        assert len(item["image_path"]) == 2
    assert (
        json.loads((iu_run / "results/exports/summary.json").read_text())["r2gen_report_sections"]
        == "findings"
    )
    assert "Corpus: IU X-Ray." in (iu_run / "results/exports/README.md").read_text()


def test_report_landing_names_the_iu_corpus(iu_run):
    run = run_named_config("iu", iu_run, "--report", "report.html")
    assert run.returncode == 0, run.stderr[-2000:]
    landing = landing_text((iu_run / "report.html").read_text())
    reports = yaml.safe_load((REPO / ".test/iu/config.yaml").read_text())["corpus"]["iu"]["reports"]
    if (iu_run / "local.yaml").exists():
        reports = yaml.safe_load((iu_run / "local.yaml").read_text())["corpus"]["iu"]["reports"]
    assert f"Corpus: iu (corpus.format), reports from {reports}." in landing
    assert "synthetic demo" not in landing and "credentialed" not in landing
    assert (
        "Key information: rules backend (llm.backend): the embedded rules extractor, no LLM asked" in landing
    )
