"""The MIMIC-CXR-JPG split and metadata tables: image rows and one row of facts per study."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workflow.contract import SPLITS
from workflow.ingest.common import InputError, read_csv_arrow
from workflow.tables import Rejects

log = logging.getLogger(__name__)


def _drop_duplicate_keys(table: pa.Table, key: str, what: str) -> pa.Table:
    """Keep the first row of each ``key`` (and drop rows with a null key), logging how many went."""
    if table[key].null_count:  # filtering copies every column: only when there is a null to drop
        table = table.filter(pc.is_valid(table[key]))
    # Hashing the keys once (pc.unique) is 3x cheaper in CPU than sorting them to find neighbours.
    if len(pc.unique(table[key])) == table.num_rows:
        return table
    first = (
        table.append_column("_row", pa.array(np.arange(table.num_rows)))
        .group_by(key, use_threads=False)
        .aggregate([("_row", "min")])["_row_min"]
    )
    log.warning("%s: %d duplicate %s rows ignored", what, table.num_rows - len(first), key)
    # The kept row numbers in input order (not the order of those numbers: that took the first rows).
    return table.take(first.take(pc.sort_indices(first)))


def study_datetime(dates: pa.ChunkedArray, times: pa.ChunkedArray) -> pa.Array:
    """StudyDate ``YYYYMMDD`` + StudyTime ``HHMMSS.fff`` (a float: leading zeros lost) → timestamp[ms].

    An unreadable date gives null; a date with an unreadable time keeps midnight.
    """
    day = pc.strptime(pc.utf8_trim_whitespace(dates), format="%Y%m%d", unit="ms", error_is_null=True)
    text = pc.utf8_trim_whitespace(times)
    numeric = pc.fill_null(pc.match_substring_regex(text, r"^\d+(\.\d*)?$"), False)
    seconds = pc.cast(pc.if_else(numeric, text, None), pa.float64()).to_numpy(zero_copy_only=False)
    hours, minutes, secs = np.floor(seconds / 10000), np.floor(seconds / 100) % 100, seconds % 100
    with np.errstate(invalid="ignore"):
        valid = (hours < 24) & (minutes < 60) & (secs < 60)
    millis = np.where(valid, np.round((hours * 3600 + minutes * 60 + secs) * 1000), 0).astype(np.int64)
    day_ms = pc.cast(day, pa.int64()).to_numpy(zero_copy_only=False)
    stamps = pa.array(day_ms + millis, pa.int64(), mask=pc.is_null(day).to_numpy(zero_copy_only=False))
    return stamps.cast(pa.timestamp("ms"))


def read_mimic_tables(split_path, metadata_path, rejects: Rejects | None = None) -> tuple[pa.Table, pa.Table]:
    """(images, facts): the image rows of both tables, and one row per study_id of either table.

    Rows with ids that are not int64 integers go to ``rejects`` as ``bad_id``.

    ``facts``: study_id, subject_id (null when the tables disagree), split, n_splits, patient_splits (of
    the study's patient in the split table), study_datetime, in_split, in_metadata.

    An unknown split label stops the run (:class:`InputError` naming the file and the labels).
    """
    split = read_csv_arrow(
        split_path,
        ("dicom_id", "study_id", "subject_id", "split"),
        ids=("study_id", "subject_id"),
        key="corpus.mimic.split",
        rejects=rejects,
    )
    meta = read_csv_arrow(
        metadata_path,
        ("dicom_id", "subject_id", "study_id"),
        ("ViewPosition", "ViewCodeSequence_CodeMeaning", "StudyDate", "StudyTime"),
        ids=("study_id", "subject_id"),
        key="corpus.mimic.metadata",
        rejects=rejects,
    )
    labels = pc.unique(pc.fill_null(split["split"], "")).to_pylist()
    unknown = sorted(set(labels) - set(SPLITS))
    if unknown:
        counts = {label: 0 for label in unknown}
        for label in pc.fill_null(split["split"], "").to_pylist():
            if label in counts:
                counts[label] += 1
        found = ", ".join(f"{label!r} ({n} rows)" for label, n in counts.items())
        raise InputError(
            f"corpus.mimic.split ({split_path}): unknown split label(s) {found} in column 'split'; "
            f"expected only {', '.join(SPLITS)}"
        )
    split = _drop_duplicate_keys(split, "dicom_id", f"split table {split_path}")
    meta = _drop_duplicate_keys(meta, "dicom_id", f"metadata table {metadata_path}")
    meta = pa.table(
        {
            "dicom_id": meta["dicom_id"],
            "subject_id": meta["subject_id"],
            "study_id": meta["study_id"],
            "view_position": meta["ViewPosition"],
            "view_code_meaning": meta["ViewCodeSequence_CodeMeaning"],
            "study_datetime": study_datetime(meta["StudyDate"], meta["StudyTime"]),
        }
    )
    images = meta.drop_columns(["study_datetime"]).join(
        split.select(["dicom_id", "subject_id", "study_id"]).rename_columns(
            ["dicom_id", "subj_s", "study_s"]
        ),
        keys="dicom_id",
        join_type="full outer",
    )
    images = pa.table(
        {
            "dicom_id": images["dicom_id"],
            "subject_id": pc.coalesce(images["subject_id"], images["subj_s"]),
            "study_id": pc.coalesce(images["study_id"], images["study_s"]),
            "view_position": images["view_position"],
            "view_code_meaning": images["view_code_meaning"],
        }
    )
    ids = pa.concat_tables(
        [meta.select(["study_id", "subject_id"]), split.select(["study_id", "subject_id"])]
    )
    facts = ids.group_by("study_id").aggregate([("subject_id", "min"), ("subject_id", "count_distinct")])
    split_facts = split.group_by("study_id").aggregate([("split", "min"), ("split", "count_distinct")])
    split_facts = split_facts.append_column("in_split", pa.array(np.ones(split_facts.num_rows, bool)))
    meta_facts = meta.group_by("study_id").aggregate([("study_datetime", "min")])
    meta_facts = meta_facts.append_column("in_metadata", pa.array(np.ones(meta_facts.num_rows, bool)))
    facts = facts.join(split_facts, "study_id").join(meta_facts, "study_id")
    agreed = pc.equal(facts["subject_id_count_distinct"], 1)
    # Splits must be patient-disjoint: how many splits each patient's rows carry.
    patient_splits = split.group_by("subject_id").aggregate([("split", "count_distinct")])
    facts = facts.append_column("_subject", pc.if_else(agreed, facts["subject_id_min"], None)).join(
        patient_splits.rename_columns(["_subject", "patient_splits"]), "_subject", join_type="left outer"
    )
    agreed = pc.equal(facts["subject_id_count_distinct"], 1)  # again: the join reorders rows
    facts = pa.table(
        {
            "study_id": facts["study_id"],
            "subject_id_tables": pc.if_else(agreed, facts["subject_id_min"], None),
            "split": facts["split_min"],
            "n_splits": pc.fill_null(facts["split_count_distinct"], 0),
            "patient_splits": pc.fill_null(facts["patient_splits"], 0),
            "study_datetime": facts["study_datetime_min"],
            "in_split": pc.fill_null(facts["in_split"], False),
            "in_metadata": pc.fill_null(facts["in_metadata"], False),
        }
    )
    return images, facts
