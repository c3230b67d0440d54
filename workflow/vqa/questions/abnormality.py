"""Abnormality questions: paired "is there any abnormality?" yes/no, the list of findings, and the region question."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow.vqa.config import VqaConfig
from workflow.vqa.libs import Templates
from workflow.vqa.prepare import Prepared
from workflow.vqa.questions.frame import join_names, question_frame
from workflow.vqa.sampling import choose_family, pick_one_per_group, type_rng, uniform_template


def build_abnormality(p: Prepared, tpl: Templates, cfg: VqaConfig) -> tuple[pd.DataFrame, dict]:
    rng = type_rng(cfg, "abnormality")
    info = {}
    n_s = len(p.studies)
    has_pos = p.pos.any(axis=1)
    abnormal = has_pos | p.unknown_pos
    # "no abnormality" only for a study read and found normal (key-information status, or findings rows
    # without any positive or uncertain finding); never for an unread or silent one
    normal = np.flatnonzero(p.normal & ~abnormal)
    no_rows = normal[rng.random(len(normal)) < cfg.abnormality_no_finding_rate]
    abn_rows = rng.permutation(np.flatnonzero(abnormal))
    yes_rows = abn_rows[: len(no_rows)]  # as many "yes" as "no" yes/no questions
    rest = abn_rows[len(no_rows) :]
    n_pair = min(len(yes_rows), len(no_rows))
    info["abnormality: normal studies"] = len(normal)
    info["abnormality: normal studies not sampled (abnormality_no_finding_rate)"] = len(normal) - len(no_rows)
    info["abnormality: 'no' removed by yes/no balancing"] = len(no_rows) - n_pair
    yes_rows, no_rows = yes_rows[:n_pair], no_rows[:n_pair]
    pair_tid = uniform_template(rng, tpl.family("abnormality", "yesno"), n_pair)
    frames = [
        question_frame(yes_rows, pair_tid, np.full(n_pair, "yes", dtype=object)),
        question_frame(no_rows, pair_tid, np.full(n_pair, "no", dtype=object)),
    ]

    inst = p.instances
    display = np.asarray(p.display, dtype=object)
    located = inst[inst["loc"] >= 0]
    has_located = np.zeros(n_s, dtype=bool)
    has_located[located["s"].to_numpy()] = True
    fam = choose_family(rng, len(rest), "abnormality", ("list", "region"), tpl)
    can_list = ~p.unknown_pos[rest] & has_pos[rest]  # an unnamed finding would make the list incomplete
    region = (fam == 1) | ~can_list
    region &= has_located[rest]
    listed = rest[~region & can_list]
    region_rows = rest[region]
    info["abnormality: abnormal studies without a named or located finding"] = int(
        len(rest) - len(listed) - len(region_rows)
    )

    if len(listed):
        answers = join_names(inst[inst["s"].isin(listed)], display)
        frames.append(
            question_frame(
                listed,
                uniform_template(rng, tpl.family("abnormality", "list"), len(listed)),
                answers.reindex(listed).to_numpy(),
            )
        )
    if len(region_rows):
        cand = located[located["s"].isin(region_rows)]
        pick = cand.iloc[pick_one_per_group(cand["s"].to_numpy(), rng)]
        if cfg.style == "medical_cxr_vqa":  # the original answers with the one finding it picked
            answers = display[pick["name"].to_numpy()]
        else:  # every finding seen at that location
            at_loc = located.merge(pick[["s", "loc"]], on=["s", "loc"])
            answers = join_names(at_loc, display).reindex(pick["s"].to_numpy()).to_numpy()
        frames.append(
            question_frame(
                pick["s"],
                uniform_template(rng, tpl.family("abnormality", "region"), len(pick)),
                answers,
                loc=pick["loc"],
            )
        )
    return pd.concat(frames, ignore_index=True), info
