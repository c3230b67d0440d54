"""Medical-CXR-VQA question generation (workflow/vqa/): every type, the fixed bugs, determinism."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from workflow_run import demo_corpus, prepare_workdir, run_snakemake

from workflow.contract import FINDINGS, IMAGES, KEYINFO_STUDIES, QUESTIONS, STUDIES, VQA_STATS
from workflow.tables import conform
from workflow.vqa.__main__ import main
from workflow.vqa.config import QUESTION_TYPES, VqaConfig
from workflow.vqa.generate import generate
from workflow.vqa.leak import leak_report, text_only_probe
from workflow.vqa.levels import level_word_counts, level_words, load_level_lib
from workflow.vqa.libs import (
    STYLE_TEMPLATES,
    Templates,
    left_out_names,
    load_display_names,
    load_templates,
    load_vocabulary,
)
from workflow.vqa.phrases import flip_laterality, location_phrase
from workflow.vqa.prepare import prepare
from workflow.vqa.questions.abnormality import build_abnormality
from workflow.vqa.questions.attribute import build_attribute
from workflow.vqa.questions.frame import distinct_join
from workflow.vqa.questions.location import build_location
from workflow.vqa.questions.presence import build_presence
from workflow.vqa.questions.view import build_view
from workflow.vqa.stats import question_counts, question_stats
from workflow.vqa.writer import CSV_COLUMNS, LEAK_TYPES

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = load_templates(REPO / "libs" / "vqa_templates.yaml")
NAMES = load_vocabulary(REPO / "libs" / "vocabulary.yaml")


def _clean(**kw) -> VqaConfig:
    """The clean style (our paraphrases and answer forms), which TEMPLATES belong to."""
    return VqaConfig(style="clean", **kw)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_vqa", REPO / "bench" / "bench_vqa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def synthetic():
    """3,000 MIMIC-like studies (the benchmark's generator at small scale) and their questions."""
    findings, images, studies = _bench().synthetic_inputs(3000, seed=1)
    table, prepared, info = generate(findings, images, studies, TEMPLATES, NAMES, _clean(seed=3))
    return findings, images, studies, table.to_pandas(), prepared


def _image(study_id, subject_id, view, n=0, split="train"):
    return {
        "dicom_id": f"d{study_id}-{n}",
        "subject_id": subject_id,
        "study_id": study_id,
        "split": split,
        "view_position": view,
        "view_code_meaning": None,
        "image_path": f"files/p10/p{subject_id}/s{study_id}/d{study_id}-{n}.jpg",
    }


def _finding(study_id, name, presence="positive", location=None, level=None, type_=None, subject_id=10000001):
    return {
        "subject_id": subject_id,
        "study_id": study_id,
        "name": name,
        "presence": presence,
        "location": location,
        "level": level,
        "type": type_,
    }


def _frames(findings_rows, image_rows, study_rows):
    findings = pd.DataFrame(
        findings_rows, columns=["subject_id", "study_id", "name", "presence", "location", "level", "type"]
    )
    return findings, pd.DataFrame(image_rows), pd.DataFrame(study_rows)


def _parse(questions: pd.DataFrame, templates: Templates = TEMPLATES) -> pd.DataFrame:
    """Recover the slots (name, location, view) of each question from its template."""
    patterns = {}
    for tid, text in zip(templates.ids, templates.texts, strict=True):
        rx = re.escape(text).replace(re.escape("a {view}"), "an?\\ " + re.escape("{view}"))
        for slot in ("name", "location", "view"):
            rx = rx.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>.+?)")
        patterns[tid] = re.compile(f"^{rx}$")
    rows = []
    for tid, q in zip(questions["template_id"], questions["question"], strict=True):
        m = patterns[tid].match(q)
        assert m, (tid, q)
        rows.append(m.groupdict())
    return pd.DataFrame(rows, index=questions.index).reindex(columns=["name", "location", "view"])


# ------------------------------------------------------------------------------------------------ types


def test_every_type_is_generated_with_the_contract_schema(synthetic):
    *_, q, _ = synthetic
    counts = q["question_type"].value_counts()
    assert set(counts.index) == set(QUESTION_TYPES)
    assert pa.Table.from_pandas(q, preserve_index=False).cast(QUESTIONS).num_rows == len(q)
    assert q["qa_id"].is_unique
    assert not q.duplicated(["study_id", "question_type"]).any()  # at most one question per type and study
    # every template of every type is used
    assert set(q["template_id"]) == set(TEMPLATES.ids)


def test_answers_follow_the_findings(synthetic):
    findings, _, _, q, _ = synthetic
    pos = findings[findings["presence"] == "positive"]
    slots = _parse(q)
    q = q.join(slots)
    by_pair = pos.groupby(["study_id", "name"])

    level = q[q["question_type"] == "level"]
    assert len(level) > 100
    levels = by_pair["level"].agg(lambda s: set(s.dropna()))
    for r in level.itertuples():
        assert levels[(r.study_id, r.name)] == {r.answer}

    typ = q[q["question_type"] == "type"]
    types = by_pair["type"].agg(lambda s: ", ".join(sorted(set(s.dropna()))))
    assert all(types[(r.study_id, r.name)] == r.answer for r in typ.itertuples())

    abn = q[q["template_id"].str.startswith("abn.list")]
    pos_named = pos[pos["name"].isin(NAMES) & (pos["name"] != "support device")]
    lists = pos_named.groupby("study_id")["name"].agg(set)
    assert all(set(r.answer.split(", ")) == lists[r.study_id] for r in abn.itertuples())
    abnormal = set(pos[pos["name"] != "support device"]["study_id"])
    yn = q[q["template_id"].str.startswith("abn.yesno")]
    assert all((r.answer == "yes") == (r.study_id in abnormal) for r in yn.itertuples())


def test_location_questions_pair_a_finding_with_its_own_location(synthetic):
    findings, _, _, q, _ = synthetic
    located = findings[(findings["presence"] == "positive") & findings["location"].notna()]
    locs = located.groupby(["study_id", "name"])["location"].agg(set)
    loc_q = q[q["question_type"] == "location"].join(_parse(q))
    assert len(loc_q) > 100
    for r in loc_q.itertuples():
        own = locs[(r.study_id, r.name)]
        if r.template_id.startswith("loc.side"):
            # left/right only when every location of THIS finding is on that one side
            assert r.answer in ("left", "right")
            assert {loc.split()[0] for loc in own} == {r.answer}
        else:
            assert set(r.answer.split(", ")) == own
    # the original's bug: a location from another finding of the same study
    region = q[q["template_id"].str.startswith("abn.region")].join(_parse(q))
    phrase = {location_phrase(loc): loc for loc in located["location"].unique()}
    for r in region.itertuples():
        loc = phrase[r.location]
        at = set(located[(located["study_id"] == r.study_id) & (located["location"] == loc)]["name"])
        assert set(r.answer.split(", ")) == at


