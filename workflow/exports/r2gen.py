"""R2GenGPT / MeGPT ``annotation.json`` (the R2Gen format; reference/mimic_rg4.md §5.1).

``{"train": [...], "val": [...], "test": [...]}``; every item has ``id``, ``report``, ``image_path`` (a
list, relative to the loader's ``--base_dir``) and ``split``:

* MIMIC-CXR: one item per image of every study with a findings section; ``id`` = dicom_id, plus
  ``study_id`` / ``subject_id``; paths relative to ``files/`` (``p10/p10000032/s5.../<dicom>.jpg``).
* IU X-Ray: one item per study with findings and at least two images; the first ``iu_images`` images
  (frontal first, then by name) — R2Gen's IU items always hold two, and R2GenGPT averages image
  embeddings per batch, so every item must have the same count. ``id`` = ``CXR`` + the image file stem
  up to its series number (``1_IM-0001-4001.dcm.png`` → ``CXR1_IM-0001``), as in R2Gen.

``report`` = the findings section, and with ``sections="findings_impression"`` the impression appended
(items still need findings, so the item set is the same), whitespace-normalised. The default follows
each corpus's reference file (:data:`DEFAULT_SECTIONS`): R2GenGPT's own MIMIC annotation holds findings +
impression (its maintainers, R2GenGPT issue #7), R2Gen's IU X-Ray annotation the findings only; ``clean=True`` applies the R2Gen cleaner of
the dataset (the loaders clean again at read time; cleaning is idempotent enough for scoring but the
default leaves text as written).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from json.encoder import encode_basestring  # JSONEncoder(ensure_ascii=False).encode of a str
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from workflow.exports import DEFAULT_SECTIONS, SECTION_CHOICES
from workflow.exports.cleaners import CLEANERS
from workflow.rg4.scenarios import SPLIT_NAMES

SPLITS = ("train", "val", "test")


def report_sections(dataset: str, configured: str | None = None) -> str:
    """What the annotation's ``report`` holds: the configured choice, else the corpus default."""
    if configured is None:
        return DEFAULT_SECTIONS[dataset]
    if configured not in SECTION_CHOICES:
        raise ValueError(
            f"exports.report_sections: {configured!r} is not one of {', '.join(SECTION_CHOICES)}"
        )
    return configured


def _has_text(value) -> bool:
    """The section normalises to a non-empty text (``str.split`` and ``str.isspace`` agree on what
    whitespace is)."""
    return isinstance(value, str) and value != "" and not value.isspace()


def _report(findings: str, impression, which: str) -> str:
    """A study's report: its findings, with ``which="findings_impression"`` its impression appended,
    whitespace-normalised (the study has findings: :func:`_has_text`)."""
    text = " ".join(findings.split())
    if which == "findings_impression":
        rest = " ".join(impression.split()) if isinstance(impression, str) else ""
        text = (text + " " + rest).strip()
    return text


def report_texts(sections: pd.DataFrame, which: str) -> pd.Series:
    """study_id → report text ('' when the study has no findings)."""
    sec = sections.drop_duplicates("study_id").set_index("study_id")
    texts = zip(sec["findings"].tolist(), sec["impression"].tolist(), strict=True)
    return pd.Series(
        [_report(f, i, which) if _has_text(f) else "" for f, i in texts], index=sec.index, dtype=object
    )


def _finish(items: pd.DataFrame, dataset: str, clean: bool) -> dict[str, list[dict]]:
    if clean:
        items["report"] = items["report"].map(CLEANERS[dataset])
    out = {split: [] for split in SPLITS}
    for rec in items.to_dict("records"):
        out[rec["split"]].append(rec)
    return out


def _chunks(series: pd.Series, size: int = 65_536) -> Iterator[list]:
    """A column's values as Python objects, ``size`` at a time (never the whole column at once)."""
    for start in range(0, len(series), size):
        yield series.iloc[start : start + size].tolist()


