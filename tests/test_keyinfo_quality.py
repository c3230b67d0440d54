"""Extraction quality: the synthetic corpus' truth (generated fresh) and the hand-labelled IU X-Ray dev set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.synth import Options, generate
from workflow.keyinfo.evaluate import score_iu, score_synth

IU = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray" / "indiana_reports.csv"
LABELS = Path(__file__).resolve().parent / "data" / "iu_labels.csv"  # sets: see tests/data/LABELING.md


def test_rules_extractor_recovers_the_synthetic_truth(tmp_path):
    generate(Options(out=tmp_path, studies=400, patients=120, seed=11, tree=False))
    result = score_synth(tmp_path)
    assert result["n_truth"] > 1500
    assert result["presence_aware"]["f1"] >= 0.98, result["errors"][:20]
    for field in ("location", "level", "type"):
        assert result["fields"][field] >= 0.95, (
            field,
            [e for e in result["errors"] if e["field"] == field][:20],
        )


@pytest.mark.skipif(not IU.exists(), reason="IU X-Ray reports not available")
def test_report_level_labels_on_hand_labelled_iu_reports():
    # Labels (uid, CheXpert class, presence) were written by reading the reports; the text stays outside the repo.
    result = score_iu(IU, LABELS, ("dev",))
    assert result["u_ones"]["f1"] >= 0.90
    assert result["presence"]["f1"] >= 0.90


@pytest.mark.skipif(not IU.exists(), reason="IU X-Ray reports not available")
def test_report_level_labels_on_held_out_iu_reports():
    result = score_iu(IU, LABELS, ("holdout",))
    assert result["u_ones"]["f1"] >= 0.88  # 0.915 when written; a guard against regressions, small set
    assert result["presence"]["f1"] >= 0.93


@pytest.mark.skipif(not IU.exists(), reason="IU X-Ray reports not available")
@pytest.mark.parametrize("scheme,u_ones,presence", [("chexpert", 0.92, 0.95), ("cxr14", 0.93, 0.95)])
def test_report_level_labels_on_blind_iu_reports(scheme, u_ones, presence):
    # 200 reports labelled before any extractor output was seen (tests/data/LABELING.md); written at
    # 0.946 / 0.975 (CheXpert) and 0.957 / 0.977 (ChestX-ray14): a guard against regressions
    result = score_iu(IU, LABELS, ("blind",), scheme)
    assert result["u_ones"]["f1"] >= u_ones
    assert result["presence"]["f1"] >= presence
    assert result["presence"]["per_presence"]["negative"]["f1"] >= 0.98  # the class issue 11 was about


def test_every_label_row_is_a_class_of_the_guideline():
    import csv

    from workflow.keyinfo.evaluate import CHEXPERT14, CXR14, GOLD_NAME

    allowed = (
        set(CHEXPERT14) | {k for k in CXR14 if k not in GOLD_NAME["cxr14"].values()} | set(GOLD_NAME["cxr14"])
    )
    with open(LABELS, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["finding"] for r in rows} <= allowed
    assert {r["presence"] for r in rows} == {"positive", "uncertain", "negative"}
    assert len({r["uid"] for r in rows}) >= 300
    assert not any(r["finding"] == "No Finding" and r["presence"] != "positive" for r in rows)