def test_presence_answers_are_true(synthetic):
    findings, _, _, q, _ = synthetic
    pres = q[q["question_type"] == "presence"].join(_parse(q))
    status = findings.groupby(["study_id", "name"])["presence"].agg(set)
    located = findings[(findings["presence"] == "positive") & findings["location"].notna()]
    phrase = {location_phrase(loc): loc for loc in set(located["location"])}
    for r in pres.itertuples():
        st = status.get((r.study_id, r.name), set())
        if r.answer == "yes":
            assert "positive" in st
            if isinstance(r.location, str):
                own = set(
                    located[(located["study_id"] == r.study_id) & (located["name"] == r.name)]["location"]
                )
                assert phrase[r.location] in own
        else:
            assert r.answer == "no"
            if (
                isinstance(r.location, str) and "positive" in st
            ):  # a one-sided finding asked on the other side
                own = {
                    loc.split()[0]
                    for loc in located[(located["study_id"] == r.study_id) & (located["name"] == r.name)][
                        "location"
                    ]
                }
                assert (
                    len(own) == 1
                    and own <= {"left", "right"}
                    and phrase.get(r.location, r.location).split()[0] not in own
                )
            else:
                assert not st & {"positive", "uncertain"}


def test_presence_does_not_leak_through_wording(synthetic):
    *_, q, _ = synthetic
    pres = q[q["question_type"] == "presence"]
    per_template = pres.groupby("template_id")["answer"].value_counts().unstack(fill_value=0)
    assert (per_template["yes"] == per_template["no"]).all()
    # stronger: every distinct question text is answered "yes" exactly as often as "no" (the original's
    # "... lung area?" = yes / "... area?" = no fails this for every located question)
    per_question = pres.groupby("question")["answer"].value_counts().unstack(fill_value=0)
    assert len(per_question) > 100
    assert (per_question["yes"] == per_question["no"]).all()
    probe = text_only_probe(pres["question"], pres["answer"], seed=0)
    assert probe["gain"] < 0.03, probe
    for qtype in ("abnormality", "view"):
        yn = q[(q["question_type"] == qtype) & q["answer"].isin(["yes", "no"])]
        per_q = yn.groupby("question")["answer"].value_counts().unstack(fill_value=0)
        assert len(per_q) >= 2 and (per_q["yes"] == per_q["no"]).all()


def test_leak_probe_detects_a_leaky_question_set():
    """The probe itself can fail: the original's wording asymmetry is caught."""
    rng = np.random.default_rng(0)
    names = rng.choice(["pleural effusion", "edema", "atelectasis", "pneumothorax"], size=4000)
    yes = rng.random(4000) < 0.5
    questions = pd.Series(
        [
            f"is there {n} in the left lung area?" if y else f"is there {n} in the right area?"
            for n, y in zip(names, yes, strict=True)
        ]
    )
    answers = pd.Series(np.where(yes, "yes", "no"))
    probe = text_only_probe(questions, answers)
    assert probe["gain"] > 0.4
    assert min(probe["naive_bayes_accuracy"], probe["logreg_accuracy"]) > 0.95


def test_view_questions(synthetic):
    _, images, _, q, prepared = synthetic
    view = q[q["question_type"] == "view"].join(_parse(q))
    study_view = prepared.studies.set_index("study_id")["view"].map({0: "PA", 1: "AP"})
    for r in view.itertuples():
        actual = study_view[r.study_id]
        if r.template_id.startswith("view.open"):
            assert r.answer == actual
        else:
            assert r.answer == ("yes" if r.view == actual else "no")
    # balanced per split: a model answering the majority view gains nothing
    for _, part in view.groupby("split"):
        v = part["study_id"].map(study_view)
        assert (v == "PA").sum() == (v == "AP").sum()


# ------------------------------------------------------------------------------------------- fixed bugs


def test_no_substring_confusion():
    """Pericardial effusion is not pleural effusion; enlarged cardiomediastinum is not cardiomegaly."""
    f_rows, img_rows, st_rows = [], [], []
    for i in range(400):
        sid, subj = 50_000_000 + i, 10_000_000 + i
        st_rows.append({"subject_id": subj, "study_id": sid, "split": "train"})
        img_rows.append(_image(sid, subj, "PA" if i % 2 else "AP"))
        if i < 200:
            f_rows.append(_finding(sid, "pericardial effusion", subject_id=subj))
            f_rows.append(_finding(sid, "enlarged cardiomediastinum", level="mild", subject_id=subj))
        else:  # the other half has the look-alikes, so both names are asked about
            f_rows.append(_finding(sid, "pleural effusion", location="left", subject_id=subj))
            f_rows.append(_finding(sid, "cardiomegaly", level="moderate", subject_id=subj))
    findings, images, studies = _frames(f_rows, img_rows, st_rows)
    q = generate(findings, images, studies, TEMPLATES, NAMES, _clean())[0].to_pandas()
    q = q.join(_parse(q))
    first = q[q["study_id"] < 50_000_200]
    assert not first["answer"].str.contains("pleural effusion|cardiomegaly").any()
    asked = first[first["question_type"] == "presence"]
    assert len(asked) > 20
    assert (asked[asked["name"].isin(["pleural effusion", "cardiomegaly"])]["answer"] == "no").all()
    assert (
        asked[asked["name"].isin(["pericardial effusion", "enlarged cardiomediastinum"])]["answer"] == "yes"
    ).all()
    lv = first[first["question_type"] == "level"]
    assert set(lv["name"]) == {"enlarged cardiomediastinum"} and set(lv["answer"]) == {"mild"}


def test_unknown_names_never_crash_and_are_not_asked_about():
    rows = [
        _finding(1, "unknown"),  # the standardiser could not name it
        _finding(1, "Frobnication of the hilum", location="left"),  # not in the vocabulary at all
        _finding(1, "pneumothorax", "negative"),
        _finding(2, "unknown", "uncertain"),
        _finding(2, None),
        _finding(2, "edema", "maybe"),  # a presence value outside the contract
        _finding(3, "edema", level="mild"),
    ]
    images = [_image(s, 10000001, "PA") for s in (1, 2, 3)]
    studies = [{"subject_id": 10000001, "study_id": s, "split": "train"} for s in (1, 2, 3)]
    findings, images, studies = _frames(rows, images, studies)
    table, prepared, info = generate(findings, images, studies, TEMPLATES, NAMES, _clean())
    q = table.to_pandas()
    assert info["unknown_name_rows"] == 4
    assert not q["question"].str.contains("unknown|frobnication", case=False).any()
    assert not q["answer"].str.contains("unknown|frobnication", case=False).any()
    s1 = q[q["study_id"] == 1]
    # study 1 has an abnormality we cannot name: never "no abnormality", never an incomplete list
    assert not ((s1["question_type"] == "abnormality") & (s1["answer"] == "no")).any()
    assert not s1["template_id"].str.startswith("abn.list").any()
    # ... and its "no" presence answers come only from explicit negations
    pres = s1[(s1["question_type"] == "presence") & (s1["answer"] == "no")]
    assert pres["question"].str.contains("pneumothorax").all()


def test_a_study_without_findings_rows_is_never_called_normal():
    """No rows at all may mean the report was not read: no "no abnormality", no "not mentioned" answers."""
    rows = [_finding(1, "edema", level="mild"), _finding(1, "pneumothorax", "negative")]
    rows += [_finding(s, "pneumothorax", "negative") for s in range(3, 40)]
    images = [_image(s, 10000001, "PA" if s % 2 else "AP") for s in range(1, 40)]
    studies = [{"subject_id": 10000001, "study_id": s, "split": "train"} for s in range(1, 40)]
    findings, images, studies = _frames(rows, images, studies)
    cfg = _clean(abnormality_no_finding_rate=1.0)
    q = generate(findings, images, studies, TEMPLATES, NAMES, cfg)[0].to_pandas()
    s2 = q[q["study_id"] == 2]
    assert set(s2["question_type"]) <= {"view"}
    normal = q[(q["question_type"] == "abnormality") & (q["answer"] == "no")]
    assert len(normal) == 1 and normal["study_id"].iloc[0] >= 3


