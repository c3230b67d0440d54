"""What both corpus formats share: the stage name, the report size bound, int64 ids, input errors, the
result counts, and the CSV reader that turns unreadable ids into ``bad_id`` rejects."""

from __future__ import annotations

import csv
import gzip
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from workflow.tables import Rejects

log = logging.getLogger(__name__)

STAGE = "ingest"
# Far above any real report (MIMIC-CXR's longest is ~15 KB); a larger one is rejected as too_large
# before it is read in full, so a hostile file cannot exhaust memory or stall the extractors.
DEFAULT_MAX_REPORT_BYTES = 1 << 20


INT64_MAX = (1 << 63) - 1


def fits_int64(digits: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which all-digit strings (nulls: False) are ids that fit int64; Python looks only at 19+ digits."""
    lengths = pc.fill_null(pc.utf8_length(digits), 0).to_numpy(zero_copy_only=False)
    fits = lengths > 0
    long_ = np.flatnonzero(lengths >= 19)
    if len(long_):
        for i, value in zip(long_.tolist(), digits.take(pa.array(long_)).to_pylist(), strict=True):
            fits[i] = int(value) <= INT64_MAX
    return fits


class InputError(Exception):
    """A problem with the inputs as a whole (missing file, missing column): stops the run with a message."""


@dataclass
class Result:
    n_in: int
    n_out: int
    n_images: int
    rejects: Rejects

    @property
    def reasons(self) -> Counter:
        return Counter(self.rejects.rows["reason"])


def _csv_header(path: str | os.PathLike) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as fh:
            return next(csv.reader(fh), [])
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc


def read_csv_arrow(
    path: str | os.PathLike,
    required: Sequence[str],
    optional: Sequence[str] = (),
    ids: Sequence[str] = (),
    multiline: bool = False,
    key: str = "",
    rejects: Rejects | None = None,
) -> pa.Table:
    """The wanted columns of a .csv or .csv.gz (extra columns ignored; a missing optional one is null).

    ``key`` names the config key of the file in error messages.

    ``ids`` columns become int64; a row where one of them is not an integer that fits int64 is dropped
    and, with ``rejects``, recorded there as ``bad_id`` (one row per table row; its study_id when that one
    is readable). Every other column is read as text.
    """
    header = _csv_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        where = f"{key} ({path})" if key else str(path)
        raise InputError(f"{where}: missing column(s) {missing}; found {header}")
    wanted = [c for c in (*required, *optional) if c in header]

    def read(types):
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=multiline),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=types),
        )

    text_types = dict.fromkeys(wanted, pa.string())
    try:
        try:
            table = read({**text_types, **dict.fromkeys(ids, pa.int64())})
        except pa.ArrowInvalid:
            # Some id is not an integer (or not one that fits int64): read as text, keep the rows whose
            # ids all are, reject the others.
            table = read(text_types)
            good = np.ones(table.num_rows, dtype=bool)
            fits = {}
            for column in ids:
                text = pc.utf8_trim_whitespace(table[column])
                digits = pc.fill_null(pc.match_substring_regex(text, r"^\d+$"), False).to_numpy(
                    zero_copy_only=False
                )
                fits[column] = digits & fits_int64(pc.if_else(digits, text, None))
                table = table.set_column(table.schema.get_field_index(column), column, text)
                good &= fits[column]
            bad = np.flatnonzero(~good)
            log.warning("%s: %d rows with unreadable or out-of-range ids rejected (bad_id)", path, len(bad))
            if rejects is not None:
                name = Path(path).name
                for i in bad.tolist():
                    row_ids = {c: table[c][i].as_py() for c in ids}
                    wrong = ", ".join(f"{c} {str(row_ids[c])[:40]!r}" for c in ids if not fits[c][i])
                    study = int(row_ids["study_id"]) if "study_id" in fits and fits["study_id"][i] else None
                    rejects.add(study, "bad_id", f"{name}: row {i + 2}: {wrong} is not an int64 id")
            table = table.filter(pa.array(good))
            for column in ids:
                idx = table.schema.get_field_index(column)
                table = table.set_column(idx, column, pc.cast(table[column], pa.int64()))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot parse as CSV ({exc})") from exc
    for column in optional:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
    return table
