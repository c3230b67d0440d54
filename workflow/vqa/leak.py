"""Leak probe: how well the question text alone predicts a yes/no answer (it should not)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from workflow.contract import VQA_LEAK

_TOKEN = re.compile(r"[a-z0-9\-]+")


def _features(texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """Binary unigram + bigram features of each distinct question."""
    docs = []
    for t in texts:
        toks = _TOKEN.findall(t.lower())
        docs.append(set(toks) | {f"{a} {b}" for a, b in zip(toks, toks[1:], strict=False)})
    vocab = sorted(set().union(*docs)) if docs else []
    index = {w: i for i, w in enumerate(vocab)}
    x = np.zeros((len(texts), len(vocab)), dtype=np.float64)
    for i, d in enumerate(docs):
        x[i, [index[w] for w in d]] = 1.0
    return x, vocab


def _logreg(
    x: np.ndarray, n_yes: np.ndarray, n_no: np.ndarray, l2: float = 1e-4, steps: int = 300
) -> np.ndarray:
    """Weighted logistic regression on distinct questions (weights = answer counts); returns P(yes)."""
    xb = np.c_[x, np.ones(len(x))]
    w = np.zeros(xb.shape[1])
    total = n_yes + n_no
    n = total.sum()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in range(1, steps + 1):  # Adam, full batch
        prob = 1 / (1 + np.exp(-(xb @ w)))
        grad = xb.T @ (prob * total - n_yes) / n + l2 * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        w -= 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return 1 / (1 + np.exp(-(xb @ w)))


def text_only_probe(questions: pd.Series, answers: pd.Series, seed: int = 0, max_rows: int = 200_000) -> dict:
    """How well the question text alone predicts a yes/no answer (80/20 split of rows).

    Three text-only classifiers: naive Bayes and logistic regression on word uni/bigrams, and a lookup of
    the exact question's majority answer (the best any text-only model can do on seen questions).
    ``gain`` = best accuracy - majority-answer accuracy on the held-out rows.
    """
    codes, texts = pd.factorize(questions.to_numpy())
    return _probe(
        codes, texts, answers.isin(["yes", "no"]).to_numpy(), (answers == "yes").to_numpy(), seed, max_rows
    )


def _probe(
    question: np.ndarray, texts, is_yes_no: np.ndarray, is_yes: np.ndarray, seed: int, max_rows: int
) -> dict:
    """:func:`text_only_probe` of the rows whose questions are ``texts[question]`` (distinct texts)."""
    q = question[is_yes_no]
    y = is_yes[is_yes_no]
    rng = np.random.default_rng(seed)
    if len(q) > max_rows:
        take = rng.choice(len(q), size=max_rows, replace=False)
        q, y = q[take], y[take]
    n = len(q)
    if n < 20:
        return {"n": n}
    test = rng.random(n) < 0.2
    # the distinct questions in order of first appearance among the rows probed
    codes, distinct = pd.factorize(q)
    uniq = [texts[i] for i in distinct]
    u = len(uniq)
    yes_tr = np.bincount(codes[~test & y], minlength=u).astype(float)
    no_tr = np.bincount(codes[~test & ~y], minlength=u).astype(float)
    yes_te = np.bincount(codes[test & y], minlength=u).astype(float)
    no_te = np.bincount(codes[test & ~y], minlength=u).astype(float)
    n_te = yes_te.sum() + no_te.sum()
    majority_yes = yes_tr.sum() >= no_tr.sum()
    majority_acc = (yes_te.sum() if majority_yes else no_te.sum()) / n_te

    def acc(pred_yes: np.ndarray) -> float:
        return float((np.where(pred_yes, yes_te, no_te)).sum() / n_te)

    seen = (yes_tr + no_tr) > 0
    lookup = np.where(seen, yes_tr > no_tr, majority_yes) | (seen & (yes_tr == no_tr) & majority_yes)
    x, _ = _features(uniq)
    # Bernoulli naive Bayes with Laplace smoothing
    fy = (x * yes_tr[:, None]).sum(0)
    fn = (x * no_tr[:, None]).sum(0)
    py = (fy + 1) / (yes_tr.sum() + 2)
    pn = (fn + 1) / (no_tr.sum() + 2)
    logit = (
        x @ (np.log(py) - np.log(pn))
        + (1 - x) @ (np.log1p(-py) - np.log1p(-pn))
        + np.log((yes_tr.sum() + 1) / (no_tr.sum() + 1))
    )
    nb = acc(logit > 0)
    lr = acc(_logreg(x, yes_tr, no_tr) > 0.5)
    lk = acc(lookup)
    best = max(nb, lr, lk)
    return {
        "n": int(n),
        "n_distinct_questions": int(u),
        "yes_ratio": float(y.mean()),
        "majority_accuracy": float(majority_acc),
        "naive_bayes_accuracy": nb,
        "logreg_accuracy": lr,
        "lookup_accuracy": lk,
        "gain": float(best - majority_acc),
    }


def leak_report(questions: pd.DataFrame | pa.Table, seed: int = 0, max_rows: int = 200_000) -> pd.DataFrame:
    """:func:`text_only_probe` of each yes/no question type of ``questions`` (question_type, question,
    answer). An Arrow table stays in Arrow: the questions as codes of their distinct texts, not a
    Python string per row."""
    if isinstance(questions, pa.Table):
        text = questions["question"].combine_chunks().dictionary_encode()
        codes = text.indices.to_numpy(zero_copy_only=False)
        texts = text.dictionary.to_pylist()
        qtypes = questions["question_type"]
        answers = questions["answer"]
        is_yes_no = pc.fill_null(pc.is_in(answers, value_set=pa.array(["yes", "no"])), False).to_numpy()
        is_yes = pc.fill_null(pc.equal(answers, "yes"), False).to_numpy()

        def probe(qtype: str) -> dict:
            of_type = pc.fill_null(pc.equal(qtypes, qtype), False).to_numpy()
            return _probe(codes[of_type], texts, is_yes_no[of_type], is_yes[of_type], seed, max_rows)

    else:

        def probe(qtype: str) -> dict:
            sub = questions[questions["question_type"] == qtype]
            return text_only_probe(sub["question"], sub["answer"], seed, max_rows)

    rows = []
    for qtype in ("presence", "abnormality", "view"):
        r = probe(qtype)
        if r.get("n", 0) >= 20:
            rows.append({"question_type": qtype, **r})
    cols = VQA_LEAK.names
    return pd.DataFrame(rows, columns=cols)
