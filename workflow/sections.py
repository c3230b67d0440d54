"""Report sectioning with the semantics of MIT-LCP's ``section_parser`` (``create_section_files.py``).

Our own implementation of the behaviour specified in ``reference/sectioning_radialog.md`` §1, so that
``impression``, ``findings``, ``last_paragraph`` and ``comparison`` are identical to what MIT-LCP's
script produces, including its quirks:

* a header is ``"\\n "`` + upper-case letters/space/``()/,-`` + ``":"`` + ONE whitespace character, so
  ``"\\nFINDINGS:"`` (no leading space), ``"IMPRESSION 1:"`` and ``"Findings:"`` are not headers, and in
  ``"FINDINGS:\\n IMPRESSION: x"`` the whitespace after the colon eats the newline, so the IMPRESSION line
  is swallowed into the findings body;
* names are normalised by an exact alias table, then substring rules, then a "describes the whole
  study" regex (→ findings); ``NDICATION`` maps to impression (an upstream bug kept on purpose);
* empty impression/findings sections are dropped (title-like pseudo headers, duplicated headers);
* when neither impression nor findings remains, every paragraph after the first of the LAST section
  becomes ``last_paragraph`` and that section keeps only its first paragraph (also for header-less
  reports, whose only section is ``full report``).

MIT's parser resumes its header search after the first newline of each section body. Because every
header match starts with a newline, that skip can never jump over a match, so the parse is exactly the
sequence of non-overlapping matches (``finditer``); the "swallowing" comes from ``\\s`` consuming the
newline. The property tests of ``tests/test_sections.py`` pin this equivalence down.

Outputs of the rule:

* ``sections.parquet`` (``contract.SECTIONS``): one row per study whose report is not empty; each column
  is the stripped text of the LAST section with that canonical name, null when the report has no such
  section ('' when the header is there but its body is empty). The 54 studies MIT special-cases (see
  ``CUSTOM_SECTION_NAMES`` / ``CUSTOM_INDICES``) get the generic parse here: MIT only uses those rules for
  its CheXpert "conclusion" files and leaves the studies out of its sectioned CSV.
* ``mimic_cxr_sectioned.csv``: MIT's exact format (header ``study,impression,findings,last_paragraph,
  comparison``, ``s``-prefixed study, ``csv.writer`` defaults: minimal quoting, ``\\r\\n`` rows, internal
  newlines kept, empty field when absent), without the 54 special studies, in the order of
  ``studies.parquet`` (ingest sorts it; MIT's order within a patient depends on the file system, so
  compare the two as sets of rows). Like MIT, a study whose report is empty still gets a row (all
  fields empty) — it is rejected from ``sections.parquet`` only. With no studies at all the csv holds
  just the header (MIT writes no file then; a rule needs its output).
* ``rejects.parquet``: studies whose report is empty or only whitespace (``empty_report``), and
  repeated study ids after the first (``duplicate_study_id``). A report with none of impression /
  findings / last_paragraph / comparison is not rejected (its other sections are still useful); the
  log counts them.

Processing streams the studies table in chunks of row groups (bounded memory); with several chunks
and ``--workers 2`` the chunks are read and parsed on a process pool while the parent writes the
outputs in order (each worker hands its chunk back as files in a temporary folder, not through the
pool's pipe). Repeated study ids are found up front from the id column alone.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from workflow.cli import arrow_without_pandas, exit_leaving_objects, setup_logging
from workflow.cli import parser as cli_parser
from workflow.contract import SECTION_NAMES, SECTIONS
from workflow.tables import Rejects, TableWriter, atomic_output, summary

log = logging.getLogger(__name__)

STAGE = "sections"

# "\n" + one space + upper-case name + ":" + exactly one whitespace character (Python's Unicode \s).
HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
PARAGRAPH_BREAK = "\n \n"  # MIMIC blank lines hold a single space

# --- name normalisation (data: reference/sectioning_radialog.md §1.3) -----------------------------------
# (a) exact aliases, after lower-casing and stripping.
_ALIASES_BY_CANONICAL = {
    "preamble": ["preamble"],
    "impression": [
        "impression", "conclusion", "findings and impression", "findings/impression",
        "findings/ impression", "impresson", "imprression", "imoression", "impressoin", "imprssion",
        "impresion", "imperssion", "mpression", "impession",
        "ndication",  # upstream bug (a typo of "indication"); kept because MIT's output depends on it
    ],
    "findings": [
        "findings", "chest, two views", "finding", "findins", "findindgs", "findgings", "findngs",
        "findnings", "finidngs", "reference findings",
    ],
    "comparison": [
        "comparison", "comparisons", "reference exam", "comparison exam", "comparison film",
        "comparision", "comparsion", "comparrison", "comparisions",
    ],
    "indication": [
        "indication", "reason for examination", "reason for exam", "clinical indication", "idication",
    ],
    "examination": ["examination", "exam", "type of examination"],
    "technique": ["technique"],
    "history": ["history", "clinical history", "clinical information", "patient history", "pfi"],
    "notification": ["notification"],
    "recommendations": ["recommendation(s)", "recommendations", "recommendation"],
    "addendum": ["addendum"],
    "date": ["date"],
    "comment": ["comment"],
    "wet read": ["wet read", "wetread"],
}  # fmt: skip
SECTION_ALIASES = {alias: canon for canon, aliases in _ALIASES_BY_CANONICAL.items() for alias in aliases}
# (b) the first of these contained in the name wins.
SUBSTRING_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# (c) a name that describes the whole study ("portable chest", "pa and lateral") is findings.
WHOLE_STUDY = re.compile(
    "chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views"
    "|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright"
    "|frontal semi-upright|ribs|pa and lat"
)

# --- studies MIT special-cases (data: §1.4); they are absent from MIT's sectioned CSV ------------------
# Conclusion taken from the last section with this canonical name.
CUSTOM_SECTION_NAMES = {
    50913680: "recommendations", 59768032: "recommendations", 59067458: "recommendations",
    59087630: "recommendations", 58157373: "recommendations", 56482935: "recommendations",
    58375018: "recommendations",
    59363654: "examination", 53356173: "examination", 50743547: "examination", 59215320: "examination",
    55157853: "examination",
    59279892: "technique", 53202765: "technique", 50808053: "technique",
    57936451: "indication", 50058765: "indication", 51966317: "indication", 55124749: "indication",
    54365831: "indication", 54654948: "indication",
    56451190: "note",
    51491012: "history",
}  # fmt: skip
# Conclusion is the raw character slice [start, end) of the report; (0, 0): no findings in the report.
CUSTOM_INDICES = {
    50525523: (201, 349), 57564132: (233, 554), 59982525: (313, 717), 53488209: (149, 475),
    54875119: (234, 988), 50196495: (59, 399), 56579911: (59, 218), 52648681: (292, 631),
    59889364: (172, 453), 53514462: (73, 377), 59505494: (59, 450), 53182247: (59, 412),
    51410602: (47, 320), 56412866: (522, 822), 54986978: (59, 306), 59003148: (262, 505),
    57150433: (61, 394), 56760320: (219, 457), 59562049: (158, 348), 52674888: (145, 296),
    55258338: (192, 568), 59330497: (140, 655), 52119491: (179, 454),
    58235663: (0, 0), 50798377: (0, 0), 54168089: (0, 0), 53071062: (0, 0), 56724958: (0, 0),
    54231141: (0, 0), 53607029: (0, 0), 52035334: (0, 0),
}  # fmt: skip
SPECIAL_STUDIES = frozenset(CUSTOM_SECTION_NAMES) | frozenset(CUSTOM_INDICES)


@functools.cache
def _special_array() -> pa.Array:
    # built on first use, not at import: converting a Python list imports pandas in pyarrow unless the job's
    # __main__ has called arrow_without_pandas first (0.3 s CPU of a job on the DAG's critical path)
    return pa.array(sorted(SPECIAL_STUDIES), type=pa.int64())


CONCLUSION_ORDER = ("impression", "findings", "last_paragraph", "comparison")
MIT_CSV_HEADER = ("study",) + CONCLUSION_ORDER

_DROPPED_WHEN_EMPTY = frozenset(("impression", "findings"))
_split_headers = HEADER.split
_NAME_CACHE: dict[str, str] = {}
_NAME_CACHE_MAX = 100_000


def normalize_section_name(name: str) -> str:
    """Canonical section name of a header as MIT-LCP normalises it (aliases, substrings, whole-study)."""
    cached = _NAME_CACHE.get(name)
    if cached is not None:
        return cached
    key = name.lower().strip()
    canonical = SECTION_ALIASES.get(key)
    if canonical is None:
        canonical = next((main for main in SUBSTRING_SECTIONS if main in key), None)
    if canonical is None:
        canonical = "findings" if WHOLE_STUDY.search(key) else key
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[name] = canonical
    return canonical


def section_text(text: str) -> tuple[list[str], list[str], list[int]]:
    """Split a report into ``(sections, names, start offsets)`` exactly like MIT's ``section_text``.

    Section texts are unstripped slices of ``text`` (the last section may be cut at its first paragraph
    break when ``last_paragraph`` is split off). The offset of ``last_paragraph`` is where its text
    really starts (MIT-LCP/mimic-code's later fix; the original is 3 characters short, and unused).
    """
    matches = list(HEADER.finditer(text))
    if not matches:
        sections, names, starts = [text], ["full report"], [0]
    else:
        sections, names, starts = [text[: matches[0].start(1)]], ["preamble"], [0]
        for match, following in zip(matches, [*matches[1:], None], strict=True):
            start = match.end()
            end = following.start() if following is not None else len(text)
            sections.append(text[start:end])
            names.append(normalize_section_name(match.group(1)))
            starts.append(start)

    # Empty impression/findings are title-like pseudo headers or the empty twin of a duplicated header.
    keep = [
        i for i, name in enumerate(names) if name not in ("impression", "findings") or sections[i].strip()
    ]
    if len(keep) != len(names):
        sections = [sections[i] for i in keep]
        names = [names[i] for i in keep]
        starts = [starts[i] for i in keep]

    if "impression" not in names and "findings" not in names:
        first, sep, rest = sections[-1].partition(PARAGRAPH_BREAK)
        if sep:
            sections[-1] = first
            sections.append(rest)
            names.append("last_paragraph")
            starts.append(starts[-1] + len(first) + len(sep))
    return sections, names, starts


def _universal_newlines(text: str) -> str:
    """The text as Python's text mode reads it (MIT opens report files with ``open(path, 'r')``)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def split_report(text: str) -> dict[str, str | None]:
    """Canonical section name → stripped text of the LAST section with that name.

    Every name of ``contract.SECTION_NAMES`` is a key (None when the report has no such section); other
    canonical names present in the report (``examination``, ``notification``, ``preamble``,
    ``full report``, ``wet read``, unmapped ones such as ``provider``) are keys too.
    """
    result: dict[str, str | None] = dict.fromkeys(SECTION_NAMES)
    result.update(split_report_fast(_universal_newlines(text)))
    return result


def conclusion(study_id: int, text: str) -> str:
    """The text MIT labels with CheXpert/NegBio: the special-study rules, then impression > findings >
    last_paragraph > comparison > ''. Where MIT would crash (a special study lacking its named
    section) this falls back to the generic priority."""
    text = _universal_newlines(text)
    if study_id in CUSTOM_INDICES:
        start, end = CUSTOM_INDICES[study_id]
        return text[start:end]
    sections = split_report(text)
    special = CUSTOM_SECTION_NAMES.get(study_id)
    if special is not None and sections.get(special) is not None:
        return sections[special]
    return next((sections[name] for name in CONCLUSION_ORDER if sections[name] is not None), "")


# --- the rule: studies.parquet → sections.parquet + MIT csv + rejects -----------------------------------


@dataclass
class BatchResult:
    sections: pa.Table | None  # contract.SECTIONS rows of the accepted studies (None: left in a file)
    csv_rows: pa.Buffer | None  # MIT csv rows of the batch (UTF-8, no header)
    empty_ids: list[int]  # studies whose report is empty or whitespace
    no_conclusion: int  # accepted studies with none of impression/findings/last_paragraph/comparison


def _csv_field(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """QUOTE_MINIMAL as Python's csv.writer does it (delimiter, quote char, CR or LF → quoted); null → ''."""
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(column, '"', '""'), '"', "")
    return pc.fill_null(pc.if_else(pc.match_substring_regex(column, r'[,"\r\n]'), quoted, column), "")


def mit_csv_rows(study_ids: pa.ChunkedArray | pa.Array, sections: pa.Table) -> pa.Buffer:
    """The rows of ``mimic_cxr_sectioned.csv`` (``s``-prefixed study, then CONCLUSION_ORDER columns),
    byte-identical to what ``csv.writer`` writes, built column-wise (the csv module costs more per row
    than the parse)."""
    if len(study_ids) == 0:
        return pa.py_buffer(b"")
    study = pc.binary_join_element_wise("s", pc.cast(study_ids, pa.string()), "")
    rows = pc.binary_join_element_wise(study, *(_csv_field(sections[name]) for name in CONCLUSION_ORDER), ",")
    lines = pc.binary_join_element_wise(rows, "", "\r\n")  # row + terminator + ''
    lines = pa.concat_arrays(lines.chunks) if isinstance(lines, pa.ChunkedArray) else lines
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    first, last = int(bounds[0]), int(bounds[-1])
    return data.slice(first, last - first)


def section_batch(subject_ids: list[int], study_ids: list[int], reports: list[str | None]) -> BatchResult:
    """Section one batch of studies (pure: no I/O). Column-wise comprehensions: this is the hot loop."""
    texts = [_universal_newlines(report) if report else "" for report in reports]
    parsed = [split_report_fast(text) if text and not text.isspace() else None for text in texts]
    rows = [sections or {} for sections in parsed]
    columns = {"subject_id": subject_ids, "study_id": study_ids}
    columns.update((name, [sections.get(name) for sections in rows]) for name in SECTION_NAMES)
    table = pa.Table.from_pydict(columns, schema=SECTIONS)
    # Like MIT, an empty report still gets a csv row (all fields empty); only the special studies have none.
    regular = pc.invert(pc.is_in(table["study_id"], value_set=_special_array()))
    csv_table = table.filter(regular)
    csv_rows = mit_csv_rows(csv_table["study_id"], csv_table)
    empty_ids = [study_id for study_id, sections in zip(study_ids, parsed, strict=True) if sections is None]
    if empty_ids:
        table = table.filter(pa.array([sections is not None for sections in parsed]))
    no_conclusion = sum(1 for sections in rows if sections and sections.keys().isdisjoint(CONCLUSION_ORDER))
    return BatchResult(table, csv_rows, empty_ids, no_conclusion)


def split_report_fast(text: str) -> dict[str, str]:
    """``split_report`` of text with universal newlines, without the None-filled keys: only the names
    present. The hot loop of the rule: the same parse as ``section_text`` without offsets or lists.

    ``HEADER.split`` gives [text before the first header, name, body, name, body, ...] as strings, with
    no match object per header (a third of the rule's CPU went into them). Each body is the text
    between one header's end and the next header's start, as in ``section_text``; the preamble gets
    back the ``"\\n "`` its header match starts with, because ``section_text`` ends it at the name.
    """
    parts = _split_headers(text)
    if len(parts) == 1:
        kept = [("full report", text)]
    else:
        kept = [("preamble", parts[0] + "\n ")]
        for raw, body in zip(parts[1::2], parts[2::2], strict=True):
            name = _NAME_CACHE.get(raw) or normalize_section_name(raw)
            if (body and not body.isspace()) or name not in _DROPPED_WHEN_EMPTY:
                kept.append((name, body))
    result = {name: body.strip() for name, body in kept}
    if "impression" not in result and "findings" not in result:
        last_name, last_body = kept[-1]
        first_paragraph, sep, rest = last_body.partition(PARAGRAPH_BREAK)
        if sep:
            result[last_name] = first_paragraph.strip()
            result["last_paragraph"] = rest.strip()
    return result


@dataclass(frozen=True)
class Chunk:
    """Consecutive row groups of studies.parquet sectioned as one unit (read by whichever process
    sections it, so the parent never decodes or ships report text), and the positions within the
    chunk of repeated study ids to leave out."""

    path: str
    row_groups: tuple[int, ...]
    n_rows: int
    drop: tuple[int, ...] = ()


def plan_chunks(studies: str | os.PathLike, batch_size: int, rejects: Rejects) -> list[Chunk]:
    """Group row groups into chunks of about ``batch_size`` rows (a bigger row group is one chunk: the
    writer's row groups bound the memory) and reject repeated study ids — the first occurrence wins."""
    source = pq.ParquetFile(studies)
    study_ids = source.read(columns=["study_id"]).column("study_id").to_numpy()
    _, first = np.unique(study_ids, return_index=True)
    repeated = np.setdiff1d(np.arange(len(study_ids)), first) if len(first) != len(study_ids) else []
    for position in repeated:
        rejects.add(int(study_ids[position]), "duplicate_study_id", "study id already sectioned")
    chunks: list[Chunk] = []
    groups: list[int] = []
    chunk_start = rows = 0
    for group in range(source.metadata.num_row_groups):
        groups.append(group)
        rows += source.metadata.row_group(group).num_rows
        if rows >= batch_size or group == source.metadata.num_row_groups - 1:
            drop = tuple(int(p) - chunk_start for p in repeated if chunk_start <= p < chunk_start + rows)
            chunks.append(Chunk(str(studies), tuple(groups), rows, drop))
            chunk_start += rows
            groups, rows = [], 0
    return chunks


def section_chunk(chunk: Chunk) -> BatchResult:
    table = pq.ParquetFile(chunk.path).read_row_groups(
        list(chunk.row_groups), columns=["subject_id", "study_id", "report"]
    )
    if chunk.drop:
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(chunk.drop)] = False
        table = table.filter(pa.array(keep))
    return section_batch(
        table.column("subject_id").to_pylist(),
        table.column("study_id").to_pylist(),
        table.column("report").to_pylist(),
    )


