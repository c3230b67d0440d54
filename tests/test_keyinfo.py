"""The rules extractor (workflow.keyinfo.extract) on realistic report sentences."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest
import yaml
from workflow_run import demo_corpus, prepare_workdir, run_snakemake

from workflow.contract import FINDINGS, KEYINFO_STATS, SECTIONS
from workflow.keyinfo.extract import extract_sections, label_vector
from workflow.keyinfo.libs import _SAFE_LOADER, _STRING_LOADER, LIBS_DIR, load_libs
from workflow.keyinfo.run_rules import main as run_rules_main
from workflow.tables import write_table


def rows_of(text: str, section: str = "findings") -> list[dict]:
    return extract_sections({section: text})


def by_name(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["name"], []).append(r)
    return out


def test_libs_use_only_vocabulary_values_and_cover_every_finding():
    libs = load_libs()
    vocab = libs.vocabulary
    assert set(libs.vqa_name) == set(vocab["findings"]) and len(vocab["findings"]) >= 40
    for tok in libs.tokens.values():
        assert tok.finding is None or tok.finding in vocab["findings"]
        assert tok.level is None or tok.level in vocab["level"]
        assert tok.type is None or tok.type in vocab["type"]
        assert tok.change is None or tok.change in vocab["change"]


@pytest.mark.parametrize("name", sorted(p.name for p in LIBS_DIR.glob("*.yaml")))
def test_each_libs_yaml_file_reads_the_same_with_the_fast_loader(name):
    text = (LIBS_DIR / name).read_text(encoding="utf-8")
    assert yaml.load(text, Loader=_SAFE_LOADER) == yaml.safe_load(text)
    assert yaml.load(text, Loader=_STRING_LOADER) == yaml.load(text, Loader=yaml.BaseLoader)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the CheXpert labeler's sample reports and its expected labels (chexpert-labeler, MIT)
        ("Heart size normal and lungs are clear. No edema or pneumonia. No effusion",
         {"cardiomegaly": "negative", "edema": "negative", "pneumonia": "negative", "pleural effusion": "negative",
          "lung opacity": "negative"}),
        ("1. Left pleural effusion with adjacent atelectasis. Right effusion is also present. "
         "2. Cardiomegaly without overt edema.",
         {"pleural effusion": "positive", "atelectasis": "positive", "cardiomegaly": "positive", "edema": "negative"}),
        ("Minimal patchy airspace disease within the lingula, may reflect atelectasis or consolidation.",
         {"lung opacity": "positive", "atelectasis": "uncertain", "consolidation": "uncertain"}),
        ("1. Stable mild cardiomegaly. 2. Hyperexpanded but clear lungs.",
         {"cardiomegaly": "positive", "hyperinflation": "positive", "lung opacity": "negative"}),
    ],
)  # fmt: skip
def test_report_level_labels_match_the_chexpert_samples(text, expected):
    assert label_vector(text) == expected


def test_blockers_keep_lookalike_findings_apart():
    labels = label_vector(
        "Small pericardial effusion. Subcutaneous emphysema in the left chest wall. "
        "Calcified nodule in the right upper lobe. Massive hiatal hernia."
    )
    assert labels == {"pericardial effusion": "positive", "subcutaneous emphysema": "positive",
                      "granuloma": "positive", "nodule": "positive", "hiatal hernia": "positive"}  # fmt: skip
    rows = by_name(rows_of("Calcified nodule in the right upper lobe."))
    assert rows["granuloma"][0]["type"] == "calcified"
    assert rows["granuloma"][0]["location"] == "right upper lobe"


def test_left_and_right_are_two_instances_with_their_own_attributes():
    rows = by_name(rows_of("Small left and moderate right pleural effusions. No pneumothorax."))
    eff = sorted(rows["pleural effusion"], key=lambda r: r["location"])
    assert [(r["location"], r["level"], r["presence"]) for r in eff] == [
        ("left", "mild", "positive"), ("right", "moderate", "positive")]  # fmt: skip
    assert rows["pneumothorax"][0]["presence"] == "negative"


def test_attributes_from_pre_and_post_modifiers_and_change_after_a_comma():
    rows = by_name(rows_of(
        "There is a moderate layering left pleural effusion, new since the prior study. "
        "Patchy opacity in the right lower lobe. Atelectasis at both bases has increased."
    ))  # fmt: skip
    eff = rows["pleural effusion"][0]
    assert (eff["level"], eff["type"], eff["location"], eff["change"]) == (
        "moderate",
        "layering",
        "left",
        "new",
    )
    op = rows["lung opacity"][0]
    assert (op["type"], op["location"]) == ("patchy", "right lower lobe")
    at = rows["atelectasis"][0]
    assert (at["location"], at["change"]) == ("bilateral basal", "worsened")


def test_presence_conventions():
    labels = label_vector(
        "No new consolidation. Opacity consistent with pneumonia. Pneumothorax cannot be excluded. "
        "No change in the moderate cardiomegaly. The previously seen right effusion has resolved. "
        "No focal consolidation, pleural effusion, or pneumothorax, but there is mild pulmonary edema."
    )
    assert labels["pneumonia"] == "positive"  # "consistent with" asserts
    assert labels["pneumothorax"] == "uncertain"  # uncertain beats the later negative
    assert labels["cardiomegaly"] == "positive"  # "no change" is a pseudo-negation
    assert labels["pleural effusion"] == "negative"
    assert labels["consolidation"] == "negative"  # "no new X" -> negative
    assert labels["edema"] == "positive"  # "but" ends the negation scope
    rows = by_name(rows_of("The previously seen right effusion has resolved."))
    assert rows["pleural effusion"][0]["change"] == "resolved"


def test_anchors_need_a_predicate():
    assert label_vector("The tube tip projects over the cardiac silhouette.") == {
        "support device": "positive"
    }
    assert label_vector("The heart is mildly enlarged.") == {"cardiomegaly": "positive"}
    assert label_vector("Heart size is at the upper limits of normal.") == {"cardiomegaly": "uncertain"}
    assert label_vector("Normal heart size and mediastinal contours.") == {
        "cardiomegaly": "negative", "enlarged cardiomediastinum": "negative"}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No enlargement of the cardiomediastinal silhouette.", {"enlarged cardiomediastinum": "negative"}),
        ("There is no enlargement of the cardiomediastinal silhouette.", {"enlarged cardiomediastinum": "negative"}),
        ("Without enlargement of the cardiomediastinal silhouette.", {"enlarged cardiomediastinum": "negative"}),
        ("The lungs are clear without enlargement of the cardiomediastinal silhouette.",
         {"lung opacity": "negative", "enlarged cardiomediastinum": "negative"}),
        ("No enlargement of the cardiomediastinal silhouette or pleural effusion.",
         {"enlarged cardiomediastinum": "negative", "pleural effusion": "negative"}),
        ("No enlargement of the cardiac silhouette.", {"cardiomegaly": "negative"}),
        ("No enlargement of the heart.", {"cardiomegaly": "negative"}),
        ("Enlargement of the cardiomediastinal silhouette.", {"enlarged cardiomediastinum": "positive"}),
        ("Possibly enlarged lymph nodes in the right hilum.", {"lymphadenopathy": "uncertain"}),
        ("The heart is not enlarged.", {"cardiomegaly": "negative"}),
    ],
)  # fmt: skip
def test_a_trigger_or_predicate_phrase_does_not_hide_the_finding_starting_inside_it(text, expected):
    # "no enlargement" (a cardiomegaly predicate) used to swallow the head of the finding
    # "enlargement of the cardiomediastinal silhouette", leaving an anchor without a predicate: no label
    assert label_vector(text) == expected


def test_attributes_survive_when_a_phrase_is_cut_before_a_finding():
    mild = by_name(rows_of("Mild enlargement of the cardiomediastinal silhouette."))
    assert mild["enlarged cardiomediastinum"][0]["level"] == "mild"
    moderate = by_name(rows_of("Moderately enlarged heart."))  # "moderately enlarged" + "enlarged heart"
    assert moderate["cardiomegaly"][0]["presence"] == "positive"
    assert moderate["cardiomegaly"][0]["level"] == "moderate"
    nodes = by_name(rows_of("Possibly enlarged lymph nodes in the right hilum."))
    assert nodes["lymphadenopathy"][0]["location"] == "right hilum"
    # a blocker still vetoes what starts inside it: a chest wall mass is not a lung mass
    assert "mass" not in label_vector("Chest wall mass lesion.")


def test_rg4_rephrasings_keep_their_labels():
    # the rules rewriter's "No <subject>." and section headings left inside a sentence ("IMPRESSION:")
    # used to make the RG4 label check drop these studies
    from workflow.rg4.rewrite import RulesRewriter, load_rules

    removes = load_rules().scenario_removes["sn"]
    rewriter = RulesRewriter(label_vector=label_vector)
    for sentence, rephrased in [
        ("The enlargement of the cardiomediastinal silhouette has resolved.",
         "No enlargement of the cardiomediastinal silhouette."),
        ("Interval resolution of the enlargement of the cardiomediastinal silhouette.",
         "No enlargement of the cardiomediastinal silhouette."),
        ("IMPRESSION: There has been no change in the minimal right basilar volume loss.",
         "IMPRESSION: Minimal right basilar volume loss."),
        ("IMPRESSION: 1. No change in the mild cardiomegaly.", "IMPRESSION: 1. Mild cardiomegaly."),
    ]:  # fmt: skip
        edit = rewriter.sentence(sentence, removes)
        assert edit.text == rephrased
        assert label_vector(edit.text) == label_vector(sentence) != {}


def test_devices_are_one_row_each_without_location():
    rows = rows_of(
        "A left-sided pacemaker is noted with leads terminating in the right atrium. "
        "An endotracheal tube terminates 4 cm above the carina. External cardiac monitor leads."
    )
    devices = [r for r in rows if r["name"] == "support device"]
    assert sorted(r["raw_name"].lower() for r in devices) == ["endotracheal tube", "pacemaker"]
    assert all(r["location"] is None for r in devices)


def test_only_findings_and_impression_are_read_and_spans_index_the_section_text():
    sections = {
        "indication": "?pneumonia", "comparison": "Prior with pneumothorax.",
        "findings": "Heart size is normal.\n Small right\n pleural effusion.", "impression": "Possible pneumonia.",
    }  # fmt: skip
    rows = extract_sections(sections)
    assert {(r["name"], r["presence"], r["section"]) for r in rows} == {
        ("cardiomegaly", "negative", "findings"), ("pleural effusion", "positive", "findings"),
        ("pneumonia", "uncertain", "impression")}  # fmt: skip
    eff = next(r for r in rows if r["name"] == "pleural effusion")
    # the evidence span: the finding's noun phrase with its attribute words, as written
    assert (
        sections["findings"][eff["start"] : eff["end"]] == "Small right\n pleural effusion" == eff["evidence"]
    )
    assert eff["raw_name"] == "pleural effusion"
    assert eff["location"] == "right" and eff["level"] == "mild"
    # no findings/impression: the last paragraph is read (MIT-LCP's fallback)
    assert label_vector("") == {}
    assert extract_sections({"last_paragraph": "Left lower lobe pneumonia."})[0]["name"] == "pneumonia"


def test_run_rules_cli_writes_the_contract_tables(tmp_path):
    sections = {f.name: [] for f in SECTIONS}
    reports = [
        ("Mild cardiomegaly. No effusion.", "No acute process."),
        (None, None),
        ("Lungs are clear.", None),
    ]
    for k, (findings, impression) in enumerate(reports):
        for f in SECTIONS:
            sections[f.name].append(None)
        sections["subject_id"][-1] = 10 + k
        sections["study_id"][-1] = 50 + k
        sections["findings"][-1] = findings
        sections["impression"][-1] = impression
    import pyarrow as pa

    write_table(pa.Table.from_pydict(sections, schema=SECTIONS), tmp_path / "sections.parquet", SECTIONS)
    run_rules_main(["--sections", str(tmp_path / "sections.parquet"), "--findings", str(tmp_path / "f.parquet"),
                    "--stats", str(tmp_path / "s.parquet"), "--rejects", str(tmp_path / "r.parquet"),
                    "--alternatives", "uncertain", "--hedges", "uncertain"])  # fmt: skip
    findings = pq.read_table(tmp_path / "f.parquet")
    assert findings.schema.equals(FINDINGS)
    got = {(r["study_id"], r["name"], r["presence"], r["source"]) for r in findings.to_pylist()}
    assert got == {(50, "cardiomegaly", "positive", "rules"), (50, "pleural effusion", "negative", "rules"),
                   (52, "lung opacity", "negative", "rules")}  # fmt: skip
    assert pq.read_table(tmp_path / "r.parquet").to_pylist()[0]["study_id"] == 51
    stats = pq.read_table(tmp_path / "s.parquet")
    assert stats.schema.equals(KEYINFO_STATS)
    assert {r["name"]: r["n_positive"] for r in stats.to_pylist()}["cardiomegaly"] == 1


@pytest.mark.slow
def test_keyinfo_rule_through_snakemake(tmp_path):
    """ingest -> sections -> keyinfo_rules on the demo corpus, through the repository's Snakefile."""
    workdir = prepare_workdir(
        tmp_path / "run", {"outdir": str(tmp_path / "run" / "results"), "corpus": demo_corpus()}
    )
    target = workdir / "results" / "keyinfo" / "rules" / "findings.parquet"
    run = run_snakemake(workdir, "--cores", "2", "--nolock", str(target), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    findings = pq.read_table(target)
    assert findings.schema.equals(FINDINGS) and findings.num_rows > 0
    sections = pq.read_table(workdir / "results" / "sections" / "sections.parquet").to_pylist()
    rejects = pq.read_table(workdir / "results" / "keyinfo" / "rules" / "rejects.parquet").to_pylist()
    ids = {r["study_id"] for r in sections}
    assert set(findings.column("study_id").to_pylist()) <= ids and {r["study_id"] for r in rejects} <= ids
    # the rule's rows are exactly what the library function gives for those sections
    first = next(r for r in sections if r["findings"] or r["impression"])
    want = {(r["name"], r["presence"], r["location"]) for r in extract_sections(first)}
    got = {
        (r["name"], r["presence"], r["location"])
        for r in findings.to_pylist()
        if r["study_id"] == first["study_id"]
    }
    assert got == want
    log = (workdir / "results" / "logs" / "keyinfo_rules.log").read_text()
    assert f"keyinfo_rules: {len(sections)} studies in" in log


def test_run_rules_on_two_workers_writes_what_one_worker_writes(tmp_path):
    """Batches extracted on a process pool come back in order and complete (small batches: many in flight)."""
    import pyarrow as pa

    texts = ["Mild cardiomegaly. No effusion.", "No focal consolidation, large effusion, or pneumothorax.",
             "Possible small left effusion.", "Lungs are clear.", None]  # fmt: skip
    sections = {f.name: [None] * 100 for f in SECTIONS}
    sections["subject_id"] = list(range(100))
    sections["study_id"] = list(range(1000, 1100))
    sections["findings"] = [texts[k % len(texts)] for k in range(100)]
    write_table(pa.Table.from_pydict(sections, schema=SECTIONS), tmp_path / "sections.parquet", SECTIONS)
    out = {}
    for workers in ("1", "2"):
        run_rules_main(["--sections", str(tmp_path / "sections.parquet"), "--findings", str(tmp_path / f"f{workers}.parquet"),
                        "--stats", str(tmp_path / f"s{workers}.parquet"), "--rejects", str(tmp_path / f"r{workers}.parquet"),
                        "--batch-size", "7", "--workers", workers, "--alternatives", "uncertain",
                        "--hedges", "uncertain"])  # fmt: skip
        out[workers] = pq.read_table(tmp_path / f"f{workers}.parquet").to_pylist()
    assert out["1"] == out["2"]
    assert len({r["study_id"] for r in out["2"]}) == 80
    assert len(pq.read_table(tmp_path / "r2.parquet")) == 20


def _shard_corpus(tmp_path):
    """100 studies in shuffled study-id order (the merge must restore the sections order, not sort), with
    reports of several findings, silent ones, normal statements and no text at all."""
    import random

    import pyarrow as pa

    texts = ["Mild cardiomegaly. No effusion.", "No acute cardiopulmonary process.",
             "Possible small left effusion. Right PICC line in place.", "Comparison is made to the prior study.",
             None]  # fmt: skip
    ids = list(range(1000, 1100))
    random.Random(4).shuffle(ids)
    sections = {f.name: [None] * 100 for f in SECTIONS}
    sections["subject_id"] = [i // 3 for i in ids]
    sections["study_id"] = ids
    sections["findings"] = [texts[k % len(texts)] for k in range(100)]
    sections["impression"] = [texts[(k // 2) % len(texts)] for k in range(100)]
    write_table(pa.Table.from_pydict(sections, schema=SECTIONS), tmp_path / "sections.parquet", SECTIONS)
    return tmp_path / "sections.parquet"


TABLES = ("findings", "stats", "rejects", "normal-statements")
CONVENTIONS = ["--alternatives", "uncertain", "--hedges", "uncertain"]


def _tables(folder, tables=TABLES):
    """--findings folder/findings.parquet ... (the folder made)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [a for t in tables for a in (f"--{t}", str(folder / f"{t}.parquet"))]


def _shard_tables(folders, tables=TABLES):
    """--shard-findings f0/findings.parquet f1/findings.parquet ... (shard order as given)."""
    return [a for t in tables for a in (f"--shard-{t}", *(str(f / f"{t}.parquet") for f in folders))]


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_merged_shards_are_the_unsharded_run_byte_for_byte(tmp_path, shards):
    """Small batches (7 studies): shard rows of one sections batch come from several shard batches."""
    sections = _shard_corpus(tmp_path)
    common = ["--sections", str(sections), "--batch-size", "7"]
    run_rules_main([*common, *_tables(tmp_path / "whole"), *CONVENTIONS])
    folders = [tmp_path / f"shard{k}" for k in range(shards)]
    for k, folder in enumerate(folders):
        run_rules_main([*common, *_tables(folder), "--shard", str(k), "--shards", str(shards), *CONVENTIONS])
    run_rules_main(["merge", *common, *_shard_tables(folders), *_tables(tmp_path / "merged")])
    for t in TABLES:
        merged, whole = (tmp_path / d / f"{t}.parquet" for d in ("merged", "whole"))
        assert merged.read_bytes() == whole.read_bytes(), t
    for k, folder in enumerate(folders):  # each shard read only its studies
        ids = pq.read_table(folder / "normal-statements.parquet")["study_id"].to_pylist()
        assert ids and all(i % shards == k for i in ids)
    assert pq.read_table(tmp_path / "merged" / "findings.parquet").num_rows > 100
    assert len(pq.read_table(tmp_path / "merged" / "rejects.parquet")) == 10


def test_merge_refuses_shards_given_out_of_order(tmp_path):
    sections = _shard_corpus(tmp_path)
    folders = [tmp_path / f"shard{k}" for k in range(2)]
    for k, folder in enumerate(folders):
        run_rules_main(["--sections", str(sections), *_tables(folder), "--shard", str(k), "--shards", "2",
                        *CONVENTIONS])  # fmt: skip
    tables = TABLES[:3]  # the normal statements are optional
    with pytest.raises(ValueError, match="not shard 0 of 2"):
        run_rules_main(["merge", "--sections", str(sections), *_shard_tables(folders[::-1], tables),
                        *_tables(tmp_path / "merged", tables)])  # fmt: skip


def test_the_dag_runs_one_rules_job_per_shard_and_one_merge(tmp_path):
    workdir = prepare_workdir(
        tmp_path / "run",
        {"outdir": str(tmp_path / "run" / "results"), "corpus": demo_corpus(), "keyinfo": {"shards": 3}},
    )
    run = run_snakemake(workdir, "-n", "-p", str(workdir / "results" / "keyinfo" / "studies.parquet"))
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = re.findall(r"^rule (\w+):", run.stdout, re.MULTILINE)
    assert jobs.count("keyinfo_rules_shard") == 3 and jobs.count("keyinfo_rules") == 1
    assert sorted(re.findall(r"--shard (\d) --shards 3 --workers 1 ", run.stdout)) == ["0", "1", "2"]


@pytest.mark.parametrize("shards", [1, 2])
def test_each_shard_reads_the_reports_the_lenient_reading_needs(tmp_path, shards):
    """The shard's own lenient look-up (blank findings and impression, one studies.parquet pass) gives every
    study the sections that the whole table's look-up gives it (every study whose findings and impression
    are blank, white space counting as blank, and its report)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from workflow.contract import STUDIES
    from workflow.keyinfo.extract import sections_for_reading
    from workflow.keyinfo.run_rules import _sections_table, plan_slices

    blanks = [None, "", " \n ", "Small left effusion."]
    ids = list(range(200, 232))
    sections = {f.name: [None] * len(ids) for f in SECTIONS}
    sections["subject_id"] = ids
    sections["study_id"] = ids
    sections["findings"] = [blanks[k % 4] for k in range(len(ids))]
    sections["impression"] = [blanks[(k // 4) % 4] for k in range(len(ids))]
    sections["last_paragraph"] = ["Impression: No pneumothorax." if k % 3 else None for k in range(len(ids))]
    write_table(pa.Table.from_pydict(sections, schema=SECTIONS), tmp_path / "sections.parquet", SECTIONS)
    reported = ids[::2]  # some studies have no report row; one report has no header, one is empty
    reports = [
        ("Findings: No effusion.\nImpression: No pneumothorax." if k % 5 else "No header.") for k in reported
    ]
    reports[1] = ""
    studies = {"subject_id": reported, "study_id": reported, "split": ["train"] * len(reported),
               "study_datetime": [None] * len(reported), "report": reports, "source_path": ["x"] * len(reported)}  # fmt: skip
    write_table(pa.Table.from_pydict(studies, schema=STUDIES), tmp_path / "studies.parquet", STUDIES)
    t = pq.read_table(tmp_path / "sections.parquet", columns=["study_id", "findings", "impression"])
    blank = [
        pc.or_kleene(pc.is_null(t[c]), pc.equal(pc.utf8_trim_whitespace(t[c]), ""))
        for c in ("findings", "impression")
    ]
    silent = set(t.filter(pc.and_kleene(*blank))["study_id"].to_pylist())
    written = pq.read_table(tmp_path / "studies.parquet", columns=["study_id", "report"]).to_pylist()
    whole = {r["study_id"]: r["report"] for r in written if r["study_id"] in silent}
    for shard in range(shards):
        slices = plan_slices(
            tmp_path / "sections.parquet", tmp_path / "studies.parquet", True, 5, shard, shards
        )
        table = _sections_table(str(tmp_path / "sections.parquet"), shard, shards).to_pylist()
        assert [r["study_id"] for r in table] == [i for i in ids if i % shards == shard]
        given = {sid: text for part in slices for sid, text in part.lenient.items()}
        for row in table:
            sid = row["study_id"]
            strict = {name: row[name] for name in ("findings", "impression", "last_paragraph")}
            mine = sections_for_reading(strict, given[sid]) if sid in given else strict
            theirs = sections_for_reading(strict, whole.get(sid))
            assert mine == theirs
    assert any(sections_for_reading({"findings": None, "impression": None}, t) != {"findings": None,
               "impression": None} for t in whole.values())  # fmt: skip
