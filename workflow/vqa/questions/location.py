"""Location questions: where one finding of the study is (every place it is seen), or on which side."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow.vqa.config import VqaConfig
from workflow.vqa.libs import Templates
from workflow.vqa.prepare import Prepared
from workflow.vqa.questions.frame import distinct_join, question_frame
from workflow.vqa.sampling import choose_family, pick_one_per_group, type_rng, uniform_template


def build_location(p: Prepared, tpl: Templates, cfg: VqaConfig) -> tuple[pd.DataFrame, dict]:
    rng = type_rng(cfg, "location")
    info = {}
    compat = cfg.style == "medical_cxr_vqa"
    inst = p.instances
    located = inst[inst["loc"] >= 0]
    pairs = located[["s", "name"]].drop_duplicates()
    pick = pairs.iloc[pick_one_per_group(pairs["s"].to_numpy(), rng)]
    chosen = located.merge(pick, on=["s", "name"])
    # the original answers "<location> area"; one finding seen at several places lists each
    loc_answers = [f"{loc} area" for loc in p.locations] if compat else p.locations
    where = distinct_join(chosen, loc_answers, "loc")
    key = pick["s"].to_numpy() * 1_000_003 + pick["name"].to_numpy()
    answer_where = where.reindex(key).to_numpy()
    # left/right only for a finding seen on one side only (never "bilateral", never two sides)
    first = chosen.assign(
        side=np.asarray([loc.split(" ", 1)[0] for loc in p.locations], dtype=object)[chosen["loc"]]
    )
    sides = first.groupby(["s", "name"])["side"].agg(["min", "max"])
    one = sides[(sides["min"] == sides["max"]) & sides["min"].isin(["left", "right"])]["min"]
    side = one.reindex(pd.MultiIndex.from_arrays([pick["s"], pick["name"]])).to_numpy()
    fam = choose_family(rng, len(pick), "location", ("where", "side"), tpl)
    use_side = (fam == 1) & pd.notna(side)
    info["location: side question asked 'where' instead (finding not on exactly one side)"] = int(
        ((fam == 1) & ~pd.notna(side)).sum()
    )
    tid = np.where(
        use_side,
        uniform_template(rng, tpl.family("location", "side"), len(pick)),
        uniform_template(rng, tpl.family("location", "where"), len(pick)),
    )
    side_answer = np.where(pd.notna(side), pd.Series(side, dtype=object) + " side", None) if compat else side
    answer = np.where(use_side, side_answer, answer_where)
    return question_frame(pick["s"], tid, answer, name=pick["name"]), info
