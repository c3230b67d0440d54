"""All question types for one corpus, rendered into the QUESTIONS table."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pyarrow as pa

from workflow.vqa.config import QUESTION_TYPES, REPO, STYLES, VIEWS, VqaConfig
from workflow.vqa.levels import load_level_lib
from workflow.vqa.libs import Templates
from workflow.vqa.phrases import location_phrase
from workflow.vqa.prepare import Corpus, Prepared, prepare
from workflow.vqa.questions.abnormality import build_abnormality
from workflow.vqa.questions.attribute import build_attribute
from workflow.vqa.questions.location import build_location
from workflow.vqa.questions.presence import build_presence
from workflow.vqa.questions.view import build_view

log = logging.getLogger(__name__)


def render_questions(frame: pd.DataFrame, p: Prepared, tpl: Templates) -> pa.Array:
    """Fill templates once per distinct (template, name, location, view) combination."""
    n_loc = len(p.locations) + 1
    key = (
        (
            (frame["tid"].to_numpy() * (len(p.names) + 1) + frame["name"].to_numpy() + 1) * n_loc
            + frame["loc"].to_numpy()
            + 1
        )
        * 3
        + frame["view"].to_numpy()
        + 1
    )
    codes, uniq = pd.factorize(key)
    rows = pd.DataFrame({"i": np.arange(len(frame))}).groupby(codes)["i"].first().to_numpy()
    texts = []
    for r in rows:
        tid, name, loc, view = (int(frame[c].iat[r]) for c in ("tid", "name", "loc", "view"))
        slots = {}
        if name >= 0:
            slots["name"] = p.display[name]
        if loc >= 0:
            words = p.locations[loc]
            slots["location"] = words if tpl.location_slot == "words" else location_phrase(words)
        if view >= 0:
            slots["view"] = VIEWS[view]
        texts.append(_indefinite_article(tpl.texts[tid].format(**slots)))
    return expand_codes(codes, texts)


_A_BEFORE_AP = re.compile(r"\b([Aa]) (?=AP\b)")


def _indefinite_article(text: str) -> str:
    """ "is this a AP view?" -> "is this an AP view?" (the filled {view} slot decides the article)."""
    return _A_BEFORE_AP.sub(lambda m: m.group(1) + "n ", text)


def expand_codes(codes: np.ndarray, values) -> pa.Array:
    """``values[codes]`` as a plain string array, through a dictionary array (no Python objects per row)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(values, pa.string())).cast(
        pa.string()
    )


def generate(
    findings: pd.DataFrame,
    images: pd.DataFrame,
    studies: pd.DataFrame,
    tpl: Templates,
    names: list[str],
    cfg: VqaConfig | None = None,
    display: list[str] | None = None,
    keyinfo_studies: pd.DataFrame | None = None,
    level_lib: dict[str, str] | None = None,
    corpus: Corpus | None = None,
) -> tuple[pa.Table, Prepared, dict]:
    """Build the QUESTIONS table; also returns the prepared inputs (rejects, counts) and run info.

    ``keyinfo_studies``: the key-information stage's per-study status (KEYINFO_STUDIES); ``level_lib``:
    levels.csv as read by :func:`load_level_lib` (default: libs/levels.csv), used by the
    medical_cxr_vqa style only. ``corpus``: the whole corpus's facts when the inputs are one shard of
    it (``cfg.shard`` of ``cfg.shards``; :func:`corpus_facts`).
    """
    cfg = cfg or VqaConfig()
    if cfg.style not in STYLES:
        raise ValueError(f"vqa.style: {cfg.style!r} is not one of {list(STYLES)}")
    if cfg.style == "medical_cxr_vqa" and level_lib is None:
        level_lib = load_level_lib(REPO / "libs" / "levels.csv")
    p = prepare(
        findings,
        images,
        studies,
        names,
        display,
        cfg.exclude_names,
        keyinfo_studies=keyinfo_studies,
        level_lib=level_lib if cfg.style == "medical_cxr_vqa" else None,
        level_word_min_count=cfg.level_word_min_count,
        corpus=corpus,
    )
    # each builder reads the prepared inputs only and returns its questions and counts
    built = {
        "presence": build_presence(p, tpl, cfg),
        "abnormality": build_abnormality(p, tpl, cfg),
        "view": build_view(p, tpl, cfg),
        "location": build_location(p, tpl, cfg),
        "level": build_attribute(p, tpl, cfg, "level"),
        "type": build_attribute(p, tpl, cfg, "type"),
    }
    info = dict(p.counts)
    for _, counts in built.values():
        info.update(counts)
    parts = {qtype: built[qtype][0] for qtype in QUESTION_TYPES}
    for qtype, part in parts.items():
        info[f"{qtype}: questions"] = len(part)
        if not len(part) and len(p.studies):
            log.warning("vqa: no %s question at all (see the per-rule counts above)", qtype)
    frame = pd.concat(
        [f.assign(qtype=np.int8(QUESTION_TYPES.index(t))) for t, f in parts.items()], ignore_index=True
    )
    missing = frame["answer"].isna().to_numpy()
    if missing.any():  # cannot happen by construction; never write a question without an answer
        log.error("%d questions without an answer dropped", int(missing.sum()))
        frame = frame[~missing]
    frame = frame.sort_values(["s", "qtype"], kind="stable").reset_index(drop=True)
    question = render_questions(frame, p, tpl)
    st = p.studies
    s = frame["s"].to_numpy()
    per_study = pa.Table.from_pandas(
        st[["subject_id", "study_id", "dicom_id", "image_path", "split"]], preserve_index=False
    ).take(pa.array(s))
    answer_codes, answer_values = pd.factorize(frame["answer"])
    table = pa.table(
        {
            "qa_id": np.arange(len(frame), dtype=np.int64),
            **{c: per_study[c] for c in per_study.column_names},
            "question_type": expand_codes(frame["qtype"].to_numpy(), list(QUESTION_TYPES)),
            "question": question,
            "answer": expand_codes(answer_codes, list(answer_values)),
            "template_id": expand_codes(frame["tid"].to_numpy(), tpl.ids),
        }
    )
    asked = np.zeros(len(st), dtype=bool)
    asked[s] = True
    for sid in st["study_id"].to_numpy()[~asked]:
        p.rejects.add(int(sid), "no_question", "frontal image but nothing to ask after sampling")
    return table, p, info