def test_studies_without_frontal_image_get_no_questions(tmp_path):
    rows = [_finding(s, "pleural effusion", location="right", level="small") for s in (1, 2, 3, 4)]
    images = [
        _image(1, 10000001, "PA"),
        _image(1, 10000001, "LATERAL", 1),
        _image(2, 10000001, "LATERAL"),
        _image(2, 10000001, "LL", 1),
        {**_image(3, 10000001, ""), "view_code_meaning": "antero-posterior"},  # blank ViewPosition
    ]
    studies = [{"subject_id": 10000001, "study_id": s, "split": "train"} for s in (1, 2, 3, 4)]
    findings, images, studies = _frames(rows, images, studies)
    table, prepared, _ = generate(findings, images, studies, TEMPLATES, NAMES, _clean())
    q = table.to_pandas()
    assert set(q["study_id"]) <= {1, 3}
    assert (q.loc[q["study_id"] == 1, "dicom_id"] == "d1-0").all()  # the frontal image, not the lateral
    rejects = pd.DataFrame(prepared.rejects.rows)
    assert dict(zip(rejects["study_id"], rejects["reason"], strict=True))[2] == "no_frontal_image"
    assert dict(zip(rejects["study_id"], rejects["reason"], strict=True))[4] == "no_image"
    # every input study is accounted for
    assert set(q["study_id"]) | set(rejects["study_id"]) == {1, 2, 3, 4}


def test_iu_frontal_images_get_questions_but_no_view_question():
    """IU X-Ray only says "frontal" (ingest writes PA): the study is asked about, but not its projection."""
    rows = [_finding(s, "cardiomegaly", level="mild") for s in (1, 2)]
    images = [
        {**_image(1, 11, "PA"), "view_code_meaning": "frontal"},
        {**_image(1, 11, "LATERAL", 1), "view_code_meaning": "lateral"},
        {**_image(2, 12, "PA"), "view_code_meaning": "postero-anterior"},
    ]
    studies = [
        {"subject_id": 11, "study_id": 1, "split": "train"},
        {"subject_id": 12, "study_id": 2, "split": "train"},
    ]
    findings, images, studies = _frames(rows, images, studies)
    cfg = _clean(view_balance=False)
    q = generate(findings, images, studies, TEMPLATES, NAMES, cfg)[0].to_pandas()
    assert set(q.loc[q["study_id"] == 1, "question_type"]) >= {"abnormality", "level"}
    assert set(q.loc[q["question_type"] == "view", "study_id"]) == {2}


def test_split_comes_from_the_studies_table():
    rows = [_finding(s, "edema", level="mild") for s in (1, 2, 3)]
    images = [
        _image(1, 11, "PA", split="train"),
        _image(2, 12, "AP", split="train"),
        _image(3, 13, "AP", split="test"),
    ]
    studies = [
        {
            "subject_id": 11,
            "study_id": 1,
            "split": "validate",
        },  # the official split wins over the image's copy
        {"subject_id": 12, "study_id": 2, "split": "test"},
        {"subject_id": 13, "study_id": 3, "split": None},  # no study split: the image's
    ]
    findings, images, studies = _frames(rows, images, studies)
    q = generate(findings, images, studies, TEMPLATES, NAMES, _clean(view_balance=False))[0].to_pandas()
    assert dict(zip(q["study_id"], q["split"], strict=False)) == {1: "validate", 2: "test", 3: "test"}
    assert (q.groupby("study_id")["subject_id"].first() == pd.Series({1: 11, 2: 12, 3: 13})).all()


def test_determinism_by_seed():
    findings, images, studies = _bench().synthetic_inputs(800, seed=5)
    run = lambda seed: generate(findings, images, studies, TEMPLATES, NAMES, _clean(seed=seed))[0]  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert a.equals(b)
    assert not a.equals(c)
    # input row order does not matter
    shuffled = findings.sample(frac=1, random_state=0)
    assert generate(shuffled, images, studies, TEMPLATES, NAMES, _clean(seed=7))[0].equals(a)


def test_builders_leave_the_prepared_inputs_unchanged_and_do_not_depend_on_their_order():
    findings, images, studies = _bench().synthetic_inputs(800, seed=9)
    cfg = _clean(seed=2)
    prepared = prepare(findings, images, studies, NAMES)
    assert any(flip_laterality(loc) for loc in prepared.locations)  # laterality flips are possible
    before = copy.deepcopy(prepared)
    builders = {
        "presence": lambda: build_presence(prepared, TEMPLATES, cfg),
        "abnormality": lambda: build_abnormality(prepared, TEMPLATES, cfg),
        "view": lambda: build_view(prepared, TEMPLATES, cfg),
        "location": lambda: build_location(prepared, TEMPLATES, cfg),
        "level": lambda: build_attribute(prepared, TEMPLATES, cfg, "level"),
        "type": lambda: build_attribute(prepared, TEMPLATES, cfg, "type"),
    }
    forward = {qtype: build() for qtype, build in builders.items()}
    backward = {qtype: builders[qtype]() for qtype in reversed(builders)}
    for qtype, (frame, counts) in forward.items():
        assert len(frame), qtype
        pd.testing.assert_frame_equal(frame, backward[qtype][0])
        assert counts == backward[qtype][1]
    for name, value in vars(before).items():
        after = getattr(prepared, name)
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, after), name
        elif isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(value, after, obj=name)
        elif name == "rejects":
            assert value.rows == after.rows
        else:
            assert value == after, name


def test_display_names_from_the_keyinfo_lib(tmp_path):
    lib = tmp_path / "findings.csv"
    lib.write_text("name,vqa_name\nlung opacity,opacity\nhiatal hernia,hernia\nsupport device,\n")
    display = load_display_names(lib, NAMES)
    assert display[NAMES.index("lung opacity")] == "opacity"
    assert display[NAMES.index("support device")] == "support device"
    assert display[NAMES.index("edema")] == "edema"
    assert load_display_names(None, NAMES) == NAMES  # no lib configured: canonical names
    with pytest.raises(FileNotFoundError, match="vqa.names"):  # a misspelt path fails
        load_display_names(tmp_path / "absent.csv", NAMES)
    (tmp_path / "wrong.csv").write_text("name,label\nedema,x\n")
    with pytest.raises(ValueError, match="vqa.names.*vqa_name"):
        load_display_names(tmp_path / "wrong.csv", NAMES)
    assert left_out_names(lib) == ["support device"]  # an empty vqa_name: the dataset leaves it out


def test_location_phrases_cover_the_vocabulary():
    import itertools

    import yaml

    voc = yaml.safe_load((REPO / "libs" / "vocabulary.yaml").read_text())["location"]
    for lat, zone, struct in itertools.product(
        [None, *voc["laterality"]], [None, *voc["zone"]], [None, *voc["structure"]]
    ):
        loc = " ".join(x for x in (lat, zone, struct) if x)
        if loc:
            phrase = location_phrase(loc)
            assert phrase.startswith(("the ", "both ")) and "  " not in phrase
    assert location_phrase("left basal") == "the left lung base"
    assert location_phrase("bilateral") == "both lungs"
    assert location_phrase("right lower lobe") == "the right lower lobe"


# ------------------------------------------------------------------------------------------------ outputs


