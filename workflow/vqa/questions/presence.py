"""Presence questions: paired yes/no about one finding (optionally at a location); "no" from negations, unmentioned findings and laterality flips."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow.vqa.config import VqaConfig
from workflow.vqa.libs import Templates
from workflow.vqa.phrases import flip_laterality
from workflow.vqa.prepare import Prepared
from workflow.vqa.questions.frame import question_frame
from workflow.vqa.sampling import (
    choose_family,
    draw_matching,
    pair_yes_no,
    pick_one_per_group,
    take_codes,
    type_rng,
    uniform_template,
)


def build_presence(p: Prepared, tpl: Templates, cfg: VqaConfig) -> tuple[pd.DataFrame, dict]:
    rng = type_rng(cfg, "presence")
    n_s, n_n = p.pos.shape
    has_pos = p.pos.any(axis=1)
    n_pos = int(has_pos.sum())
    # which findings may be a "no" in which study: explicit negations, and findings the report does
    # not mention (when that can be read as absent); never a positive or uncertain one
    w_row = np.where(
        p.neg, np.float32(cfg.explicit_negative_weight), p.absent_known[:, None].astype(np.float32)
    )
    w_row[p.pos | p.unc] = 0
    can_no = (w_row > 0).any(axis=1)
    # one candidate per study; studies with a positive say "yes" often enough to balance the studies
    # that can only say "no"
    n_only_no = int((can_no & ~has_pos).sum())
    q_yes = min(1.0, (n_pos + n_only_no) / (2 * n_pos)) if n_pos else 0.0
    answer_yes = has_pos & (rng.random(n_s) < q_yes)
    located_fam = choose_family(rng, n_s, "presence", ("plain", "located"), tpl) == 1

    inst = p.instances
    pairs = inst[["s", "name"]].drop_duplicates()
    located = inst[inst["loc"] >= 0][["s", "name", "loc"]].drop_duplicates()

    # yes: a located positive finding (located family) or any positive finding (plain family)
    want_loc = answer_yes & located_fam
    cand = located[want_loc[located["s"].to_numpy()]]
    yes_loc = cand.iloc[pick_one_per_group(cand["s"].to_numpy(), rng)]
    plain_yes_s = answer_yes & ~np.isin(np.arange(n_s), yes_loc["s"].to_numpy())
    cand = pairs[plain_yes_s[pairs["s"].to_numpy()]]
    yes_plain = cand.iloc[pick_one_per_group(cand["s"].to_numpy(), rng)].assign(loc=-1)

    no_s = np.flatnonzero(~answer_yes)

    # located "no": flip a one-sided finding to the other side, or a finding absent from the study at a
    # location drawn from where that finding is seen when present
    # as many located "no" as located "yes" (not every "yes" study has a located finding)
    located_share = len(yes_loc) / max(1, len(yes_loc) + len(yes_plain))
    want_loc_no = no_s[rng.random(len(no_s)) < located_share]
    flip = want_loc_no[rng.random(len(want_loc_no)) < cfg.laterality_flip_share]
    locations = p.locations  # holds the other side of every one-sided location (prepare)
    loc_index = {loc: i for i, loc in enumerate(locations)}
    flipped_code = np.array([loc_index.get(flip_laterality(loc), -1) for loc in locations], dtype=np.int64)
    loc_code = inst["loc"].to_numpy()
    inst_all = inst.assign(side=take_codes(flipped_code, loc_code))
    # flippable: every positive instance of the name in the study is located on the same single side
    side_of = np.full(len(locations), 0, dtype=np.int64)
    for loc, i in loc_index.items():
        side_of[i] = {"left": 1, "right": 2}.get(loc.split(" ", 1)[0], 3)
    inst_all["lat"] = take_codes(side_of, loc_code, fill=4)
    lat_stats = inst_all.groupby(["s", "name"])["lat"].agg(["min", "max"])
    one_side = lat_stats[(lat_stats["min"] == lat_stats["max"]) & (lat_stats["min"] <= 2)].reset_index()
    flippable = inst_all.merge(one_side[["s", "name"]], on=["s", "name"])
    flippable = flippable[np.isin(flippable["s"].to_numpy(), flip)]
    # "possible right effusion" makes "is there effusion on the right?" unanswerable
    flippable = flippable[~p.unc[flippable["s"].to_numpy(), flippable["name"].to_numpy()]]
    flip_pick = flippable.iloc[pick_one_per_group(flippable["s"].to_numpy(), rng)]
    no_flip = pd.DataFrame({"s": flip_pick["s"], "name": flip_pick["name"], "loc": flip_pick["side"]})

    # absent/negated names, drawn so that per family the "no" names match the "yes" names
    no_named = np.setdiff1d(no_s, no_flip["s"].to_numpy())
    wants_loc = np.isin(no_named, want_loc_no)
    name_pick = np.full(len(no_named), -1, dtype=np.int64)
    for sel, target in (
        (wants_loc, np.bincount(yes_loc["name"].to_numpy(), minlength=n_n)),
        (~wants_loc, np.bincount(yes_plain["name"].to_numpy(), minlength=n_n)),
    ):
        base = w_row[no_named[sel]] * target.astype(np.float32)[None, :]
        name_pick[sel] = draw_matching(base, target, rng)
    got = name_pick >= 0
    no_all = pd.DataFrame({"s": no_named[got], "name": name_pick[got], "loc": -1})
    loc_rows = np.flatnonzero(wants_loc[got])
    if len(loc_rows):
        # each located "no" takes the location of a located "yes" of the same finding (a random
        # permutation, reused only when there are more "no" than "yes"), so the locations match too
        drawn = np.full(len(loc_rows), -1, dtype=np.int64)
        sub_names = no_all["name"].to_numpy()[loc_rows]
        yes_names_loc = yes_loc["name"].to_numpy()
        yes_locs = yes_loc["loc"].to_numpy()
        for name in np.unique(sub_names):
            pool = yes_locs[yes_names_loc == name]
            sel = np.flatnonzero(sub_names == name)
            if len(pool):
                drawn[sel] = np.resize(rng.permutation(pool), len(sel))
        loc_col = no_all["loc"].to_numpy().copy()
        loc_col[loc_rows] = drawn  # -1 (the finding is never seen located) falls back to plain
        no_all["loc"] = loc_col
    no = pd.concat([no_flip, no_all], ignore_index=True)
    yes = pd.concat([yes_loc, yes_plain], ignore_index=True)

    cand = pd.concat([yes.assign(yes=True), no.assign(yes=False)], ignore_index=True)
    strata = cand["name"].to_numpy() * (len(locations) + 1) + cand["loc"].to_numpy() + 1
    rows, pair = pair_yes_no(strata, cand["yes"].to_numpy(), rng)
    kept = cand.iloc[rows]
    n_pairs = int(pair.max()) + 1 if len(pair) else 0
    plain_t = uniform_template(rng, tpl.family("presence", "plain"), n_pairs)
    loc_t = uniform_template(rng, tpl.family("presence", "located"), n_pairs)
    tid = np.where(kept["loc"].to_numpy() >= 0, loc_t[pair], plain_t[pair])
    explicit = p.neg[kept["s"].to_numpy(), kept["name"].to_numpy()] & ~kept["yes"].to_numpy()
    info = {
        "presence_candidates": len(cand),
        "presence_dropped_by_balancing": len(cand) - len(kept),
        "presence_no_from_explicit_negation": int(explicit.sum()),
        "presence_no_from_laterality_flip": int(
            (~kept["yes"].to_numpy() & kept["s"].isin(no_flip["s"]).to_numpy()).sum()
        ),
    }
    answer = np.where(kept["yes"].to_numpy(), "yes", "no").astype(object)
    return question_frame(kept["s"], tid, answer, name=kept["name"], loc=kept["loc"]), info
