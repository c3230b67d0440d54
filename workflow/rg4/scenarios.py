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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FRONTAL_VIEWS = ("PA", "AP")  # preference order
LATERAL_VIEWS = ("LATERAL", "LL")
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}
# scenario -> the scenarios whose inputs it extends (a study it holds must be in all of them)
PARENTS = {"sn": (), "sw": ("sn",), "mn": ("sn",), "mw": ("sw", "mn")}
# What str.strip() strips (the characters str.isspace() holds: Unicode white space and the separators
# \x1c-\x1f), for Arrow's trim; written out (the test checks it): finding them costs 70 ms at each import
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def relative_to_files(paths: pa.Array) -> pa.Array:
    """LLM-RG4 joins image paths to `.../2.0.0/files/`: drop our leading ``files/``."""
    return pc.replace_substring_regex(paths, "^files/", "")


def one_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one array (its chunks combined)."""
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _by_value(column: pa.Array, fn, type_: pa.DataType) -> pa.Array:
    """``fn`` of each value of a string column (None for a null), called once per distinct value (a few:
    views, splits)."""
    codes = pc.dictionary_encode(one_array(column))
    mapped = pa.array([fn(v) for v in codes.dictionary.to_pylist()], type_)
    return mapped.take(codes.indices)


def first_rows(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The rows holding each id's first occurrence, in row order (``drop_duplicates(keep="first")``): Arrow
    codes the ids in the order they first appear, so a row is a first one when its code exceeds all before."""
    codes = pc.dictionary_encode(one_array(ids)).indices.to_numpy()
    if not len(codes):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, codes[1:] > np.maximum.accumulate(codes)[:-1]])


def _rows_of(keys: pa.Array, ids: pa.Array) -> pa.Array:
    """For each key, the row of ``ids`` (distinct) that holds it, null where none does (a left join)."""
    return pc.index_in(keys, value_set=ids)


def _present(texts: pa.Array) -> np.ndarray:
    """Whether each text holds more than white space (``str.strip() != ""``; a null does not)."""
    stripped = pc.utf8_trim(texts, WHITESPACE)
    return pc.not_equal(stripped, "").fill_null(False).to_numpy(zero_copy_only=False)


def pick_view(images: pa.Table, views: tuple[str, ...]) -> pa.Table:
    """One image per study among ``views`` (earlier view preferred, then the smallest dicom_id): its
    study_id, dicom_id, image_path and view (the view position upper-cased and stripped)."""
    view = _by_value(images.column("view_position"), lambda v: (v or "").upper().strip(), pa.string())
    rank = _by_value(view, lambda v: views.index(v) if v in views else -1, pa.int64())
    chosen = pa.table(
        {
            "study_id": images.column("study_id"),
            "rank": rank,
            "dicom_id": images.column("dicom_id"),
            "image_path": images.column("image_path"),
            "view": view,
        }
    ).filter(pc.greater_equal(rank, 0))
    order = pc.sort_indices(
        chosen, [("study_id", "ascending"), ("rank", "ascending"), ("dicom_id", "ascending")]
    )
    chosen = chosen.take(order)
    ids = chosen.column("study_id").to_numpy()
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    return chosen.take(first).drop_columns(["rank"])