OUTPUTS = {
    "questions": "questions.parquet",
    "csv": "questions.csv",
    "stats": "stats.parquet",
    "stats-csv": "stats.csv",
    "leak": "leak.csv",
    "rejects": "rejects.parquet",
}


def _write_inputs(folder: Path, findings, images, studies, keyinfo_studies=None) -> dict[str, Path]:
    bench = _bench()
    paths = {}
    tables = [("findings", findings, FINDINGS), ("images", images, IMAGES), ("studies", studies, STUDIES)]
    if keyinfo_studies is not None:
        tables.append(("keyinfo-studies", keyinfo_studies, KEYINFO_STUDIES))
    folder.mkdir(parents=True, exist_ok=True)
    for name, df, schema in tables:
        paths[name] = folder / f"{name}.parquet"
        pq.write_table(bench.to_contract(df, schema), paths[name])
    return paths


def _run_cli(
    inputs: dict[str, Path], outdir: Path, shards: int, *options: str, seed: int = 0
) -> dict[str, Path]:
    """The two commands of rules/vqa.smk: ``shards`` shard jobs, then the merge; the merged outputs."""
    shard_out = [
        (outdir / f"shard{k}" / "questions.parquet", outdir / f"shard{k}" / "rejects.parquet")
        for k in range(shards)
    ]
    for k, (questions, rejects) in enumerate(shard_out):
        main(
            [
                "shard",
                *(f"--{name}={path}" for name, path in inputs.items()),
                f"--names={REPO / 'libs' / 'findings.csv'}",
                f"--seed={seed}",
                f"--shard={k}",
                f"--shards={shards}",
                f"--questions={questions}",
                f"--rejects={rejects}",
                *options,
            ]
        )
    out = {name: outdir / file for name, file in OUTPUTS.items()}
    main(
        [
            "merge",
            "--shard-questions",
            *(str(q) for q, _ in shard_out),
            "--shard-rejects",
            *(str(r) for _, r in shard_out),
            f"--seed={seed}",
            *(f"--{name}={path}" for name, path in out.items()),
        ]
    )
    return out


def test_cli_writes_questions_csv_stats(tmp_path):
    findings, images, studies = _bench().synthetic_inputs(600, seed=2)
    inputs = _write_inputs(tmp_path, findings, images, studies)
    out = _run_cli(inputs, tmp_path / "vqa", 1, "--view-balance=false", "--style=clean", seed=1)

    q = pq.read_table(out["questions"])
    assert q.schema.equals(QUESTIONS)
    csv = pd.read_csv(out["csv"])
    assert list(csv.columns) == ["study_id", "subject_id", "question_type", "question", "answer"]
    assert len(csv) == q.num_rows
    if (REPO / "libs" / "findings.csv").exists():  # the paper's name for lung opacity
        assert not csv["question"].str.contains("lung opacity").any()
    stats = pq.read_table(out["stats"])
    assert stats.schema.equals(VQA_STATS)
    s = stats.to_pandas().set_index(["question_type", "split"])
    qt = q.to_pandas()
    for t in QUESTION_TYPES:
        assert s.loc[(t, "all"), "n_questions"] == (qt["question_type"] == t).sum()
        for split, n in qt[qt["question_type"] == t]["split"].value_counts().items():
            assert s.loc[(t, split), "n_questions"] == n
    assert s.loc[("presence", "all"), "yes_ratio"] == 0.5
    # the type mix next to the released dataset's (780,014 pairs)
    stats_csv = pd.read_csv(out["stats-csv"]).set_index(["question_type", "split"])
    assert stats_csv.loc[("view", "all"), "released_n"] == 92_048
    assert stats_csv.loc[("abnormality", "all"), "released_share"] == pytest.approx(0.244, abs=5e-4)
    assert stats_csv.xs("all", level="split")["share"].sum() == pytest.approx(1.0)
    n_all = (qt["question_type"] == "level").sum() / len(qt)
    assert stats_csv.loc[("level", "all"), "share"] == pytest.approx(n_all)
    assert stats_csv.xs("train", level="split")["released_n"].isna().all()
    assert s.loc[("level", "all"), "n_distinct_answers"] <= 5
    leak = pd.read_csv(out["leak"])
    assert set(leak["question_type"]) == {"presence", "abnormality", "view"}
    rejects = pq.read_table(out["rejects"]).to_pandas()
    assert set(qt["study_id"]) | set(rejects["study_id"]) == set(studies["study_id"])