def mimic_rows(studies: pd.DataFrame, images: pd.DataFrame, sections: pd.DataFrame) -> pd.DataFrame:
    """The MIMIC annotation's images in file order (split, subject, study, dicom): ``dicom_id``,
    ``study_id``, ``subject_id``, ``split`` and the positions of the image's row in ``images``
    (``img_row``) and of its study's row in ``sections`` (``sec_row``); the texts stay there until a
    chunk of items is made."""
    has_findings = [_has_text(v) for values in _chunks(sections["findings"]) for v in values]
    sec = sections[["study_id"]].assign(sec_row=np.arange(len(sections)), has_findings=has_findings)
    sec = sec.drop_duplicates("study_id")
    sec = sec.loc[sec["has_findings"], ["study_id", "sec_row"]]
    st = studies[["subject_id", "study_id", "split"]].drop_duplicates("study_id")
    st = st.assign(split=st["split"].map(SPLIT_NAMES))
    st = st[st["split"].notna()].merge(sec, on="study_id")
    img = images[["dicom_id", "study_id"]].assign(img_row=np.arange(len(images)))
    img = img.merge(st, on="study_id", how="inner")
    # Arrow's sort is stable, as ``sort_values(..., kind="stable")``, and orders strings by code point
    # like it; pandas factorises each string key first, which cost more than the rest of this function
    keys = ["split", "subject_id", "study_id", "dicom_id"]
    order = pc.sort_indices(
        pa.table({key: img[key] for key in keys}), sort_keys=[(key, "ascending") for key in keys]
    )
    return img.take(order.to_numpy())


class Columns(NamedTuple):
    """A chunk of the MIMIC annotation's items as columns; a study's images share its report string."""

    split: str
    dicom_ids: list[str]
    study_ids: list[int]
    subject_ids: list[int]
    reports: list[str]
    image_paths: list[str]


def mimic_columns(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    which: str = "findings",
    clean: bool = False,
    chunk: int = 20_000,
) -> Iterator[Columns]:
    """The MIMIC-CXR annotation's items ``chunk`` at a time, the splits in :data:`SPLITS` order: one item
    per image of every study with findings (:func:`item_dicts`, :func:`item_json`)."""
    rows = mimic_rows(studies, images, sections)
    for split in SPLITS:
        part = rows[rows["split"] == split]
        for start in range(0, len(part), chunk):
            piece = part.iloc[start : start + chunk]
            sec_rows = piece["sec_row"].to_numpy()
            texts = zip(
                sec_rows.tolist(),
                sections["findings"].take(sec_rows).tolist(),
                sections["impression"].take(sec_rows).tolist(),
                strict=True,
            )
            reports: dict[int, str] = {}  # sec_row -> report (a study's images are neighbours)
            for row, findings, impression in texts:
                if row not in reports:
                    report = _report(findings, impression, which)
                    reports[row] = CLEANERS["mimic"](report) if clean else report
            yield Columns(
                split,
                piece["dicom_id"].tolist(),
                piece["study_id"].astype("int64").tolist(),
                piece["subject_id"].astype("int64").tolist(),
                [reports[row] for row in sec_rows.tolist()],
                [
                    path[6:] if path.startswith("files/") else path
                    for path in images["image_path"].take(piece["img_row"].to_numpy()).tolist()
                ],
            )


def _rows(c: Columns):
    return zip(c.dicom_ids, c.study_ids, c.subject_ids, c.reports, c.image_paths, strict=True)


def item_dicts(c: Columns) -> list[dict]:
    """The items of a chunk."""
    return [
        {
            "id": dicom,
            "study_id": study,
            "subject_id": subject,
            "report": report,
            "image_path": [path],
            "split": c.split,
        }
        for dicom, study, subject, report, path in _rows(c)
    ]


def item_json(c: Columns) -> list[str]:
    """The JSON texts of :func:`item_dicts`: the characters ``json.dumps(item, ensure_ascii=False)``
    writes, made field by field without the dicts (a study's report encoded once for its images)."""
    encoded: dict[str, str] = {}  # report -> its JSON string
    for report in c.reports:
        if report not in encoded:
            encoded[report] = encode_basestring(report)
    tail = ', "split": ' + encode_basestring(c.split) + "}"
    return [
        f'{{"id": {encode_basestring(dicom)}, "study_id": {study}, "subject_id": {subject}, '
        f'"report": {encoded[report]}, "image_path": [{encode_basestring(path)}]{tail}'
        for dicom, study, subject, report, path in _rows(c)
    ]