def _section_chunk_to_files(chunk: Chunk, folder: str) -> BatchResult:
    """``section_chunk`` in a worker: the sections table and csv rows are handed back as files (an Arrow
    IPC file the parent memory-maps, and the raw csv bytes) instead of being pickled through the pool's
    pipe, which copied ~170 MB five times over for 227k studies (0.4 s CPU)."""
    result = section_chunk(chunk)
    stem = os.path.join(folder, f"chunk{chunk.row_groups[0]}")
    with pa.OSFile(stem + ".arrow", "wb") as sink, pa.ipc.new_file(sink, result.sections.schema) as writer:
        writer.write_table(result.sections)
    with open(stem + ".csv", "wb") as fh:
        fh.write(result.csv_rows)
    return BatchResult(None, None, result.empty_ids, result.no_conclusion)


def _load_chunk_files(chunk: Chunk, folder: str, result: BatchResult) -> BatchResult:
    """The result ``_section_chunk_to_files`` left in ``folder`` (files removed; the map stays valid)."""
    stem = os.path.join(folder, f"chunk{chunk.row_groups[0]}")
    with pa.memory_map(stem + ".arrow") as source:
        sections = pa.ipc.open_file(source).read_all()
    csv_rows = pa.memory_map(stem + ".csv").read_buffer()
    os.remove(stem + ".arrow")
    os.remove(stem + ".csv")
    return BatchResult(sections, csv_rows, result.empty_ids, result.no_conclusion)


