"""Which studies belong to which MIMIC-RG4 scenario (reference/mimic_rg4.md §4.2).

A study is eligible when it is in an official split, has a frontal image (PA preferred, then AP; ties by
dicom_id) and a non-empty findings or impression section. Its prior is the most recent eligible study of
the same patient with an earlier study time (same split). SN = every eligible study, SW = with a prior,
MN = with a lateral image (LATERAL preferred, then LL; ties by dicom_id), MW = with both.

The released MIMIC-RG4 is nested by study (MW ⊆ SW ∩ MN, SW ⊆ SN, MN ⊆ SN): a scenario holds a study only
if every scenario it refines holds it (``PARENTS``), so a study whose sn target fails its check leaves all
four scenarios.
"""

from __future__ import annotations

import pandas as pd

FRONTAL_VIEWS = ("PA", "AP")  # preference order
LATERAL_VIEWS = ("LATERAL", "LL")
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}
# scenario -> the scenarios whose inputs it extends (a study it holds must be in all of them)
PARENTS = {"sn": (), "sw": ("sn",), "mn": ("sn",), "mw": ("sw", "mn")}


def relative_to_files(paths: pd.Series) -> pd.Series:
    """LLM-RG4 joins image paths to `.../2.0.0/files/`: drop our leading ``files/``."""
    return paths.str.replace(r"^files/", "", regex=True)


def pick_view(images: pd.DataFrame, views: tuple[str, ...]) -> pd.DataFrame:
    """One image per study among ``views`` (earlier view preferred, then the smallest dicom_id)."""
    view = images["view_position"].fillna("").str.upper().str.strip()
    chosen = images.loc[view.isin(views), ["study_id", "dicom_id", "image_path"]].copy()
    chosen["view"] = view[chosen.index]
    chosen["rank"] = chosen["view"].map({v: i for i, v in enumerate(views)})
    chosen = chosen.sort_values(["study_id", "rank", "dicom_id"], kind="stable")
    return chosen.drop_duplicates("study_id", keep="first").drop(columns="rank").set_index("study_id")


def _present(series: pd.Series) -> pd.Series:
    return series.fillna("").str.strip() != ""


def eligible_studies(studies: pd.DataFrame, images: pd.DataFrame, sections: pd.DataFrame):
    """(eligible, rejected): eligible has one row per study with its frontal/lateral image and sections;
    rejected has study_id and reason (``unknown_split``, ``no_sections``, ``no_findings_or_impression``,
    ``no_frontal_image``) for every other study."""
    frontal = pick_view(images, FRONTAL_VIEWS)
    lateral = pick_view(images, LATERAL_VIEWS)
    df = studies[["subject_id", "study_id", "split", "study_datetime"]].drop_duplicates("study_id").copy()
    df["split"] = df["split"].map(SPLIT_NAMES)
    sec = sections.drop_duplicates("study_id").set_index("study_id")
    df = df.join(sec[["indication", "history", "findings", "impression"]], on="study_id")
    df = df.join(frontal.rename(columns=lambda c: f"frontal_{c}"), on="study_id")
    df = df.join(lateral.rename(columns=lambda c: f"lateral_{c}"), on="study_id")

    reason = pd.Series(pd.NA, index=df.index, dtype="object")
    has_report = _present(df["findings"]) | _present(df["impression"])
    reason[df["frontal_dicom_id"].isna()] = "no_frontal_image"
    reason[~has_report] = "no_findings_or_impression"
    reason[~df["study_id"].isin(sec.index)] = "no_sections"
    reason[df["split"].isna()] = "unknown_split"
    rejected = pd.DataFrame({"study_id": df["study_id"], "reason": reason})[reason.notna()]
    return df[reason.isna()].reset_index(drop=True), rejected.reset_index(drop=True)


def attach_priors(eligible: pd.DataFrame) -> pd.DataFrame:
    """Add ``last_study_id``: the latest eligible study of the patient strictly before this one.

    Studies with the same time share the prior of that time; a study without a time neither has nor is
    a prior (it cannot be ordered).
    """
    df = eligible.copy()
    timed = df[df["study_datetime"].notna()].sort_values(["subject_id", "study_datetime", "study_id"])
    # one representative (the last study id) per (subject, time); its predecessor is the prior
    groups = timed.drop_duplicates(["subject_id", "study_datetime"], keep="last")[
        ["subject_id", "study_datetime", "study_id", "split"]
    ]
    prev = groups.groupby("subject_id", sort=False)[["study_id", "split"]].shift(1)
    groups = groups.assign(last_study_id=prev["study_id"], last_split=prev["split"])
    timed = timed.merge(
        groups[["subject_id", "study_datetime", "last_study_id", "last_split"]],
        on=["subject_id", "study_datetime"],
        how="left",
    )
    # priors never cross splits (the official split is patient-level; this guards other inputs)
    timed.loc[timed["last_split"] != timed["split"], "last_study_id"] = pd.NA
    df = df.merge(timed[["study_id", "last_study_id"]], on="study_id", how="left")
    df["last_study_id"] = df["last_study_id"].astype("Int64")
    return df


def scenario_members(df: pd.DataFrame) -> dict[str, pd.Series]:
    """Boolean masks over ``df`` (eligible studies with priors attached)."""
    prior = df["last_study_id"].notna()
    lateral = df["lateral_dicom_id"].notna()
    return {
        "sn": pd.Series(True, index=df.index),
        "sw": prior,
        "mn": lateral,
        "mw": prior & lateral,
    }


def nest(kept: dict[str, set]) -> tuple[dict[str, set], dict[str, set]]:
    """(nested sets, what each scenario lost to nesting): every scenario ∩ all of its ``PARENTS``,
    parents first (so a study dropped from sn also leaves mw through sw and mn)."""
    nested: dict[str, set] = {}
    lost: dict[str, set] = {}
    for scenario, parents in PARENTS.items():
        allowed = set(kept[scenario])
        for parent in parents:
            allowed &= nested[parent]
        nested[scenario] = allowed
        lost[scenario] = set(kept[scenario]) - allowed
    return nested, lost


def nesting_problems(members: dict[str, set]) -> list[str]:
    """How ``members`` (scenario -> study ids) break MW ⊆ SW ∩ MN, SW ⊆ SN, MN ⊆ SN (empty: nested)."""
    problems = []
    for scenario, parents in PARENTS.items():
        if not parents:
            continue
        allowed = set.intersection(*(members[p] for p in parents))
        extra = members[scenario] - allowed
        if extra:
            example = sorted(extra)[:3]
            problems.append(
                f"{scenario.upper()} ⊄ {' ∩ '.join(p.upper() for p in parents)}: {len(extra)} studies"
                f" (e.g. study_id {', '.join(map(str, example))})"
            )
    return problems