def mimic_annotation(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    which: str = "findings",
    clean: bool = False,
) -> dict[str, list[dict]]:
    """The whole MIMIC-CXR annotation in memory, as dicts (the rule streams :func:`mimic_columns` as
    :func:`item_json` texts instead)."""
    out = {split: [] for split in SPLITS}
    for c in mimic_columns(studies, images, sections, which, clean):
        out[c.split].extend(item_dicts(c))
    return out


def write_annotation(chunks: Iterable[tuple[str, list[dict] | list[str]]], fh) -> dict[str, int]:
    """Write (split, items) chunks, splits in :data:`SPLITS` order, as ``annotation.json``: the characters
    of ``json.dumps({"train": [...], "val": [...], "test": [...]}, ensure_ascii=False)`` without the
    whole document in memory. Items are dicts or their JSON texts (:func:`item_json`). Returns
    the items per split."""
    encode = json.JSONEncoder(ensure_ascii=False).encode
    counts = dict.fromkeys(SPLITS, 0)
    opened = 0  # how many splits' keys are written

    def open_through(k: int) -> None:
        nonlocal opened
        while opened <= k:
            fh.write(("{" if opened == 0 else "], ") + encode(SPLITS[opened]) + ": [")
            opened += 1

    for split, items in chunks:
        k = SPLITS.index(split)
        if k < opened - 1:
            raise ValueError(f"annotation chunks out of split order: {split} after {SPLITS[opened - 1]}")
        open_through(k)
        if items:
            text = ", ".join(items) if isinstance(items[0], str) else encode(items)[1:-1]
            fh.write((", " if counts[split] else "") + text)
            counts[split] += len(items)
    open_through(len(SPLITS) - 1)
    fh.write("]}")
    return counts


_IU_STEM = re.compile(r"^(\d+_IM-\d+)")


def iu_id(dicom_id: str) -> str:
    """``CXR`` + uid + ``_IM-`` + series (``21_IM-0729-1001-0001.dcm`` → ``CXR21_IM-0729``)."""
    stem = dicom_id.removesuffix(".dcm")
    m = _IU_STEM.match(stem)
    return "CXR" + (m.group(1) if m else stem.rsplit("-", 1)[0])


def iu_annotation(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    sections: pd.DataFrame,
    which: str = "findings",
    clean: bool = False,
    n_images: int = 2,
) -> dict[str, list[dict]]:
    reports = report_texts(sections, which)
    st = studies[["study_id", "split"]].drop_duplicates("study_id")
    st = st.assign(split=st["split"].map(SPLIT_NAMES), report=st["study_id"].map(reports).fillna(""))
    st = st[(st["report"] != "") & st["split"].notna()]
    img = images[["dicom_id", "study_id", "view_position", "image_path"]].merge(st, on="study_id")
    img["frontal_first"] = (img["view_position"].fillna("").str.upper().isin(["PA", "AP"])).map(
        {True: 0, False: 1}
    )
    img = img.sort_values(["study_id", "frontal_first", "image_path"], kind="stable")
    img = img[img.groupby("study_id").cumcount() < n_images]
    grouped = img.groupby("study_id", sort=True).agg(
        paths=("image_path", list),
        first=("dicom_id", "first"),
        split=("split", "first"),
        report=("report", "first"),
    )
    grouped = grouped[grouped["paths"].str.len() >= n_images]
    order = {s: i for i, s in enumerate(SPLITS)}
    grouped = grouped.assign(_o=grouped["split"].map(order)).sort_values(["_o"], kind="stable")
    items = pd.DataFrame(
        {
            "id": [iu_id(d) for d in grouped["first"]],
            "report": grouped["report"].to_numpy(),
            "image_path": grouped["paths"].to_list(),
            "split": grouped["split"].to_numpy(),
        }
    )
    return _finish(items, "iu", clean)