@pytest.mark.slow
def test_vqa_rule_through_snakemake(tmp_path):
    """ingest -> sections -> keyinfo (rules) -> vqa on the demo corpus, through the repository's Snakefile."""
    workdir = prepare_workdir(
        tmp_path / "run",
        {"outdir": str(tmp_path / "run" / "results"), "corpus": demo_corpus(), "vqa": {"seed": 11}},
    )
    target = workdir / "results" / "vqa" / "questions.parquet"
    run = run_snakemake(workdir, "--cores", "2", "--nolock", str(target), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    q = pq.read_table(target).to_pandas()
    assert set(q["question_type"]) == set(QUESTION_TYPES)
    studies = pq.read_table(workdir / "results" / "ingest" / "studies.parquet").to_pandas()
    split = dict(zip(studies["study_id"], studies["split"], strict=True))
    assert (q["study_id"].map(split) == q["split"]).all()
    rejects = pq.read_table(workdir / "results" / "vqa" / "rejects.parquet").to_pandas()
    assert set(q["study_id"]) | set(rejects["study_id"]) == set(studies["study_id"])
    assert list(pd.read_csv(workdir / "results" / "vqa" / "questions.csv").columns) == CSV_COLUMNS


# ------------------------------------------------------------------------------- medical_cxr_vqa style

COMPAT_TEMPLATES = load_templates(REPO / "libs" / "medical_cxr_vqa_templates.yaml")
# the original's wordings (reference/medical_cxr_vqa.md §6.1), with its placeholders as our slots
ORIGINAL_WORDINGS = {
    "what abnormalities are seen in this image?",
    "what abnormalities are seen in the {location}?",
    "is there evidence of any abnormalities in this image?",
    "is there evidence of {name} in this image?",
    "is there {name}?",
    "is there {name} in the {location} area?",
    "which view is this image taken?",
    "is this {view} view?",
    "where in the image is the {name} located?",
    "where is the {name}?",
    "is the {name} located on the left side or right side?",
    "what level is the {name}?",
    "what type is the {name}?",
}


def _constructed_corpus(n=60):
    """Hand-built studies: every answer form, a multi-site finding, normal studies, PA and AP."""
    f_rows, img_rows, st_rows, status = [], [], [], []
    for i in range(n):
        sid, subj = 60_000_000 + i, 11_000_000 + i
        st_rows.append({"subject_id": subj, "study_id": sid, "split": "train"})
        img_rows.append(_image(sid, subj, "PA" if i % 3 else "AP"))
        kind = i % 4
        if kind == 0:  # small right effusion, written "small"
            f_rows.append({**_finding(sid, "pleural effusion", location="right basal", level="mild",
                                      type_="layering", subject_id=subj),
                           "raw_name": "small right pleural effusion"})  # fmt: skip
        elif kind == 1:  # large left pneumothorax: ordinal "severe", the report says "large"
            f_rows.append({**_finding(sid, "pneumothorax", location="left apical", level="severe",
                                      subject_id=subj), "raw_name": "large left apical pneumothorax"})  # fmt: skip
        elif kind == 2:  # a multi-site finding: atelectasis at two places, and edema at one of them
            f_rows.append({**_finding(sid, "atelectasis", location="left lower lobe", subject_id=subj),
                           "raw_name": "atelectasis"})  # fmt: skip
            f_rows.append({**_finding(sid, "atelectasis", location="right lower lobe", subject_id=subj),
                           "raw_name": "atelectasis"})  # fmt: skip
            f_rows.append({**_finding(sid, "edema", location="left lower lobe", level="moderate",
                                      subject_id=subj), "raw_name": "moderately severe edema"})  # fmt: skip
        # kind 3: a normal report ("No acute cardiopulmonary process"): no findings rows at all
        status.append({"subject_id": subj, "study_id": sid,
                       "status": "normal" if kind == 3 else "abnormal"})  # fmt: skip
    findings = pd.DataFrame(f_rows)
    return findings, pd.DataFrame(img_rows), pd.DataFrame(st_rows), pd.DataFrame(status)


def test_compatible_style_uses_the_original_wordings_only():
    assert set(COMPAT_TEMPLATES.texts) == ORIGINAL_WORDINGS
    assert len(COMPAT_TEMPLATES.texts) == 13
    findings, images, studies = _bench().synthetic_inputs(3000, seed=4)
    q = generate(findings, images, studies, COMPAT_TEMPLATES, NAMES, VqaConfig())[0].to_pandas()
    assert set(q["question_type"]) == set(QUESTION_TYPES)
    assert set(q["template_id"]) == set(COMPAT_TEMPLATES.ids)
    slots = _parse(q, COMPAT_TEMPLATES)
    assert slots["view"].dropna().isin(["PA", "AP"]).all()
    views = q[q["question_type"] == "view"]
    assert set(views["question"]) == {
        "which view is this image taken?",
        "is this PA view?",
        "is this AP view?",
    }
    # yes/no twins: every yes/no question text is answered yes as often as no
    yn = q[q["answer"].isin(["yes", "no"])]
    per_q = yn.groupby(["question_type", "question"])["answer"].value_counts().unstack(fill_value=0)
    assert (per_q["yes"] == per_q["no"]).all()
    leak = leak_report(q[["question_type", "question", "answer"]])
    assert (leak["gain"] <= 0.02).all(), leak


def test_compatible_style_answer_forms_on_constructed_studies():
    findings, images, studies, status = _constructed_corpus()
    cfg = VqaConfig(level_word_min_count=0, view_balance=False)
    table, _, _ = generate(findings, images, studies, COMPAT_TEMPLATES, NAMES, cfg, keyinfo_studies=status)
    q = table.to_pandas()
    q = q.join(_parse(q, COMPAT_TEMPLATES))
    by = {t: q[q["question_type"] == t] for t in QUESTION_TYPES}
    kind = (q["study_id"] - 60_000_000) % 4

    view_open = by["view"][by["view"]["template_id"] == "mcv.view.open"]
    assert len(view_open) and set(view_open["answer"]) <= {"PA view", "AP view"}
    pa = view_open["study_id"].sub(60_000_000) % 3 != 0
    assert (view_open["answer"] == np.where(pa, "PA view", "AP view")).all()

    where = by["location"][by["location"]["template_id"] != "mcv.loc.side"]
    side = by["location"][by["location"]["template_id"] == "mcv.loc.side"]
    assert len(where) and where["answer"].str.endswith(" area").all()
    assert set(side["answer"]) <= {"left side", "right side"}
    own = {"pleural effusion": "right basal area", "pneumothorax": "left apical area",
           "edema": "left lower lobe area",
           "atelectasis": "left lower lobe area, right lower lobe area"}  # fmt: skip
    assert all(own[r.name] == r.answer for r in where.itertuples())
    for r in side.itertuples():  # only one-sided findings; the multi-site atelectasis never
        assert r.name != "atelectasis"
        assert (
            r.answer
            == {"pleural effusion": "right side", "pneumothorax": "left side", "edema": "left side"}[r.name]
        )

    # levels: the report's words, not the ordinal scale
    level = dict(zip(by["level"]["name"], by["level"]["answer"], strict=False))
    assert level == {"pleural effusion": "small", "pneumothorax": "large", "edema": "moderate"}
    assert set(by["type"]["answer"]) == {"layering"}

    # the region question answers ONE finding seen at that location
    region = by["abnormality"][by["abnormality"]["template_id"] == "mcv.abn.region"]
    assert len(region)
    for r in region.itertuples():
        rows = findings[(findings["study_id"] == r.study_id) & (findings["location"] == r.location)]
        assert r.answer in set(rows["name"]) and "," not in r.answer

    # normal studies (status normal, no findings rows) get the abnormality question, answered "no"
    normal_abn = by["abnormality"][kind[by["abnormality"].index] == 3]
    assert len(normal_abn) == 15 and set(normal_abn["answer"]) == {"no"}
    assert set(normal_abn["question"]) == {"is there evidence of any abnormalities in this image?"}


def test_level_words_follow_each_rows_own_level_and_text():
    # texts repeat across rows (they are searched once per distinct text); each row keeps its own level
    lib = load_level_lib(Path(__file__).resolve().parents[1] / "libs" / "levels.csv")
    text = [
        "Mild to moderate effusion",
        "mild to moderate effusion",
        "mildly enlarged heart",
        "effusion",
        None,
    ]
    level = ["moderate", "mild", "mild", "mild", None]
    words = level_words(pd.Series(level * 2, dtype=object), pd.Series(text * 2, dtype=object), lib)
    expected = ["mild to moderate", "mild", "mild", "mild", None]  # no level: no word
    assert [None if pd.isna(w) else w for w in words] == expected * 2
    arrow_text = level_words(pd.Series(level, dtype=object), pa.array(text, pa.string()), lib)
    assert [None if pd.isna(w) else w for w in arrow_text] == expected


def test_level_word_counts_are_the_value_counts_of_the_level_words():
    """A level whose every row has a phrase (its own word counts nothing: it is not listed), two phrases
    of one adjective ("mild", "mildly"), rows without a level."""
    lib = load_level_lib(Path(__file__).resolve().parents[1] / "libs" / "levels.csv")
    text = ["trace effusion", "mildly enlarged", "mild effusion", "effusion", "subtle opacity", None]
    level = ["minimal", "mild", "mild", "mild", "minimal", None]
    words = level_words(pd.Series(level * 3, dtype=object), pd.Series(text * 3, dtype=object), lib)
    counts = level_word_counts(pa.array(level * 3, pa.string()), pa.array(text * 3, pa.string()), lib)
    assert counts == {str(k): int(v) for k, v in words.value_counts().items()}
    assert counts == {"mild": 9, "trace": 3, "subtle": 3}


def test_distinct_join_is_the_same_for_a_vocabulary_too_big_for_a_bit_set():
    groups = pd.DataFrame(
        {"s": [0, 0, 0, 0, 1, 1, 2, 3], "name": [1, 1, 1, 1, 2, 2, 0, 0], "v": [2, 0, 1, 2, -1, 3, 1, 3]}
    )
    small = ["right", "left", "left", "basal"]  # unsorted, one string under two codes
    joined = distinct_join(groups, small, "v")
    assert joined.to_dict() == {
        0 * 1_000_003 + 1: "left, left, right",
        1 * 1_000_003 + 2: "basal",
        2 * 1_000_003: "left",
        3 * 1_000_003: "basal",
    }
    big = distinct_join(groups, small + [f"unused {i}" for i in range(70)], "v")
    assert sorted(big.items()) == sorted(joined.items())


def test_unknown_status_is_never_called_normal():
    findings, images, studies, status = _constructed_corpus(40)
    status.loc[status["status"] == "normal", "status"] = "unknown"
    q = generate(findings, images, studies, COMPAT_TEMPLATES, NAMES, VqaConfig(), keyinfo_studies=status)[
        0
    ].to_pandas()
    silent = q[(q["study_id"] - 60_000_000) % 4 == 3]
    assert len(silent) and set(silent["question_type"]) == {"view"}  # neither "no abnormality" nor "no X"
    normal_abn = q[(q["question_type"] == "abnormality") & (q["answer"] == "no")]
    assert normal_abn.empty


def test_clean_style_keeps_its_answer_forms():
    findings, images, studies, status = _constructed_corpus()
    cfg = _clean(view_balance=False)
    q = generate(findings, images, studies, TEMPLATES, NAMES, cfg, keyinfo_studies=status)[0].to_pandas()
    assert set(q.loc[q["template_id"].str.startswith("view.open"), "answer"]) <= {"PA", "AP"}
    assert set(q.loc[q["question_type"] == "level", "answer"]) <= {"mild", "severe", "moderate"}
    assert not q["answer"].str.endswith((" area", " side", " view")).any()
    assert "is this a AP view?" not in set(q["question"])


def test_view_questions_on_a_pa_only_corpus():
    """A corpus with one projection keeps its view questions (the balance needs both views to exist)."""
    findings, images, studies = _bench().synthetic_inputs(1500, seed=6)
    images = images[images["view_position"] != "AP"]
    for style, tpl in (("medical_cxr_vqa", COMPAT_TEMPLATES), ("clean", TEMPLATES)):
        table, p, info = generate(findings, images, studies, tpl, NAMES, VqaConfig(style=style))
        q = table.to_pandas()
        n_pa = int((p.studies["view"] == 0).sum())
        assert (q["question_type"] == "view").sum() == n_pa > 400
        assert info["view: removed by PA/AP balancing"] == 0
        assert info["view: one-view splits kept unbalanced"] == n_pa
    # with both views the balance still holds per split
    findings, images, studies = _bench().synthetic_inputs(1500, seed=6)
    q = generate(findings, images, studies, COMPAT_TEMPLATES, NAMES)[0].to_pandas()
    view = q[q["template_id"] == "mcv.view.open"]
    assert len(view) and abs((view["answer"] == "PA view").mean() - 0.5) < 0.1


def test_templates_file_is_validated(tmp_path):
    with pytest.raises(FileNotFoundError, match="vqa.templates"):
        load_templates(tmp_path / "missing.yaml")
    text = (REPO / "libs" / "medical_cxr_vqa_templates.yaml").read_text()
    cases = {
        "presense:\n  plain: {templates: [{id: x, text: 'is there {name}?'}]}\n": "presense",
        "view:\n  opne: {templates: [{id: y, text: 'which?'}]}\n": "opne",
        "slots: {location: sentence}\n": "slots",
    }
    for extra, word in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace("slots:\n  location: words", "") + extra)
        with pytest.raises(ValueError, match=f"vqa.templates.*{word}"):
            load_templates(bad)
    bad.write_text(text.replace("is there {name}?", "is there {finding}?"))
    with pytest.raises(ValueError, match="vqa.templates.*finding"):
        load_templates(bad)


