"""Level and type questions: the attribute of one finding (a finding with two different levels is not asked)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflow.vqa.config import VqaConfig
from workflow.vqa.libs import Templates
from workflow.vqa.prepare import Prepared
from workflow.vqa.questions.frame import distinct_join, question_frame
from workflow.vqa.sampling import pick_one_per_group, type_rng, uniform_template


def build_attribute(p: Prepared, tpl: Templates, cfg: VqaConfig, qtype: str) -> tuple[pd.DataFrame, dict]:
    """``qtype`` "level" or "type": the question asks the finding's value of that attribute."""
    values = {"level": p.levels, "type": p.types}[qtype]
    rng = type_rng(cfg, qtype)
    info = {}
    inst = p.instances
    have = inst[inst[qtype] >= 0]
    joined = distinct_join(have, values, qtype)
    if qtype == "level":  # two different levels for one finding is ambiguous: no question
        ambiguous = joined.str.contains(",", regex=False)
        info["level: findings with two different levels (not asked)"] = int(ambiguous.sum())
        joined = joined[~ambiguous]
    key = have["s"].to_numpy() * 1_000_003 + have["name"].to_numpy()
    have = have[np.isin(key, joined.index.to_numpy())][["s", "name"]].drop_duplicates()
    pick = have.iloc[pick_one_per_group(have["s"].to_numpy(), rng)]
    key = pick["s"].to_numpy() * 1_000_003 + pick["name"].to_numpy()
    tid = uniform_template(rng, tpl.family(qtype, "open"), len(pick))
    return question_frame(pick["s"], tid, joined.reindex(key).to_numpy(), name=pick["name"]), info