def eligible_studies(
    studies: pa.Table, images: pa.Table, sections: pa.Table
) -> tuple[pa.Table, pa.Array, list[str]]:
    """(eligible, rejected study ids, their reasons): eligible has one row per study (the first row of each
    study id, in order) with subject_id, study_id, split (official names), study_datetime, indication,
    history, findings, impression, frontal_{dicom_id,image_path,view} and lateral_{...} (null without one);
    the reasons (``unknown_split``, ``no_sections``, ``no_findings_or_impression``, ``no_frontal_image``) are
    for every other study, in order."""
    df = studies.select(["subject_id", "study_id", "split", "study_datetime"]).take(
        first_rows(studies.column("study_id"))
    )
    study_id = one_array(df.column("study_id"))
    split = _by_value(df.column("split"), SPLIT_NAMES.get, pa.string())
    df = df.set_column(2, "split", split)
    # each study's rows in sections (its first) and in the chosen images (null: none), the texts and paths
    # taken once, for the eligible studies only (they are most of the bytes)
    first_section = first_rows(sections.column("study_id"))
    section_ids = one_array(sections.column("study_id")).take(pa.array(first_section, pa.int64()))
    section_of = _rows_of(study_id, section_ids).to_numpy(zero_copy_only=False)  # float, NaN: none
    no_sections = np.isnan(section_of)
    section_row = np.where(no_sections, 0, section_of).astype(np.int64)
    present = _present(sections.column("findings")) | _present(sections.column("impression"))
    has_report = ~no_sections & present[first_section[section_row]] if sections.num_rows else ~no_sections
    chosen = {"frontal": pick_view(images, FRONTAL_VIEWS), "lateral": pick_view(images, LATERAL_VIEWS)}
    image_of = {p: _rows_of(study_id, one_array(t.column("study_id"))) for p, t in chosen.items()}

    reason = np.full(df.num_rows, None, object)  # the last that applies wins
    reason[image_of["frontal"].is_null().to_numpy(zero_copy_only=False)] = "no_frontal_image"
    reason[~has_report] = "no_findings_or_impression"
    reason[no_sections] = "no_sections"
    reason[split.is_null().to_numpy(zero_copy_only=False)] = "unknown_split"
    ok = reason == None  # noqa: E711 (elementwise)
    rejected = np.flatnonzero(~ok)
    kept = pa.array(np.flatnonzero(ok), pa.int64())
    df = df.take(kept)
    rows = pa.array(first_section[section_row[ok]], pa.int64())
    for name in ("indication", "history", "findings", "impression"):
        df = df.append_column(name, one_array(sections.column(name)).take(rows))
    for prefix, table in chosen.items():
        rows = image_of[prefix].take(kept)
        for name in ("dicom_id", "image_path", "view"):
            df = df.append_column(f"{prefix}_{name}", one_array(table.column(name)).take(rows))
    return df, study_id.take(pa.array(rejected, pa.int64())), reason[rejected].tolist()


def attach_priors(eligible: pa.Table) -> pa.Table:
    """Add ``last_study_id``: the latest eligible study of the patient strictly before this one.

    Studies with the same time share the prior of that time; a study without a time neither has nor is
    a prior (it cannot be ordered).
    """
    n = eligible.num_rows
    timed = np.flatnonzero(
        one_array(eligible.column("study_datetime")).is_valid().to_numpy(zero_copy_only=False)
    )
    subject = one_array(eligible.column("subject_id")).to_numpy()[timed]
    when = pc.cast(one_array(eligible.column("study_datetime")), pa.int64()).to_numpy(zero_copy_only=False)[
        timed
    ]
    study = one_array(eligible.column("study_id")).to_numpy()[timed]
    split = pc.dictionary_encode(one_array(eligible.column("split"))).indices.to_numpy(zero_copy_only=False)[
        timed
    ]
    order = np.lexsort((study, when, subject))
    subject, when, study, split, timed = subject[order], when[order], study[order], split[order], timed[order]
    # one representative (the last study id) per (subject, time); its predecessor is the prior
    new_group = (
        np.r_[True, (subject[1:] != subject[:-1]) | (when[1:] != when[:-1])]
        if len(order)
        else np.zeros(0, bool)
    )
    group = np.cumsum(new_group) - 1
    last_of_group = (
        np.r_[np.flatnonzero(new_group)[1:] - 1, len(order) - 1] if len(order) else np.zeros(0, np.int64)
    )
    starts = np.flatnonzero(new_group)
    # the previous group, when it is the same patient's
    has_prev = np.zeros(len(starts), bool)
    has_prev[1:] = subject[starts[1:]] == subject[starts[:-1]]
    prev_rep = np.r_[-1, last_of_group[:-1]] if len(starts) else np.zeros(0, np.int64)
    row_prev = prev_rep[group]
    # priors never cross splits (the official split is patient-level; this guards other inputs)
    valid = has_prev[group] & (split[np.maximum(row_prev, 0)] == split)
    last = np.zeros(n, np.int64)
    last_valid = np.zeros(n, bool)
    last[timed[valid]] = study[row_prev[valid]]
    last_valid[timed[valid]] = True
    return eligible.append_column("last_study_id", pa.array(last, pa.int64(), mask=~last_valid))


def scenario_members(df: pa.Table) -> dict[str, np.ndarray]:
    """Boolean masks over ``df`` (eligible studies with priors attached)."""
    prior = df.column("last_study_id").is_valid().to_numpy(zero_copy_only=False)
    lateral = df.column("lateral_dicom_id").is_valid().to_numpy(zero_copy_only=False)
    return {"sn": np.ones(df.num_rows, bool), "sw": prior, "mn": lateral, "mw": prior & lateral}


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
