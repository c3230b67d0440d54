"""Standardisation of LLM output, grounding flags and the Medical-CXR-VQA KeyInfo JSON import/export."""

from __future__ import annotations

import json
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

from workflow.contract import AUDIT, FINDINGS, UNKNOWN_TERMS
from workflow.keyinfo.extract import extract_sections
from workflow.keyinfo.grounding import ground
from workflow.keyinfo.standardise import standardise, standardise_many, unknown_terms
from workflow.keyinfo.vqa_json import export_records, import_records, study_meta
from workflow.keyinfo.vqa_json import main as vqa_json_main


def one(rows, name):
    found = [r for r in rows if r["name"] == name]
    assert len(found) == 1, (name, rows)
    return found[0]


def rules_of(audit):
    return {(a["field"], a["rule"]) for a in audit}


def test_our_json_names_map_exact_synonym_contained_fuzzy_and_unknown():
    record = {"findings": [
        {"name": "pleural effusion", "presence": "positive", "location": "left", "level": "small"},
        {"name": "Pneumothoraces", "presence": "absent"},
        {"name": "small left apical pneumothorax", "presence": "negative"},
        {"name": "cardiomegally", "presence": "positive", "level": "moderate"},
        {"name": "focal consolidation concerning for pneumonia", "presence": "positive"},
        {"name": "azygos lobe", "presence": "positive", "location": "right upper"},
    ]}  # fmt: skip
    rows, audit = standardise(record)
    eff = one(rows, "pleural effusion")
    assert (eff["presence"], eff["location"], eff["level"]) == ("positive", "left", "mild")
    ptx = one(rows, "pneumothorax")
    assert (ptx["presence"], ptx["location"]) == ("negative", "left apical")  # merged, location from the name
    assert one(rows, "cardiomegaly")["level"] == "moderate"
    assert one(rows, "consolidation")["type"] == "focal"
    assert one(rows, "pneumonia")["presence"] == "uncertain"
    unknown = one(rows, "unknown")
    assert unknown["raw_name"] == "azygos lobe" and unknown["flags"] == "unknown_name"
    assert unknown["location"] == "right upper"  # attributes of an unknown finding are still standardised
    got = rules_of(audit)
    assert {("name", "synonym"), ("name", "contained"), ("name", "unknown"), ("level", "normalised"),
            ("presence", "presence_word")} <= got  # fmt: skip
    assert any(a["rule"].startswith("fuzzy:") and a["after"] == "cardiomegaly" for a in audit)


def test_fuzzy_cutoff_is_configurable():
    rows, _ = standardise({"findings": [{"name": "atelctasis", "presence": "positive"}]}, fuzzy_cutoff=99)
    assert rows[0]["name"] == "unknown"
    rows, _ = standardise({"findings": [{"name": "atelctasis", "presence": "positive"}]}, fuzzy_cutoff=85)
    assert rows[0]["name"] == "atelectasis"


def test_attribute_words_in_the_wrong_field_are_moved_and_unknown_words_reported():
    rows, audit = standardise({"findings": [
        {"name": "opacity", "presence": "positive", "location": "right lower lobe patchy", "level": "hazy",
         "type": "mild", "change": None},
        {"name": "edema", "presence": "positive", "location": "weird place"},
    ]})  # fmt: skip
    op = one(rows, "lung opacity")
    assert (op["location"], op["type"], op["level"]) == ("right lower lobe", "patchy", "mild")
    assert ("level", "moved:type->level") in rules_of(audit)
    assert ("type", "moved:location->type") in rules_of(audit)
    assert one(rows, "edema")["location"] is None
    report = unknown_terms([{**a, "study_id": 1} for a in audit]).to_pylist()
    assert report[0]["kind"] == "location" and report[0]["term"] == "weird place"


