"""The VQA stage's constants and its settings (the ``vqa:`` section of config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGE = "vqa"
QUESTION_TYPES = ("abnormality", "presence", "view", "location", "level", "type")
VIEWS = ("PA", "AP")
# the two answer/wording styles (config `vqa.style`)
STYLES = ("medical_cxr_vqa", "clean")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class VqaConfig:
    """The ``vqa:`` section of config.yaml (config.schema.yaml documents every key)."""

    seed: int = 0
    # medical_cxr_vqa: the original's answer forms ("PA view", "right basal area", "left side", the
    # report's level words, one finding per region question); clean: our forms ("PA", "right basal",
    # "left", five ordinal levels, every finding at the region)
    style: str = "medical_cxr_vqa"
    # medical_cxr_vqa style: a level word seen on fewer positive findings than this is answered with its
    # ordinal level instead (the original's frequency threshold of 10 on attribute words)
    level_word_min_count: int = 10
    # canonical names that never appear in a question (devices are not abnormalities; Rule 4 of the paper)
    exclude_names: tuple[str, ...] = ("support device",)
    # share of normal studies that get the abnormality yes/no question ("no"); the original asked half
    abnormality_no_finding_rate: float = 1.0
    # how much likelier an explicitly negated finding is picked as a "no" than an unmentioned one
    explicit_negative_weight: float = 4.0
    # share of located "no" presence questions made by moving a one-sided finding to the other side
    laterality_flip_share: float = 0.5
    # keep as many AP as PA view questions per split where the split has both views (the original kept
    # 5 % of AP studies instead); a split with one view keeps all its view questions
    view_balance: bool = True
    # presence/abnormality/view questions used by the text-only leak probe (0 = no probe)
    leak_probe_max: int = 200_000
    # the questions of the patients with subject_id % shards == shard (one job each, merged after);
    # every random choice of a shard derives from (seed, shard), so the sample depends on ``shards``
    shards: int = 1
    shard: int = 0
