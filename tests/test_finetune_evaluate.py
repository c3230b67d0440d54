"""Student-vs-teacher scoring: presence-aware F1 and JSON validity on held-out gold."""

from __future__ import annotations

import pytest

from workflow.finetune.evaluate import markdown, score


def f(name, presence="positive"):
    return {"name": name, "presence": presence}


GOLD = {
    1: [f("pleural effusion"), f("pneumothorax", "negative")],
    2: [f("cardiomegaly"), f("edema", "uncertain")],
    3: [],
}


def test_wrong_presence_is_a_miss_and_a_false_alarm():
    answers = {1: [f("Pleural  Effusion"), f("pneumothorax", "positive")], 2: [f("cardiomegaly")], 3: []}
    row = score("student", GOLD, answers, [1, 2, 3])
    # 4 gold triples; predicted 3, of which 2 right (effusion +, cardiomegaly +).
    assert row["precision"] == pytest.approx(2 / 3) and row["recall"] == pytest.approx(2 / 4)
    assert row["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # Positive findings only: gold {effusion, cardiomegaly}, predicted {effusion, pneumothorax, cardiomegaly}.
    assert row["positive_f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert row["name_f1"] == pytest.approx(2 * 1 * 0.75 / 1.75)  # names: 3 of 4 found, none invented
    assert row["json_valid_rate"] == 1.0


def test_unparsable_or_missing_answers_count_against_validity_and_recall():
    answers = {1: None, 2: [f("cardiomegaly"), f("edema", "uncertain")]}  # 1 garbage, 3 never answered
    row = score("student", GOLD, answers, [1, 2, 3])
    assert (row["answered"], row["json_valid"]) == (2, 1)
    assert row["json_valid_rate"] == pytest.approx(1 / 3)
    assert row["precision"] == 1.0 and row["recall"] == pytest.approx(2 / 4)
    assert "| student | 3 | 33.3% |" in markdown([row])


def test_perfect_answers_score_one():
    row = score("teacher", GOLD, {k: list(v) for k, v in GOLD.items()}, [1, 2, 3])
    assert row["f1"] == row["positive_f1"] == row["name_f1"] == row["json_valid_rate"] == 1.0