def test_vqa_record_including_malformed_shapes():
    record = {
        "entity": {
            "pleural effusions": {"location": ["left", "right"], "level": "small", "type": None},
            "left-sided pleural effusion": {"location": None, "level": None, "type": "layering"},
            "lung": {"atelectasis": {"location": "bibasilar", "type": "patchy"}},
            "hilar congestion": "mild",
            "edema": [{"location": "perihilar"}, {"level": "moderate"}],
            "pacemaker": {"location": "left chest wall"},
        },
        "uncertain_entity": ["pneumonia", {"description": "aspiration", "location": "right lower lobe"}],
        "no_entity": "pneumothorax, pericardial effusion",
        "opacity_vs_clear": {
            "clear": {"location": "right lung"},
            "opacity": {"location": "location: left base"},
        },
    }
    rows, audit = standardise(record, "vqa")
    # two entries that Medical-CXR-VQA's renaming would collide stay two instances (bilateral / left)
    eff = sorted((r["location"], r["level"], r["type"]) for r in rows if r["name"] == "pleural effusion")
    assert eff == [("bilateral", "mild", None), ("left", None, "layering")]
    at = one(rows, "atelectasis")
    assert (at["location"], at["type"]) == ("bilateral basal", "patchy")
    assert one(rows, "hilar congestion")["level"] == "mild"
    ed = one(rows, "edema")
    assert (ed["location"], ed["level"]) == ("perihilar", "moderate")
    assert one(rows, "aspiration")["presence"] == "uncertain"
    assert one(rows, "pneumonia")["presence"] == "uncertain"
    assert one(rows, "pericardial effusion")["presence"] == "negative"
    opacity = sorted(
        (r["presence"], r["location"], r["raw_name"]) for r in rows if r["name"] == "lung opacity"
    )
    assert opacity == [("negative", "right lung", "clear"), ("positive", "left basal", "opacity")]
    assert {"lifted_nested_entity", "dropped_empty_parent", "list_category", "string_category", "string_value",
            "list_value"} <= {a["rule"] for a in audit}  # fmt: skip
    # a flattened {"description": ...} category and an LLM error record
    rows, audit = standardise({"entity": {"description": "pleural effusion", "location": "right"}}, "vqa")
    assert [(r["name"], r["location"]) for r in rows] == [("pleural effusion", "right")]
    rows, audit = standardise({"entity": "error", "no_entity": []}, "vqa")
    assert rows == [] and ("shape", "llm_error") in rules_of(audit)


def test_standardise_many_gives_contract_tables():
    findings, audit, unknown = standardise_many(
        [
            (
                1,
                10,
                {
                    "findings": [
                        {"name": "efusion", "presence": "positive"},
                        {"name": "blorp", "presence": "no"},
                    ]
                },
            ),
            (2, 20, {"findings": [{"name": "blorp", "presence": "positive"}]}),
        ],
        "findings",
        source="llm",
        round_=0,
    )
    assert (
        findings.schema.equals(FINDINGS)
        and audit.schema.equals(AUDIT)
        and unknown.schema.equals(UNKNOWN_TERMS)
    )
    top = unknown.to_pylist()[0]
    assert (top["term"], top["count"], top["n_studies"]) == ("blorp", 2, 2)


def test_grounding_flags_unsupported_disagreeing_and_missed():
    sections = {"findings": "Small left pleural effusion. No pneumothorax. Heart size is normal.",
                "impression": "Possible left lower lobe pneumonia."}  # fmt: skip
    rules = extract_sections(sections)
    llm, _ = standardise({"findings": [
        {"name": "pleural effusion", "presence": "positive", "evidence": "small left pleural effusion"},
        {"name": "pneumothorax", "presence": "positive"},
        {"name": "pulmonary edema", "presence": "positive", "evidence": "interstitial edema"},
    ]})  # fmt: skip
    flagged = ground(llm, rules, sections, support_cutoff=90)
    flags = {(r["name"], r.get("flags")) for r in flagged}
    assert ("pleural effusion", None) in flags
    assert ("pneumothorax", "presence_disagrees") in flags
    assert ("edema", "unsupported") in flags
    assert ("pneumonia", "missed_by_llm") in flags and ("cardiomegaly", "missed_by_llm") in flags
    assert all(r["source"] == "rules" for r in flagged if "missed_by_llm" in (r.get("flags") or ""))


