"""LLM-RG4's token weights (new_scores): the loader's target, cleaned and tokenised, with BOS at 0."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from test_rg4 import _study, run_rule, run_shards, sharded_patients, write_inputs
from workflow_run import run_stage

from tools.tiny_model import iter_corpus_text, train_tokenizer, vocabulary_text
from workflow.exports.cleaners import clean_mimic
from workflow.rg4 import build as rg4
from workflow.rg4.scores import (
    NO_TOKENIZER_NOTE,
    TokenScorer,
    default_emphasis,
    load_tokenizer,
)

DEMO_REPORTS = Path(__file__).resolve().parents[1] / "data" / "demo" / "mimic-cxr-reports.zip"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny local tokenizer the fine-tuning tests build (byte-level BPE on the demo reports, BOS
    added by its post-processor), saved as a tokenizer.json folder like a user's Vicuna one."""
    out = tmp_path_factory.mktemp("tok")
    texts = list(iter_corpus_text([DEMO_REPORTS])) + vocabulary_text(0)
    train_tokenizer(texts, 2048).save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def scorer(tokenizer_dir):
    return TokenScorer(load_tokenizer(tokenizer_dir), default_emphasis(), 100, "tiny")


@pytest.mark.parametrize(
    ("finding", "impression"),
    [
        ("finding: Small left pleural effusion. The heart size is normal.", "impression: No pneumothorax."),
        (
            "FINDINGS:\n 1. Mild edema.  2. No effusion... 3. Tube at the __ level: 4.5 cm above the carina.",
            None,
        ),
        (None, "Discussed with Dr. ___ at 10 a.m. Possible pneumonia. Lungs clear."),
        ("İnterval change? None. Pneumothorax, x-ray: small.", "1. Atelectasis. 2. Edema."),
    ],
)
def test_the_target_is_the_loaders_cleaned_target(scorer, finding, impression):
    cleaned, ends, flags = scorer.prepare(finding, impression)
    assert cleaned == clean_mimic(" ".join(t for t in (finding, impression) if t))
    assert ends[-1] == len(cleaned) and len(flags) == len(ends) == len(cleaned[:-2].split(" . "))


def _weighted_text(scorer, target, values, want):
    """The cleaned-text pieces of the token positions whose weight is ``want``."""
    cleaned = clean_mimic(" ".join(t for t in target if t))
    enc = scorer.tokenizer.encode(cleaned + "</s>")
    assert enc.ids[0] == scorer.tokenizer.token_to_id("<s>")
    return "".join(
        cleaned[a:b] for (a, b), v in zip(enc.offsets, values, strict=False) if v == want and b > a
    )


def test_weights_mark_the_sentences_with_a_finding(scorer):
    target = (
        "finding: Small left pleural effusion. The heart size is normal.",
        "impression: No pneumothorax.",
    )
    values = scorer.scores([target])[0]
    enc = scorer.tokenizer.encode(clean_mimic(" ".join(target)) + "</s>")  # what the loader tokenises
    n = len(enc.ids)
    assert len(values) == 100 and n < 100
    assert values[0] == 0  # BOS
    assert values[n - 1] == 0 and enc.ids[n - 1] == scorer.tokenizer.token_to_id("</s>")  # EOS
    assert values[n:] == [0] * (100 - n)  # padding
    # exactly the first cleaned sentence (a positive effusion), with its full stop
    assert _weighted_text(scorer, target, values, 1).strip() == "finding : small left pleural effusion ."


def test_a_report_without_findings_has_no_emphasis(scorer):
    target = (
        "finding: The lungs are clear. No pleural effusion or pneumothorax.",
        "impression: No acute process.",
    )
    assert sum(scorer.scores([target])[0]) == 0


def test_uncertain_findings_are_emphasised_and_long_targets_cropped(scorer):
    values = scorer.scores([(None, "impression: Possible right lower lobe pneumonia.")])[0]
    assert _weighted_text(
        scorer, (None, "impression: Possible right lower lobe pneumonia."), values, 1
    ).strip() == ("impression : possible right lower lobe pneumonia .")
    long = " ".join(["No pneumothorax."] * 40 + ["Moderate cardiomegaly."])
    values = scorer.scores([(long, None)])[0]
    assert len(values) == 100 and sum(values) == 0  # the finding sentence lies beyond position 100
    values = scorer.scores([(" ".join(["Moderate cardiomegaly."] * 40), None)])[0]
    assert len(values) == 100 and values[0] == 0 and all(values[1:])  # cropped: no EOS, no padding


