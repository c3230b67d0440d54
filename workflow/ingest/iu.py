"""IU X-Ray ingest: ``indiana_reports.csv`` + ``indiana_projections.csv`` -> studies, images, rejects."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from workflow.contract import IMAGES, STUDIES
from workflow.ingest.common import (
    DEFAULT_MAX_REPORT_BYTES,
    STAGE,
    InputError,
    Result,
    fits_int64,
    read_csv_arrow,
)
from workflow.tables import Rejects, write_table

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pandas is imported where IU needs it: it costs ~0.3 s of every MIMIC run's start
    import pandas as pd

IU_SPLIT_RATIOS = (0.7, 0.1, 0.2)
IU_BANNER = " " * 33 + "FINAL REPORT"
IU_VIEW_POSITION = {"frontal": "PA", "lateral": "LATERAL"}


def _to_id(series: pd.Series) -> pd.Series:
    """Integer ids as nullable Int64; anything that is not all digits, or beyond int64, becomes <NA>."""
    import pandas as pd

    text = series.astype("string").str.strip()
    digits = text.str.fullmatch(r"\d+", na=False).to_numpy(dtype=bool)
    usable = digits & fits_int64(pa.array(text.where(digits, None).astype(object), pa.string()))
    values = [int(v) if ok else None for v, ok in zip(text.to_numpy(dtype=object), usable, strict=True)]
    return pd.Series(pd.array(values, dtype="Int64"), index=series.index)


def iu_split(
    subject_ids: Sequence[int], seed: int = 0, ratios: Sequence[float] = IU_SPLIT_RATIOS
) -> list[str]:
    """Deterministic patient-level split: a seeded hash of each id mapped onto the train/validate/test ratios."""
    total = float(sum(ratios))
    edges = np.cumsum(ratios) / total
    names = ("train", "validate", "test")
    out = []
    for subject_id in subject_ids:
        digest = hashlib.sha256(f"iu-split:{seed}:{subject_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        out.append(names[int(np.searchsorted(edges, u, side="right"))])
    return out


def _clean(value) -> str:
    """One line of IU text: None/NaN → '', internal whitespace runs (incl. newlines) → one space."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def iu_report_text(examination: str, indication: str, comparison: str, findings: str, impression: str) -> str:
    """An IU report in MIMIC layout, so the MIT-compatible sectioner reads it like a MIMIC report."""
    lines = [IU_BANNER, " "]
    for header, value in (
        ("EXAMINATION", examination),
        ("INDICATION", indication),
        ("COMPARISON", comparison),
    ):
        if value:
            lines += [f" {header}:  {value}", " "]
    for header, value in (("FINDINGS", findings), ("IMPRESSION", impression)):
        if value:
            lines += [f" {header}: ", " ", f" {value}", " "]
    return "\n".join(lines[:-1]) + "\n"


def _dicom_id(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    for suffix in (".png", ".jpg", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def ingest_iu(
    reports: str | os.PathLike,
    projections: str | os.PathLike,
    studies_out: str | os.PathLike,
    images_out: str | os.PathLike,
    rejects_out: str | os.PathLike,
    split_seed: int = 0,
    split_ratios: Sequence[float] = IU_SPLIT_RATIOS,
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
) -> Result:
    import pandas as pd

    for key, value in (("reports", reports), ("projections", projections)):
        if not Path(value).exists():
            raise InputError(
                f"--{key} (config key corpus.iu.{key}) points to {str(value)!r}, which does not exist"
            )
    rejects = Rejects(STAGE)
    name = Path(reports).name
    frame = read_csv_arrow(
        reports,
        ("uid", "findings", "impression"),
        ("image", "indication", "comparison"),
        multiline=True,
        key="corpus.iu.reports",
    ).to_pandas()
    proj = read_csv_arrow(
        projections, ("uid", "filename", "projection"), multiline=True, key="corpus.iu.projections"
    ).to_pandas()
    n_in = len(frame)

    frame["study_id"] = _to_id(frame["uid"])
    for row in frame[frame["study_id"].isna()].itertuples():
        rejects.add(None, "bad_id", f"{name}: row {row.Index + 2}: uid is not an int64 integer")
    frame = frame[frame["study_id"].notna()]
    dup = frame.duplicated("study_id")
    for row in frame[dup].itertuples():
        rejects.add(
            int(row.study_id), "duplicate_study", f"{name}: row {row.Index + 2}: uid {row.study_id} repeated"
        )
    frame = frame[~dup]

    proj["study_id"] = _to_id(proj["uid"])
    bad_proj = proj["study_id"].isna() | proj["filename"].isna() | proj.duplicated("filename")
    if bad_proj.any():
        log.warning(
            "%s: %d projection rows without a readable uid/filename or repeated, ignored",
            Path(projections).name,
            int(bad_proj.sum()),
        )
    proj = proj[~bad_proj]
    has_images = frame["study_id"].isin(proj["study_id"])

    studies = {c: [] for c in STUDIES.names}
    for row in frame.itertuples():
        study_id = int(row.study_id)
        where = f"{name}#uid={row.uid.strip()}"
        findings, impression = _clean(row.findings), _clean(row.impression)
        if not (findings or impression):
            rejects.add(study_id, "empty_report", f"{where}: neither findings nor impression")
            continue
        if not has_images[row.Index]:
            rejects.add(study_id, "no_metadata", f"{where}: no rows in {Path(projections).name}")
            continue
        text = iu_report_text(
            _clean(row.image), _clean(row.indication), _clean(row.comparison), findings, impression
        )
        if len(text.encode()) > max_report_bytes:
            rejects.add(study_id, "too_large", f"{where}: more than {max_report_bytes} bytes")
            continue
        studies["subject_id"].append(study_id)
        studies["study_id"].append(study_id)
        studies["study_datetime"].append(None)
        studies["report"].append(text)
        studies["source_path"].append(where)
    studies["split"] = iu_split(studies["study_id"], split_seed, split_ratios)
    table = pa.Table.from_pydict(studies, schema=STUDIES).sort_by([("subject_id", "ascending")])
    write_table(table, studies_out, STUDIES)

    orphan = sorted(set(proj["study_id"].astype("int64")) - set(frame["study_id"].astype("int64")))
    for study_id in orphan:
        rejects.add(int(study_id), "no_report", f"uid in {Path(projections).name}, not in {name}")

    split_of = dict(zip(studies["study_id"], studies["split"], strict=True))
    proj = proj[proj["study_id"].isin(split_of)].copy()
    proj["study_id"] = proj["study_id"].astype("int64")
    proj["projection"] = proj["projection"].fillna("").str.strip()
    images = pd.DataFrame(
        {
            "dicom_id": proj["filename"].map(_dicom_id),
            "subject_id": proj["study_id"],
            "study_id": proj["study_id"],
            "split": proj["study_id"].map(split_of),
            "view_position": proj["projection"].str.lower().map(IU_VIEW_POSITION).fillna(""),
            "view_code_meaning": proj["projection"].str.lower(),
            "image_path": proj["filename"],
        }
    ).sort_values(["subject_id", "study_id", "dicom_id"], ignore_index=True)
    write_table(pa.Table.from_pandas(images, schema=IMAGES, preserve_index=False), images_out, IMAGES)
    rejects.write(rejects_out)
    return Result(n_in + len(orphan), table.num_rows, len(images), rejects)