def test_support_cutoff_decides_whether_a_misspelt_quote_supports_a_finding():
    """keyinfo.support_cutoff: how close an LLM's raw name must come to the report text to count as support."""
    sections = {"findings": "There is a retrocardiac density. No pleural effusion."}
    rules = extract_sections(sections)
    llm = [{"name": "unknown", "raw_name": "retrocardic density", "presence": "positive", "evidence": None}]
    lenient = ground(llm, rules, sections, support_cutoff=90)
    strict = ground(llm, rules, sections, support_cutoff=99)
    assert lenient[0]["name"] == strict[0]["name"] == "unknown"
    assert "unsupported" not in (lenient[0].get("flags") or "")
    assert "unsupported" in strict[0]["flags"]


def test_keyinfo_json_export_then_import_round_trip(tmp_path):
    rows = []
    for study, sections in ((501, {"findings": "Small left and moderate right effusions. Patchy left basilar opacity. "
                                               "Possible pneumonia. No pneumothorax. A PICC line ends in the SVC."}),
                            (502, {"impression": "The lungs are clear."})):  # fmt: skip
        for r in extract_sections(sections):
            rows.append({**r, "subject_id": 7, "study_id": study, "source": "rules"})
    findings = pa.Table.from_pylist(rows, schema=FINDINGS)
    studies = pa.table({"subject_id": [7, 7], "study_id": [501, 502],
                        "study_datetime": [datetime(2150, 1, 2, 10), datetime(2150, 1, 1, 9)]})  # fmt: skip
    images = pa.table({"study_id": [501, 501, 502], "dicom_id": ["lat1", "pa1", "ap2"],
                       "view_code_meaning": ["lateral", "postero-anterior", "antero-posterior"]})  # fmt: skip
    records = export_records(findings, study_meta(studies, images))
    first = records[0]
    assert (first["study_id"], first["dicom_id"], first["view"], first["study_order"]) == (
        "501", "pa1", "postero-anterior", "2.0")  # fmt: skip
    assert first["entity"]["pleural effusion"]["location"] == "left,right"
    assert first["opacity_vs_clear"]["opacity"]["location"] == "left basal"
    assert "pneumonia" in first["uncertain_entity"] and first["no_entity"] == ["pneumothorax"]
    assert all("device" not in k for k in first["entity"])  # devices are not Medical-CXR-VQA findings
    assert records[1]["opacity_vs_clear"] == {"clear": {"location": "lungs"}}
    path = tmp_path / "all_diseases.json"
    path.write_text(json.dumps(records))
    vqa_json_main(["import", "--json", str(path), "--findings", str(tmp_path / "f.parquet"),
                   "--audit", str(tmp_path / "a.parquet"), "--unknown", str(tmp_path / "u.parquet")])  # fmt: skip
    back = pq.read_table(tmp_path / "f.parquet").to_pylist()
    want = {(r["study_id"], r["name"], r["presence"]) for r in rows if r["name"] != "support device"}
    assert {(r["study_id"], r["name"], r["presence"]) for r in back} == want
    # the format keeps one entry per name: left + right come back as one bilateral instance
    assert [r["location"] for r in back if r["name"] == "pleural effusion"] == ["bilateral"]
    findings2, _, _ = import_records(records)
    assert findings2.num_rows == len(back)