ROWS = [
    _study(
        1,
        11,
        "train",
        datetime(2150, 1, 1),
        "Small left pleural effusion.",
        "No pneumothorax.",
        images=[("a", "PA")],
    ),
    _study(
        1,
        12,
        "train",
        datetime(2150, 2, 1),
        "The lungs are clear.",
        "Stable mild cardiomegaly.",
        images=[("b", "PA"), ("c", "LATERAL")],
    ),
]


def test_rule_writes_weights_with_a_tokenizer(tmp_path, tokenizer_dir):
    out = run_rule(tmp_path, ROWS, extra=["--scores-tokenizer", str(tokenizer_dir)])
    for scenario in ("sn", "sw", "mn", "mw"):
        for recs in json.loads(out[f"json_{scenario}"].read_text()).values():
            for rec in recs:
                assert len(rec["new_scores"]) == 100 and set(rec["new_scores"]) <= {0, 1}
        # byte for byte what json.dumps writes (the weights' digits are written into a template)
        text = out[f"json_{scenario}"].read_text()
        assert text == json.dumps(json.loads(text), ensure_ascii=False)
    sn = {r["study_id"]: r for r in json.loads(out["json_sn"].read_text())["train"]}
    sw = {r["study_id"]: r for r in json.loads(out["json_sw"].read_text())["train"]}
    assert sum(sn[11]["new_scores"]) > 0 and sum(sn[12]["new_scores"]) > 0  # effusion; cardiomegaly
    # the sw target keeps "Stable", so its tokens differ from sn's
    assert sw[12]["new_scores"] != sn[12]["new_scores"]
    notes = json.loads(out["notes"].read_text())
    assert any(line.startswith("new_scores: binary") and "span-based" in line for line in notes)


def test_loader_files_are_what_json_dumps_writes(tmp_path, tokenizer_dir):
    """Texts with characters JSON escapes (quotes, backslashes, tabs) and without: the records are written
    column by column, byte for byte as json.dumps writes the loaded document."""
    rows = [
        *ROWS,
        _study(
            2,
            21,
            "train",
            datetime(2150, 3, 1),
            'Small "left" pleural effusion.\tNo pneumothorax.',
            "Mild edema \\ stable.",
            indication='Cough, "rule out" pneumonia.',
            history="Fever\\chills.",
            images=[("d", "PA")],
        ),
    ]
    out = run_rule(tmp_path, rows, extra=["--scores-tokenizer", str(tokenizer_dir)])
    for scenario in ("sn", "sw", "mn", "mw"):
        text = out[f"json_{scenario}"].read_text()
        assert text == json.dumps(json.loads(text), ensure_ascii=False)
    records = {r["study_id"]: r for r in json.loads(out["json_sn"].read_text())["train"]}
    assert records[21]["indication"] == 'Cough, "rule out" pneumonia.' and "\\" in records[21]["history"]
    assert '"' in records[21]["finding"] and records[12]["history"] == 0


def test_without_a_tokenizer_the_files_keep_empty_weights_and_say_so(tmp_path, capsys):
    out = run_rule(tmp_path, ROWS)  # the rule logs to stderr
    recs = json.loads(out["json_sn"].read_text())["train"]
    assert all(rec["new_scores"] == [] for rec in recs)
    assert NO_TOKENIZER_NOTE in json.loads(out["notes"].read_text())
    assert capsys.readouterr().err.count(NO_TOKENIZER_NOTE) == 1


def test_a_missing_tokenizer_names_the_config_key(tmp_path, capsys):
    (tmp_path / "vicuna").mkdir()
    (tmp_path / "vicuna" / "tokenizer.model").write_bytes(b"")
    with pytest.raises(SystemExit):
        run_rule(tmp_path, ROWS, extra=["--scores-tokenizer", str(tmp_path / "vicuna")])
    err = capsys.readouterr().err
    assert "rg4.scores.tokenizer" in err and "tokenizer.model only" in err


def test_parallel_scoring_gives_the_same_weights(scorer, monkeypatch):
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    result = rg4.build(st, im, sec, rg4.RulesJobRunner(label_vector))
    serial = rg4.score_targets(result.tables, True, scorer, workers=1).by_target()
    monkeypatch.setattr(rg4, "SCORE_CHUNK", 2)
    parallel = rg4.score_targets(result.tables, True, scorer, workers=2).by_target()
    assert parallel == serial and len(serial) > 4
    assert ("finding: Small left pleural effusion.", "impression: Small left pleural effusion.") in serial
    assert all(len(v) == 100 and set(v) <= {0, 1} for v in serial.values())


