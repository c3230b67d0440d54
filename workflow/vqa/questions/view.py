"""View questions: the frontal image's projection (open, or yes/no about an asked view), PA/AP balanced per split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow.vqa.config import VIEWS, VqaConfig
from workflow.vqa.libs import Templates
from workflow.vqa.prepare import Prepared, view_splits
from workflow.vqa.questions.frame import question_frame
from workflow.vqa.sampling import choose_family, pair_yes_no, type_rng, uniform_template


def build_view(p: Prepared, tpl: Templates, cfg: VqaConfig) -> tuple[pd.DataFrame, dict]:
    rng = type_rng(cfg, "view")
    info = {}
    st = p.studies
    known = np.flatnonzero(st["view"].to_numpy() >= 0)
    view = st["view"].to_numpy().astype(np.int64)
    split_code, splits = pd.factorize(st["split"])
    info["view: frontal studies of unknown projection (no view question)"] = int(len(st) - len(known))
    if cfg.view_balance and len(known):
        # balance PA against AP only in splits that have both; a one-view split (a PA-only corpus)
        # keeps every study, or the whole type would vanish. Both views in the whole corpus: a shard
        # that sees one view of such a split keeps none of it (its own PA = AP = 0)
        two_views = p.corpus.view_splits if p.corpus else view_splits(st)
        both = np.array([split in two_views for split in splits], dtype=bool)
        bal = known[both[split_code[known]]]
        rows, pair = pair_yes_no(split_code[bal], view[bal] == 0, rng)
        rows = bal[rows]
        rest = known[~both[split_code[known]]]
        info["view: removed by PA/AP balancing"] = int(len(bal) - len(rows))
        info["view: one-view splits kept unbalanced"] = int(len(rest))
        start = int(pair.max()) + 1 if len(pair) else 0
        rows = np.r_[rows, rest]
        pair = np.r_[pair, start + np.arange(len(rest))]
    else:
        rows = known
        pair = np.arange(len(known))
    n_pairs = int(pair.max()) + 1 if len(pair) else 0
    fam = choose_family(rng, n_pairs, "view", ("open", "yesno"), tpl)
    open_t = uniform_template(rng, tpl.family("view", "open"), n_pairs)
    yesno_t = uniform_template(rng, tpl.family("view", "yesno"), n_pairs)
    asked = rng.integers(2, size=n_pairs)
    f = fam[pair]
    v = view[rows]
    tid = np.where(f == 0, open_t[pair], yesno_t[pair])
    view_answer = np.asarray(VIEWS, dtype=object)
    if cfg.style == "medical_cxr_vqa":
        view_answer = view_answer + " view"
    answer = np.where(f == 0, view_answer[v], np.where(asked[pair] == v, "yes", "no"))
    return question_frame(rows, tid, answer.astype(object), view=np.where(f == 1, asked[pair], -1)), info