def _results(chunks: list[Chunk], workers: int) -> Iterator[tuple[Chunk, BatchResult]]:
    """Section results in input order; with ``workers > 1`` chunks are read and parsed on a process
    pool with a bounded number in flight (memory stays a few chunks) while the caller writes."""
    if workers <= 1:
        for chunk in chunks:
            yield chunk, section_chunk(chunk)
        return
    with tempfile.TemporaryDirectory(prefix="sections-") as folder, ProcessPoolExecutor(workers) as pool:
        pending = []
        for chunk in chunks:
            pending.append((chunk, pool.submit(_section_chunk_to_files, chunk, folder)))
            if len(pending) > workers:
                done, future = pending.pop(0)
                yield done, _load_chunk_files(done, folder, future.result())
        for done, future in pending:
            yield done, _load_chunk_files(done, folder, future.result())


def run(
    studies: str | os.PathLike,
    sections_path: str | os.PathLike,
    mit_csv_path: str | os.PathLike,
    rejects_path: str | os.PathLike,
    *,
    batch_size: int = 8_192,
    workers: int = 1,
) -> str:
    """Section every study of ``studies`` (contract.STUDIES); returns the one-line summary."""
    rejects = Rejects(STAGE)
    chunks = plan_chunks(studies, batch_size, rejects)
    n_rows = sum(chunk.n_rows for chunk in chunks)
    workers = min(workers, len(chunks))  # a pool only pays off with several chunks
    n_in = n_no_conclusion = 0
    with (
        TableWriter(sections_path, SECTIONS) as sections_out,
        atomic_output(mit_csv_path) as csv_out,
        tqdm(total=n_rows, unit="study", desc=STAGE, disable=None) as progress,
    ):
        csv_out.write((",".join(MIT_CSV_HEADER) + "\r\n").encode())
        for chunk, result in _results(chunks, workers):
            n_in += chunk.n_rows
            for study_id in result.empty_ids:
                rejects.add(study_id, "empty_report", "report text is empty or whitespace")
            sections_out.write(result.sections)
            csv_out.write(result.csv_rows)
            n_no_conclusion += result.no_conclusion
            progress.update(chunk.n_rows)
    rejects.write(rejects_path)
    if n_no_conclusion:
        log.info("%d studies have none of impression/findings/last_paragraph/comparison", n_no_conclusion)
    return summary(STAGE, n_in, sections_out.rows, len(rejects))


def main(argv: list[str] | None = None) -> None:
    p = cli_parser("Section reports with MIT-LCP section_parser semantics (sections table + MIT csv).")
    p.add_argument("--studies", required=True, type=Path, help="studies.parquet (contract.STUDIES)")
    p.add_argument("--sections", required=True, type=Path, help="output sections.parquet")
    p.add_argument("--mit-csv", required=True, type=Path, help="output mimic_cxr_sectioned.csv (MIT format)")
    p.add_argument("--rejects", required=True, type=Path, help="output rejects.parquet")
    p.add_argument(
        "--batch-size", type=int, default=8_192, help="studies per chunk of row groups (memory bound)"
    )
    p.add_argument("--workers", type=int, default=1, help="reader/parser processes (1: in process)")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not args.studies.exists():
        p.error(f"--studies: {args.studies} does not exist")
    run(
        args.studies,
        args.sections,
        args.mit_csv,
        args.rejects,
        batch_size=args.batch_size,
        workers=args.workers,
    )


if __name__ == "__main__":
    arrow_without_pandas()
    main()
    exit_leaving_objects()