@pytest.mark.parametrize("style", ["medical_cxr_vqa", "clean"])
def test_release_card_and_splits(tmp_path, style):
    """The VQA release: HF split names by both loading routes, the style, type mix and answer vocabulary."""
    import datasets
    import yaml

    from workflow import cards

    findings, images, studies = _bench().synthetic_inputs(1500, seed=8)
    tpl = load_templates(STYLE_TEMPLATES[style])
    table = generate(findings, images, studies, tpl, NAMES, VqaConfig(style=style))[0]
    assert set(table["split"].to_pylist()) == {"train", "validate", "test"}
    pq.write_table(table, tmp_path / "questions.parquet")
    config = {"corpus": {"format": "mimic", "mimic": {"reports": "/abs/secret/mimic-cxr-reports.zip"}},
              "vqa": {"style": style, "seed": 0}, "llm": {"backend": "rules"}, "rg4": {"rewriter": "rules"}}  # fmt: skip
    out = tmp_path / "release"
    (out / "default").mkdir(parents=True)
    (out / "default" / "validate-00000-of-00001.parquet").write_text("stale")  # an earlier run's file
    cards.main(
        [
            "--table", f"default={tmp_path / 'questions.parquet'}", "--spec", "medical_cxr_vqa",
            "--config-json", __import__("json").dumps(config), "--corpus-format", "mimic", "--out", str(out),
        ]
    )  # fmt: skip
    assert sorted(p.name.split("-")[0] for p in (out / "default").iterdir()) == [
        "test",
        "train",
        "validation",
    ]
    cache = str(tmp_path / "hf")
    by_card = datasets.load_dataset(str(out), "default", cache_dir=cache)
    by_dir = datasets.load_dataset("parquet", data_dir=str(out / "default"), cache_dir=cache)
    for ds in (by_card, by_dir):
        assert {k: v.num_rows for k, v in ds.items()} == {
            hf: table.filter(pa.compute.equal(table["split"], src)).num_rows
            for src, hf in (("train", "train"), ("validate", "validation"), ("test", "test"))
        }
    assert set(by_card["validation"]["source_split"]) == {"validate"}

    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["annotations_creators"] == ["machine-generated"] and header["language"] == ["en"]
    assert header["license"] == "other" and "physionet" in header["license_name"]
    assert header["size_categories"] == ["1K<n<10K"]
    assert f"`{style}`" in text and "MIMIC-CXR 2.0.0" in text
    assert "/abs/secret" not in text and "rewriter" not in text  # no absolute paths, no unused sections
    q = table.to_pandas()
    for qtype, n in q["question_type"].value_counts().items():
        assert f"| {qtype} | " in text and f"| {n} | {100 * n / len(q):.1f} % |" in text
    assert "| view |" in text and "92,048" in text and "11.8 %" in text  # the released count and share
    view_answers = q.loc[q["question_type"] == "view", "answer"].value_counts()
    top = view_answers.index[0]
    assert f"`{top}` ({view_answers.iloc[0]:,})" in text
    assert "@article{hu2024" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"templates": "libs/vqa_templates_typo.yaml"}, ("vqa.templates", "libs/vqa_templates_typo.yaml")),
        ({"names": "libs/findngs.csv"}, ("vqa.names", "libs/findngs.csv")),
        ({"style": "original"}, ("original",)),
    ],
)
def test_bad_vqa_config_stops_the_run_at_start_up(tmp_path, override, message):
    """A misspelt path must fail before any job runs, naming the config key (not quietly change questions)."""
    workdir = prepare_workdir(tmp_path / "run", {"corpus": demo_corpus(), "vqa": override})
    run = run_snakemake(workdir, "-n", "--cores", "1", timeout=300)
    assert run.returncode != 0
    assert all(part in run.stdout + run.stderr for part in message), run.stdout[-2000:]


# ------------------------------------------------------------------------------------------------ shards

NAMES_LIB = REPO / "libs" / "findings.csv"


def _shard_inputs(tmp_path, n=2000, seed=6):
    bench = _bench()
    findings, images, studies = bench.synthetic_inputs(n, seed=seed)
    status = bench.keyinfo_status(findings, studies, seed=seed)
    return (findings, images, studies, status), _write_inputs(
        tmp_path / "in", findings, images, studies, status
    )