def test_each_row_has_its_loader_targets_weights(scorer):
    """The distinct targets are the rows' (finding, impression) as the loader reads them, in the order the
    rows first have them; each row's weights are its target's (a missing or empty section is "s")."""
    import pyarrow as pa
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    built = rg4.build(st, im, sec, rg4.RulesJobRunner(label_vector)).tables
    extra = pa.table(
        {"finding": ["", None, "Small left pleural effusion."], "impression": ["Edema.", "Edema.", None]}
    )
    for label_sections in (True, False):
        fp, ip = rg4.SECTION_PREFIXES if label_sections else ("", "")
        scenarios = {**built, "extra": extra}
        weights = rg4.score_targets(scenarios, label_sections, scorer)
        rows = [
            (fp + f if f else None, ip + i if i else None)
            for t in scenarios.values()
            for f, i in zip(t.column("finding").to_pylist(), t.column("impression").to_pylist(), strict=True)
        ]
        assert weights.targets == list(dict.fromkeys(rows))
        got = [weights.targets[k] for s in scenarios for k in weights.rows[s]]
        assert got == rows
        assert weights.values.shape == (len(weights.targets), 100)
        by_target = weights.by_target()
        assert by_target == dict(
            zip(weights.targets, map(bytes, scorer.scores(weights.targets)), strict=True)
        )
        assert weights.rows["extra"][0] == weights.rows["extra"][1]  # "" and null: no finding


def _demo_targets():
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    result = rg4.build(st, im, sec, rg4.RulesJobRunner(label_vector))
    targets = []
    for table in result.tables.values():
        for f, i in zip(
            table.column("finding").to_pylist(), table.column("impression").to_pylist(), strict=True
        ):
            targets.append(("finding: " + f if f else None, "impression: " + i if i else None))
    # and the cleaner's artefacts: an empty sentence (" .  . "), list numbers, punctuation inside words
    targets += [
        ("finding: Mild edema.. . Small effusion.", None),
        (
            None,
            "impression: 1. Right-sided PICC, tip at the cavoatrial junction. 2. Possible pneumonia (RLL).",
        ),
        ("finding: Moderate cardiomegaly. " * 30, None),
    ]
    return targets


def test_word_by_word_weights_equal_whole_text_tokenisation(scorer, monkeypatch):
    monkeypatch.setattr("workflow.rg4.scores.VERIFY_EVERY", 1)
    targets = _demo_targets()
    fast = TokenScorer(scorer.tokenizer, scorer.emphasised, 100, "tiny")
    got = fast.scores(targets)
    assert fast.word_by_word  # every target was verified against whole-text tokenisation
    assert got == fast._exact([fast.prepare(f, i) for f, i in targets])
    assert any(sum(v) for v in got) and any(not sum(v) for v in got)


def test_a_tokenizer_merging_across_spaces_falls_back_to_whole_texts(monkeypatch):
    """A BPE without a pre-tokenizer learns tokens across spaces: the sampled check notices and the
    weights come from whole-text tokenisation."""
    from tokenizers import Tokenizer, models, processors, trainers

    texts = list(iter_corpus_text([DEMO_REPORTS]))
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=3000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    monkeypatch.setattr("workflow.rg4.scores.VERIFY_EVERY", 1)
    joined = TokenScorer(raw, default_emphasis(), 100, "no-pretokenizer")
    targets = _demo_targets()
    got = joined.scores(targets)
    assert not joined.word_by_word
    assert got == joined._exact([joined.prepare(f, i) for f, i in targets])


