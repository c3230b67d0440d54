"""MIMIC-CXR ingest: report files joined with the split/metadata tables -> studies, images, rejects."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from workflow.contract import IMAGES, STUDIES
from workflow.ingest.batches import BatchResults, reader_pool
from workflow.ingest.common import DEFAULT_MAX_REPORT_BYTES, INT64_MAX, STAGE, InputError, Result
from workflow.ingest.mimic_tables import read_mimic_tables
from workflow.ingest.sources import MEMBER_RE, mit_candidate, open_source
from workflow.tables import Rejects, TableWriter, write_table

log = logging.getLogger(__name__)

BATCH_ROWS = 8192


def _catalog(source, rejects: Rejects) -> pa.Table:
    """Every report member as a row (subject_id, study_id, path, locator), sorted; bad names rejected."""
    names = pa.array(source.names, pa.string())
    parts = pc.extract_regex(names, MEMBER_RE)
    good = pc.is_valid(parts).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~good).tolist():
        name = source.names[i]
        if mit_candidate(name):  # looks like a report file but does not parse
            study = re.fullmatch(r"s(\d+)\.txt", name.rsplit("/", 1)[-1])
            study_id = int(study.group(1)) if study else None
            rejects.add(study_id if study_id is None or study_id <= INT64_MAX else None, "bad_filename", name)
    # Ids beyond int64 cannot be a MIMIC id (nor fit the contract): the file is rejected, the run goes on.
    for field in ("subject", "study"):
        long_ids = np.flatnonzero(
            good & (pc.utf8_length(pc.fill_null(parts.field(field), "")).to_numpy() >= 19)
        )
        for i in long_ids.tolist():
            if int(parts.field(field)[i].as_py()) > INT64_MAX:
                good[i] = False
                study_id = int(parts.field("study")[i].as_py())
                rejects.add(
                    study_id if study_id <= INT64_MAX else None,
                    "bad_id",
                    f"{source.names[i]}: {field} id beyond int64",
                )
    locator = np.flatnonzero(good)
    parts = parts.filter(pa.array(good))
    tail = pc.extract_regex(names.filter(pa.array(good)), r"(?P<tail>p\d\d/p\d+/s\d+\.txt)$").field("tail")
    catalog = pa.table(
        {
            "subject_id": pc.cast(parts.field("subject"), pa.int64()),
            "study_id": pc.cast(parts.field("study"), pa.int64()),
            "path": pc.binary_join_element_wise("files/", tail, ""),
            "locator": pa.array(locator, pa.int64()),
        }
    )
    return catalog.sort_by([("subject_id", "ascending"), ("study_id", "ascending"), ("locator", "ascending")])


def _resolve(catalog: pa.Table, facts: pa.Table, rejects: Rejects) -> tuple[pa.Table, np.ndarray]:
    """Apply the duplicate and join rules.

    Returns the catalog (same rows, same order) joined with each study's split and datetime, and the
    mask of the members to write; the others are in ``rejects``.
    """
    joined = (
        catalog.append_column("_order", pa.array(np.arange(catalog.num_rows)))
        .join(facts, "study_id", join_type="left outer")
        .sort_by("_order")
    )
    n = joined.num_rows
    study = joined["study_id"].to_numpy()
    subject = joined["subject_id"].to_numpy()
    tables_subject = pc.fill_null(joined["subject_id_tables"], -1).to_numpy()
    matches = subject == tables_subject
    in_split = pc.fill_null(joined["in_split"], False).to_numpy(zero_copy_only=False)
    in_meta = pc.fill_null(joined["in_metadata"], False).to_numpy(zero_copy_only=False)
    n_splits = pc.fill_null(joined["n_splits"], 0).to_numpy()
    patient_splits = pc.fill_null(joined["patient_splits"], 0).to_numpy()
    paths = joined["path"]

    keep = np.ones(n, dtype=bool)
    _, inverse, counts = np.unique(study, return_inverse=True, return_counts=True)
    copies = counts[inverse]
    if (copies > 1).any():
        keep[copies > 1] = False
        # Keep the first copy (in sorted order) whose patient matches the tables; reject the others.
        seen: set[int] = set()
        for i in np.flatnonzero(copies > 1).tolist():
            if matches[i] and study[i] not in seen:
                seen.add(int(study[i]))
                keep[i] = True
            else:
                rejects.add(
                    int(study[i]), "duplicate_study", f"{paths[i]}: study_id claimed {copies[i]} times"
                )
    missing = keep & ~(in_split & in_meta)
    mismatch = keep & ~missing & ~matches
    conflict = keep & ~missing & ~mismatch & ((n_splits > 1) | (patient_splits > 1))
    for i in np.flatnonzero(missing | mismatch | conflict).tolist():
        if missing[i]:
            absent = " and ".join(
                name for name, flag in (("split", in_split[i]), ("metadata", in_meta[i])) if not flag
            )
            rejects.add(int(study[i]), "no_metadata", f"{paths[i]}: study absent from the {absent} table")
        elif mismatch[i]:
            said = "disagree" if tables_subject[i] < 0 else f"say p{tables_subject[i]}"
            rejects.add(int(study[i]), "subject_mismatch", f"{paths[i]}: the split/metadata tables {said}")
        elif n_splits[i] > 1:
            rejects.add(int(study[i]), "split_conflict", f"{paths[i]}: images in {n_splits[i]} splits")
        else:
            rejects.add(
                int(study[i]),
                "split_conflict",
                f"{paths[i]}: patient p{subject[i]} has studies in {patient_splits[i]} splits",
            )
    return joined, keep & ~missing & ~mismatch & ~conflict


def _image_rows(images: pa.Table, studies: pa.Table) -> pa.Table:
    """The contract's images rows of ``studies`` (study_id, split): sorted, with their image_path."""
    images = images.join(studies, "study_id", join_type="inner").sort_by(
        [("subject_id", "ascending"), ("study_id", "ascending"), ("dicom_id", "ascending")]
    )
    subject = pc.cast(images["subject_id"], pa.string())
    image_path = pc.binary_join_element_wise(
        "files/p",
        pc.utf8_slice_codeunits(subject, 0, 2),
        "/p",
        subject,
        "/s",
        pc.cast(images["study_id"], pa.string()),
        "/",
        images["dicom_id"],
        ".jpg",
        "",
    )
    return images.append_column("image_path", image_path).select(IMAGES.names)