def _stats_of(questions: pa.Table) -> pa.Table:
    stats = question_stats(*question_counts(questions))
    return conform(pa.Table.from_pandas(stats, preserve_index=False), VQA_STATS)


def test_one_shard_is_one_run_over_the_whole_corpus(tmp_path):
    (findings, images, studies, status), inputs = _shard_inputs(tmp_path)
    out = _run_cli(inputs, tmp_path / "vqa", 1, seed=4)
    cfg = VqaConfig(
        seed=4, exclude_names=tuple(dict.fromkeys(["support device", *left_out_names(NAMES_LIB)]))
    )
    whole, _, _ = generate(
        findings, images, studies, COMPAT_TEMPLATES, NAMES, cfg, load_display_names(NAMES_LIB, NAMES), status
    )
    merged = pq.read_table(out["questions"])
    assert merged.equals(conform(whole, QUESTIONS))
    # the statistics the merge adds up from per-shard counts are those of the questions themselves
    assert pq.read_table(out["stats"]).equals(_stats_of(merged))


def test_two_shards_keep_every_guarantee_on_the_merged_output(tmp_path):
    (findings, images, studies, status), inputs = _shard_inputs(tmp_path)
    out = _run_cli(inputs, tmp_path / "vqa", 2, seed=4)
    q = pq.read_table(out["questions"]).to_pandas()
    assert q["qa_id"].tolist() == list(range(len(q)))  # unique ids, the merged row numbers
    again = _run_cli(inputs, tmp_path / "again", 2, seed=4)
    for name in ("questions", "csv", "stats", "leak", "rejects"):  # deterministic
        assert again[name].read_bytes() == out[name].read_bytes(), name
    # each shard holds whole patients: subject_id % 2
    for k in range(2):
        part = pq.read_table(tmp_path / "vqa" / f"shard{k}" / "questions.parquet").to_pandas()
        assert len(part) and (part["subject_id"] % 2 == k).all()
    assert set(q["question_type"]) == set(QUESTION_TYPES)
    # every study is asked or rejected, once
    rejects = pq.read_table(out["rejects"]).to_pandas()
    assert rejects["study_id"].is_unique and not set(rejects["study_id"]) & set(q["study_id"])
    assert set(rejects["study_id"]) | set(q["study_id"]) == set(studies["study_id"])

    # yes/no twins over the merged set: every yes/no question text is answered yes as often as no
    yn = q[q["answer"].isin(["yes", "no"])]
    per_q = yn.groupby(["question_type", "question"])["answer"].value_counts().unstack(fill_value=0)
    assert len(per_q) > 50 and (per_q["yes"] == per_q["no"]).all()
    # presence: exact yes/no balance per (finding, location) stratum
    pres = q[q["question_type"] == "presence"]
    slots = _parse(pres, COMPAT_TEMPLATES)[["name", "location"]].astype(object).fillna("-")
    strata = pres.assign(**slots).groupby(["name", "location"])["answer"].value_counts().unstack(fill_value=0)
    assert len(strata) > 20 and (strata["yes"] == strata["no"]).all()
    # view: as many AP as PA per split (the view of the question's image)
    view = q[q["question_type"] == "view"]
    image_view = view["dicom_id"].map(images.set_index("dicom_id")["view_position"])
    per_split = image_view.groupby(view["split"]).value_counts().unstack(fill_value=0)
    assert set(per_split.index) == {"train", "validate", "test"}
    assert (per_split["PA"] == per_split["AP"]).all() and (per_split["PA"] > 0).all()
    # abnormality: every normal study with a frontal image is asked (rate 1.0), as many yes as no
    abn = q[(q["question_type"] == "abnormality") & q["answer"].isin(["yes", "no"])]
    frontal = set(images.loc[images["view_position"].isin(["PA", "AP"]), "study_id"])
    normal = set(status.loc[status["status"] == "normal", "study_id"]) & frontal
    assert len(normal) > 20 and set(abn.loc[abn["answer"] == "no", "study_id"]) == normal
    assert (abn["answer"] == "yes").sum() == (abn["answer"] == "no").sum()
    # the statistics are those of the merged questions
    assert pq.read_table(out["stats"]).equals(_stats_of(pq.read_table(out["questions"])))
    assert set(pd.read_csv(out["leak"])["question_type"]) == {"presence", "abnormality", "view"}
    # the leak probe (kept from the merge's own read of the shards) is the probe of the merged questions
    merged = pq.read_table(out["questions"], columns=["question_type", "question", "answer"]).to_pandas()
    yes_no = merged[merged["question_type"].isin(LEAK_TYPES)].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_csv(out["leak"]), leak_report(yes_no, 4))


def test_a_shard_follows_the_whole_corpus_for_view_balance_and_level_words(tmp_path):
    """Shard 0 sees only PA studies of split test, shard 1 only AP ones; each shard sees 12 "small"
    effusions, the corpus 24 (level_word_min_count 20)."""
    f_rows, img_rows, st_rows = [], [], []
    for i in range(24):
        sid, subj = 60_000_000 + i, 11_000_000 + i  # subject parity = shard
        st_rows.append({"subject_id": subj, "study_id": sid, "split": "test"})
        img_rows.append(_image(sid, subj, "PA" if i % 2 == 0 else "AP", split="test"))
        f_rows.append({**_finding(sid, "pleural effusion", location="right basal", level="mild", subject_id=subj),
                       "raw_name": "small right pleural effusion"})  # fmt: skip
    findings, images, studies = _frames(f_rows, img_rows, st_rows)
    findings = findings.assign(raw_name=[r["raw_name"] for r in f_rows], source="rules")
    inputs = _write_inputs(tmp_path / "in", findings, images, studies.assign(report="", source_path=""))
    for shards in (1, 2):
        out = _run_cli(inputs, tmp_path / f"shards{shards}", shards, "--level-word-min-count=20")
        q = pq.read_table(out["questions"]).to_pandas()
        assert set(q.loc[q["question_type"] == "level", "answer"]) == {"small"}, shards
        view = q[q["question_type"] == "view"]
        image_view = view["dicom_id"].map(images.set_index("dicom_id")["view_position"])
        assert (image_view == "PA").sum() == (image_view == "AP").sum() == (12 if shards == 1 else 0)


@pytest.mark.slow
def test_the_dag_has_one_job_per_shard_and_one_merge(tmp_path):
    workdir = prepare_workdir(
        tmp_path / "run",
        {"outdir": str(tmp_path / "run" / "results"), "corpus": demo_corpus(), "vqa": {"shards": 3}},
    )
    run = run_snakemake(workdir, "-n", "-p", "--cores", "2", str(workdir / "results" / "vqa" / "leak.csv"))
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    jobs = re.findall(r"^rule (vqa\w*):\n(?:    .*\n)*?    wildcards: shard=(\d+)", log, re.MULTILINE)
    assert sorted(jobs) == [("vqa_shard", "0"), ("vqa_shard", "1"), ("vqa_shard", "2")]
    assert len(re.findall(r"^rule vqa:$", log, re.MULTILINE)) == 1
    assert "--shard 2 --shards 3" in log