def test_sentence_by_sentence_weights_equal_target_by_target(scorer):
    """Each distinct sentence cleaned and counted once gives the weights of cleaning and counting every
    target whole, also where the cleaner's list-number passes meet two sentences ("effusion. 2. No ...",
    "T4. 2. ...", "1. ... level 1. Edema.") or the sections are not single-spaced."""
    targets = _demo_targets() + [
        ("finding: Small effusion. 2. No pneumothorax. 3. Mild edema.", "impression: 1. Edema. 2. Effusion."),
        ("finding: Tube tip at T4. 2. No pneumothorax.", "impression: Grade 1. Mild edema."),
        ("finding: Effusion!  Possible pneumonia? Edema", "impression: 2. 3 cm nodule. No edema."),
        ("finding: Cardiomegaly. 5. 6. Effusion. 2.", None),
        # emphasised sentences whose cleaned pieces hold no word the emphasis marks ("2x": a letter after a
        # digit), letters after digits and "_" elsewhere, and the cleaner's "of  the" ("___," removed)
        (
            "finding: Large right pleural effusion, e.g. 2x. Moderate cardiomegaly at T4 level, x_ray 5cm.",
            "impression: In comparison with the study of ___, there is a large right pleural effusion.",
        ),
    ]
    by_sentence = TokenScorer(scorer.tokenizer, scorer.emphasised, 100, "tiny")
    by_target = TokenScorer(scorer.tokenizer, scorer.emphasised, 100, "tiny", by_sentence=False)
    assert by_sentence.scores(targets) == by_target.scores(targets)
    # most targets took the sentence way; the numbered lists and the cleaner's double spaces too
    assert sum(by_sentence._joined(f, i) is not None for f, i in targets) >= len(targets) - 4
    assert by_sentence._joined(*targets[-5]) is not None and by_sentence._joined(*targets[-1]) is not None
    assert 0 < sum(by_sentence.scores(targets[-1:])[0]) < 90  # the "2x" piece is not emphasised
    # a scenario's targets scored on two processes, sentences first: the same bytes
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    result = rg4.build(st, im, sec, rg4.RulesJobRunner(label_vector))
    fresh = TokenScorer(scorer.tokenizer, scorer.emphasised, 100, "tiny", by_sentence=False)
    assert (
        rg4.score_targets(result.tables, True, by_sentence, workers=2).by_target()
        == rg4.score_targets(result.tables, True, fresh, workers=1).by_target()
    )


def test_emphasis_learnt_from_the_label_checks_is_the_extractors(scorer):
    """The rewriter's label checks already say which sentences name a finding: the rule's weights with that
    knowledge are the weights computed afresh."""
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    runner = rg4.RulesJobRunner(label_vector)
    result = rg4.build(st, im, sec, runner)
    known = runner.rewriter.finding_in
    assert known and any(known.values()) and not all(known.values())
    emphasised = default_emphasis()
    assert all(emphasised(text) == value for text, value in known.items())
    learnt = TokenScorer(scorer.tokenizer, emphasised, 100, "tiny")
    learnt.learn_emphasis(known)
    fresh = TokenScorer(scorer.tokenizer, emphasised, 100, "tiny")
    assert (
        rg4.score_targets(result.tables, True, learnt).by_target()
        == rg4.score_targets(result.tables, True, fresh).by_target()
    )


def test_emphasis_asked_without_the_section_labels_is_the_same(scorer):
    """The section labels are no report text: asking the extractor about a labelled first sentence without
    its label (what the rule does, so the label checks' answers serve) gives the same weights."""
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    result = rg4.build(st, im, sec, rg4.RulesJobRunner(label_vector))
    unlabelled = TokenScorer(
        scorer.tokenizer, scorer.emphasised, 100, "tiny", section_labels=rg4.SECTION_PREFIXES
    )
    labelled = TokenScorer(scorer.tokenizer, scorer.emphasised, 100, "tiny")
    assert (
        rg4.score_targets(result.tables, True, unlabelled).by_target()
        == rg4.score_targets(result.tables, True, labelled).by_target()
    )


def test_shards_write_the_weights_of_one_job(tmp_path, tokenizer_dir):
    """rg4.shards: each shard scores its own targets; the merged files (weights, their note) are one job's."""
    inputs = write_inputs(tmp_path, sharded_patients())
    options = ("--scores-tokenizer", str(tokenizer_dir))
    whole = run_stage("rg4", inputs, tmp_path / "whole", *options)
    merged = run_shards(inputs, tmp_path / "sharded", 3, *options)
    for name in whole:
        assert merged[name].read_bytes() == whole[name].read_bytes(), name
    notes = json.loads(merged["notes"].read_text())
    assert notes[-1].startswith("new_scores: binary") and "% of the target tokens emphasised" in notes[-1]


def test_a_build_without_token_weights_learns_no_emphasis_and_builds_the_same():
    from test_rg4 import patients, tables

    from workflow.keyinfo.extract import label_vector

    st, im, sec = (t.to_pandas() for t in tables(patients()))
    learning, plain = rg4.RulesJobRunner(label_vector), rg4.RulesJobRunner(label_vector, learn_findings=False)
    with_findings, without = rg4.build(st, im, sec, learning), rg4.build(st, im, sec, plain)
    assert learning.rewriter.finding_in and not plain.rewriter.finding_in
    assert all(with_findings.tables[s].equals(without.tables[s]) for s in with_findings.tables)
    assert with_findings.rejects.rows == without.rejects.rows