def ingest_mimic(
    reports: str | os.PathLike,
    split: str | os.PathLike,
    metadata: str | os.PathLike,
    studies_out: str | os.PathLike,
    images_out: str | os.PathLike,
    rejects_out: str | os.PathLike,
    workers: int = 1,
    batch_rows: int = BATCH_ROWS,
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
) -> Result:
    for key, value in (("reports", reports), ("split", split), ("metadata", metadata)):
        if not Path(value).exists():
            raise InputError(
                f"--{key} (config key corpus.mimic.{key}) points to {str(value)!r}, which does not exist"
            )
    rejects = Rejects(STAGE)
    source = open_source(reports)
    spec = source.spec()
    with reader_pool(spec, workers, max_report_bytes) as pool:
        catalog = _catalog(source, rejects)
        linked = []  # studies whose report file is a rejected link (not also "no_report")
        for name, why in getattr(source, "bad_links", ()):
            study = re.fullmatch(r"s(\d{1,18})\.txt", name.rsplit("/", 1)[-1])
            rejects.add(int(study.group(1)) if study else None, "bad_symlink", f"{name}: {why}")
            if study:
                linked.append(int(study.group(1)))
        n_bad_names = len(rejects)
        if catalog.num_rows + n_bad_names == 0:
            raise InputError(
                f"--reports (config key corpus.mimic.reports): no report files files/pXX/pSUBJECT/sSTUDY.txt in "
                f"{str(reports)!r} (the reports are in MIMIC-CXR's mimic-cxr-reports.zip, not in MIMIC-CXR-JPG)"
            )
        log.info("reports: %d report files in %s (%s)", catalog.num_rows + n_bad_names, reports, source.kind)
        source.names = (
            None  # the catalog has what is needed; 227k Python strings less for the rest of the run
        )
        pa.default_memory_pool().release_unused()
        # Every member is queued for reading now (sorted order); the ones the tables reject are dropped
        # after reading. This lets the workers inflate reports while the tables are being read.
        locators = catalog["locator"].to_numpy()
        jobs = [locators[start : start + batch_rows] for start in range(0, len(locators), batch_rows)]
        results = BatchResults(spec, jobs, pool, max_bytes=max_report_bytes)
        n_before_tables = len(rejects)
        images, facts = read_mimic_tables(split, metadata, rejects)
        n_bad_rows = len(rejects) - n_before_tables
        pa.default_memory_pool().release_unused()  # give the CSV/join scratch memory back before reading on
        log.info("tables: %d images of %d studies", images.num_rows, facts.num_rows)

        joined, accepted = _resolve(catalog, facts, rejects)
        # The image rows of every study the tables accept, joined, sorted and given their paths while the
        # workers are still inflating reports, rather than after the last batch with the cores idle;
        # only the studies whose report then fails to read (rare) are taken out at the end.
        images = _image_rows(images, joined.filter(pa.array(accepted)).select(["study_id", "split"]))
        unread = []  # accepted studies whose report file was rejected when read
        bar = tqdm(total=len(locators), unit="study", desc="ingest", mininterval=2, disable=None)
        with TableWriter(studies_out, STUDIES) as writer:
            start = 0
            for texts, ok, problems in results:
                n = len(ok)
                chunk = joined.slice(start, n)
                wanted = accepted[start : start + n]
                start += n
                for i, reason, detail in problems:
                    if wanted[i]:  # a member rejected by the tables keeps that first reason
                        unread.append(chunk["study_id"][i].as_py())
                        rejects.add(unread[-1], reason, f"{chunk['path'][i]}: {detail}")
                mask = pa.array(wanted & ok)
                chunk = chunk.filter(mask)
                writer.write(
                    pa.table(
                        {
                            "subject_id": chunk["subject_id"],
                            "study_id": chunk["study_id"],
                            "split": chunk["split"],
                            "study_datetime": chunk["study_datetime"],
                            "report": texts.filter(mask),
                            "source_path": chunk["path"],
                        }
                    )
                )
                bar.update(n)
            bar.close()
            n_out = writer.rows

        # Studies of the tables without any report file (rejected copies still count as having one).
        has_file = pa.concat_arrays([*catalog["study_id"].chunks, pa.array(linked, pa.int64())])
        no_report = facts.filter(pc.invert(pc.is_in(facts["study_id"], has_file)))["study_id"]
        for study_id in pc.sort_indices(no_report).to_numpy():
            rejects.add(
                no_report[int(study_id)].as_py(), "no_report", "in the split/metadata tables, no report file"
            )

        if unread:
            images = images.filter(pc.invert(pc.is_in(images["study_id"], pa.array(unread, pa.int64()))))
        write_table(images, images_out, IMAGES)
        rejects.write(rejects_out)
        # In: every report file found (parsable or not), every table study without one, and every table
        # row rejected for its ids.
        return Result(
            catalog.num_rows + n_bad_names + n_bad_rows + len(no_report), n_out, images.num_rows, rejects
        )