def test_a_shard_reads_the_rows_and_columns_arrows_filtered_read_returns(tmp_path):
    """shard._read (each table once, row group by row group, several selections) against the definition:
    one pq.read_table with a filter per selection; an optional column may be absent, a file may be empty."""
    from workflow.vqa import shard as vqa_shard

    rng = np.random.default_rng(3)
    n = 5_000
    table = pa.table(
        {
            "study_id": pa.array(rng.integers(0, 800, n), pa.int64()),
            "name": pa.array(rng.choice(["effusion", "edema", "atelectasis"], n)),
            "level": pa.array([None if x < 0.6 else str(x)[:4] for x in rng.random(n)], pa.string()),
            "evidence": pa.array(rng.choice(["small effusion", "mild edema", None], n), pa.string()),
        }
    )
    path = tmp_path / "findings.parquet"
    pq.write_table(table, path, row_group_size=700)
    ids = pa.array(np.arange(0, 800, 3), pa.int64())
    shard_rows = ["study_id", "name", "location", "level", "evidence"]  # no `location` in this file
    level_rows = ["study_id", "level", "name"]
    present = ["study_id", "name", "level", "evidence"]
    of_shard = pq.read_table(path, columns=present, filters=pc.field("study_id").isin(ids))
    with_level = pq.read_table(path, columns=level_rows, filters=~pc.field("level").is_null())
    got = vqa_shard._read(
        path,
        (lambda t: t.filter(pc.is_in(t["study_id"], value_set=ids)), shard_rows),
        (lambda t: t.filter(pc.is_valid(t["level"])), level_rows),
        (None, ["name", "study_id"]),
    )
    pd.testing.assert_frame_equal(got[0].to_pandas(), of_shard.to_pandas())
    pd.testing.assert_frame_equal(got[1].to_pandas(), with_level.to_pandas())
    pd.testing.assert_frame_equal(
        got[2].to_pandas(), pq.read_table(path, columns=["name", "study_id"]).to_pandas()
    )

    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    (empty,) = vqa_shard._read(tmp_path / "empty.parquet", (None, shard_rows))
    assert empty.num_rows == 0 and empty.column_names == present


def test_the_leak_probe_of_an_arrow_table_is_the_probe_of_its_frame():
    """leak_report on Arrow (questions as dictionary codes) against the pandas definition, with and
    without the row sample (max_rows), nulls in the answers and a non-yes/no answer."""
    rng = np.random.default_rng(5)
    n = 6_000
    qtype = rng.choice(["presence", "abnormality", "view", "level"], n)
    texts = np.array(
        [f"is there {w} in the {s} lung?" for w in ("effusion", "edema", "a mass") for s in ("left", "right")]
    )
    table = pa.table(
        {
            "question_type": pa.array(qtype),
            "question": pa.array(np.where(qtype == "view", "is this a PA view?", rng.choice(texts, n))),
            "answer": pa.array(rng.choice(["yes", "no", "mild", None], n, p=[0.45, 0.45, 0.05, 0.05])),
        }
    )
    frame = table.to_pandas()
    for max_rows in (200_000, 1_000):
        got = leak_report(table, seed=3, max_rows=max_rows)
        pd.testing.assert_frame_equal(got, leak_report(frame, seed=3, max_rows=max_rows))
        assert set(got["question_type"]) == {"presence", "abnormality", "view"}


def _corpus_facts_with_pandas(findings, images, studies, names, exclude_names, lib):
    """The whole corpus's facts by their definition: frontal_studies' frame, and the level words of its
    usable positive findings counted with value_counts."""
    from workflow.vqa.prepare import (
        _PRESENCE_CODE,
        _clean,
        _codes,
        _usable,
        frontal_studies,
        positive_level_words,
        view_splits,
    )

    st = frontal_studies(images, studies.drop_duplicates("study_id"))
    f = findings[findings["study_id"].isin(st["study_id"]).to_numpy()]
    code, _ = _codes(_clean(f["name"]), list(names))
    presence, _ = _codes(_clean(f["presence"]), list(_PRESENCE_CODE))
    sel = (code >= 0) & (presence == 0)
    sel[sel] = _usable(names, exclude_names)[code[sel]]
    ordinal = pd.Series(_clean(f["level"]).filter(pa.array(sel)).to_pandas().to_numpy(), dtype=object)
    words = positive_level_words(f, sel, ordinal, lib)
    return view_splits(st), {str(k): int(v) for k, v in words.value_counts().items()}


@pytest.mark.parametrize("variant", ["mimic", "no meaning or image split", "null image ids"])
def test_corpus_facts_on_codes_equal_their_frame_definition(variant):
    """corpus_facts (level words on codes) against frontal_studies / level_words with value_counts on
    messy inputs: lateral, unknown and IU "frontal" views, studies without images or with a duplicate
    row, splits only the image has, level words the text has or has not, rare words."""
    from workflow.vqa.prepare import corpus_facts

    rng = np.random.default_rng(11)
    lib = load_level_lib(Path(__file__).resolve().parents[1] / "libs" / "levels.csv")
    names = load_vocabulary(Path(__file__).resolve().parents[1] / "libs" / "vocabulary.yaml")
    n_studies, n_images, n_findings = 400, 900, 3_000
    ids = 50_000_000 + rng.permutation(n_studies * 2)[:n_studies]
    studies = pd.DataFrame(
        {
            "subject_id": rng.integers(10_000_000, 10_000_300, n_studies),
            "study_id": np.concatenate([ids[:-10], ids[:10]]),  # ten duplicate rows, ten ids left out
            "split": rng.choice(np.array(["train", "validate", "test", None], dtype=object), n_studies),
        }
    )
    pick = lambda values, n: rng.choice(np.array(values, dtype=object), n)  # noqa: E731
    images = pd.DataFrame(
        {
            "study_id": rng.choice(ids[: n_studies - 30], n_images),  # some studies have no image
            "view_position": pick(["PA", "AP", " pa", "LATERAL", "LL", None, ""], n_images),
            "view_code_meaning": pick(["postero-anterior", "antero-posterior", "lateral", " Frontal", None], n_images),
            "split": pick(["train", "validate", "test", "other", None], n_images),
        }
    )  # fmt: skip
    if variant == "no meaning or image split":
        images = images.drop(columns=["view_code_meaning", "split"])
    if variant == "null image ids":
        images["study_id"] = images["study_id"].astype("Int64").mask(rng.random(n_images) < 0.02)
    phrases = list(lib)
    findings = pd.DataFrame(
        {
            "study_id": rng.choice(ids, n_findings),
            "name": pick([*names[:8], "not a finding", " Pleural  Effusion", None], n_findings),
            "presence": pick(["positive", "positive", "negative", "uncertain", "odd", None], n_findings),
            "level": pick([*sorted(set(lib.values())), "", None], n_findings),
            "raw_name": pick([f"{p} opacity" for p in phrases[:20]] + ["opacity", None], n_findings),
            "evidence": pick([f"there is {p} change" for p in phrases[:40]] + [None], n_findings),
        }
    )
    exclude = ("support device", names[1])
    expected = _corpus_facts_with_pandas(findings, images, studies, names, exclude, lib)
    level_rows = pa.Table.from_pandas(findings, preserve_index=False)
    level_rows = level_rows.filter(pc.is_valid(level_rows["level"]))
    facts = corpus_facts(
        pa.Table.from_batches(level_rows.to_batches(max_chunksize=700)),
        images,
        studies,
        names,
        exclude,
        lib,
    )
    assert (facts.view_splits, facts.level_word_counts) == expected
    assert facts.view_splits and min(expected[1].values()) < 10 < max(expected[1].values())