def test_keyinfo_json_export_writes_the_side_files_question_gen_reads(tmp_path):
    """The original question_gen.py's lookups succeed on the side files (reference/medical_cxr_vqa.md §6, §8)."""
    import pandas as pd

    reports = {
        601: {"findings": "Small left pleural effusion. Small pericardial effusion. Mild pulmonary edema.",
              "impression": "Possible pneumonia. No pneumothorax."},
        602: {"impression": "No acute cardiopulmonary process. The lungs are clear."},
        603: {"findings": "Moderate cardiomegaly. Patchy right basilar opacity."},
    }  # fmt: skip
    rows = []
    for study, sections in reports.items():
        for r in extract_sections(sections):
            rows.append({**r, "subject_id": 8, "study_id": study, "source": "rules"})
    findings = pa.Table.from_pylist(rows, schema=FINDINGS)
    studies = pa.table({"subject_id": [8, 8, 8], "study_id": [601, 602, 603], "split": ["train", "train", "test"],
                        "study_datetime": [datetime(2150, 1, 2), datetime(2150, 1, 1), datetime(2150, 1, 2)]})  # fmt: skip
    images = pa.table({"study_id": [601, 602, 603], "dicom_id": ["a", "b", "c"],
                       "view_code_meaning": ["postero-anterior", "antero-posterior", "lateral"]})  # fmt: skip
    for name, t in (("f", findings), ("s", studies), ("i", images)):
        pq.write_table(t, tmp_path / f"{name}.parquet")
    out = tmp_path / "qgen"
    vqa_json_main(["export", "--findings", str(tmp_path / "f.parquet"), "--studies", str(tmp_path / "s.parquet"),
                   "--images", str(tmp_path / "i.parquet"), "--json", str(out / "data/all_diseases.json"),
                   "--side-files", str(out)])  # fmt: skip
    records = json.loads((out / "data/all_diseases.json").read_text())

    d_all = pd.read_csv(out / "data/mimic_all.csv")
    assert list(d_all.columns[:2]) == ["subject_id", "study_id"] and len(d_all.columns) == 21
    assert list(d_all.columns[-5:]) == ["dicom_id", "view", "split", "study_date", "study_order"]
    for rec in records:  # question_gen: d_all[d_all.study_id == int(study_id)].view.values[0]
        row = d_all[d_all.study_id == int(rec["study_id"])]
        assert row.view.values[0] == rec["view"]
    assert d_all.set_index("study_id").loc[601, "Pleural Effusion"] == 1.0
    assert d_all.set_index("study_id").loc[601, "Pneumothorax"] == 0.0
    assert d_all.set_index("study_id").loc[601, "Pneumonia"] == -1.0
    assert d_all.set_index("study_id").loc[602, "No Finding"] == 1.0
    assert d_all.set_index("study_id").loc[601, "study_date"] == 21500102

    d_d = pd.read_csv(out / "libs/disease_lib_llm.csv", keep_default_na=False)
    assert list(d_d.columns) == ["id", "report_name", "official_name", "location"]
    assert list(d_d["id"]) == list(range(len(d_d)))
    entity_fre = json.loads((out / "libs/entity_dict.json").read_text())
    counts = list(entity_fre.values())
    assert counts == sorted(counts, reverse=True)
    for rec in records:
        for key in rec["entity"]:
            # find_name_id_in_dd_report_name: the first row with a report_name that is a substring of key
            hit = next(r for r in d_d.itertuples() if any(n in key for n in r.report_name.split(";")))
            assert hit.official_name == key  # never a shorter look-alike
            assert entity_fre[hit.official_name] >= 1  # d_entity_fre[official_name] does not raise
    assert "pericardial effusion" in records[0]["entity"] and "pleural effusion" in records[0]["entity"]
    assert entity_fre["pleural effusion"] == 1
    level_fre = json.loads((out / "libs/level_dict.json").read_text())
    assert set(level_fre) >= {
        rec["entity"]["cardiomegaly"]["level"] for rec in records if "cardiomegaly" in rec["entity"]
    }
    assert json.loads((out / "libs/location_dict.json").read_text())
    for rel, header in (("libs/level_lib.csv", ["level"]), ("libs/location_lib.csv", ["location"]),
                        ("data/type_lib.csv", ["type"]), ("libs/postlocation_lib.csv", ["post_location", "relate_keyword"]),
                        ("libs/position_change.csv", ["from", "to"])):  # fmt: skip
        assert list(pd.read_csv(out / rel).columns) == header
