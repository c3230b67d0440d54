"""The rg4 rule: studies + images + sections → MIMIC-RG4 scenario tables and the LLM-RG4 loader's JSON files.

Outputs (one flag per file, named as rules/rg4.smk names them; :func:`rule_args` builds the flags from
those names):

* ``rg4_{sn,sw,mn,mw}.parquet`` (``contract.RG4_RECORDS``) and the four JSON files the LLM-RG4 loader
  reads, ``{"train": [...], "val": [...], "test": [...]}`` with its field names and
  sentinels: ``finding``/``impression``/``last_*`` = ``"s"`` when missing, ``indication``/``history`` =
  integer ``0`` when absent, ``APPA_flag``, image paths relative to ``files/``; findings / impressions
  labelled ``finding: `` / ``impression: `` (``--label-sections``, the default, as released);
  ``new_scores`` = LLM-RG4's binary token weights with ``--scores-tokenizer`` (workflow/rg4/scores.py),
  ``[]`` without;
* ``build_notes.json``: one line per fact a user of the files must know (quoted in the dataset card);
* ``counts.parquet`` (scenario × split, ``contract.RG4_COUNTS``), ``rewrite_stats.parquet`` (share of
  sentences removed/rephrased per scenario × category, ``contract.RG4_REWRITE_STATS``), ``rejects.parquet``.

Every study ends in at least one scenario table or in rejects (reasons: not eligible,
``<scenario>:<check failure>`` for each scenario its target failed in, or ``<scenario>:not_in_<parents>``
where nesting removed it). The consistency checks (nesting by study: MW ⊆ SW ∩ MN, SW ⊆ SN, MN ⊆ SN; no
subject in two splits, unique ids, finding/impression not both missing) raise, failing the rule.

With ``rg4.shards`` the rule ``rg4_shard`` runs this with ``--shard K --shards N --shard-dir DIR``: the
patients with ``subject_id % N == K`` (priors, splits and nesting are per patient, so a shard is
self-contained), written as :class:`ShardPaths`; :mod:`workflow.rg4.merge` (the ``rg4`` rule) joins the
shards into the files above, in the order one job writes them. Without ``--shard-dir`` the stage writes its
outputs itself, through the same shard writer and merge.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workflow.cli import add_llm_task_args, setup_logging
from workflow.cli import parser as cli_parser
from workflow.contract import (
    LLM_REQUESTS,
    REJECTS,
    RG4_COUNTS,
    RG4_RECORDS,
    RG4_REWRITE_STATS,
    RG4_SCENARIOS,
    RG4_SPLITS,
)
from workflow.rg4.rewrite import (
    CATEGORIES,
    NO_COUNTS,
    RulesRewriter,
    check_edits,
    load_rules,
    raise_if_corrupt,
)
from workflow.rg4.scenarios import (
    PARENTS,
    WHITESPACE,
    attach_priors,
    eligible_studies,
    first_rows,
    nest,
    nesting_problems,
    one_array,
    relative_to_files,
    scenario_members,
)
from workflow.rg4.scores import (
    ScoresConfigError,
    TokenScorer,
    default_emphasis,
    load_tokenizer,
)
from workflow.tables import Rejects, read_table, write_json, write_table

if TYPE_CHECKING:
    import pandas as pd  # the tests' inputs; the stage reads Arrow tables (no pandas import)

log = logging.getLogger(__name__)

STAGE = "rg4"
MISSING_SECTION = "s"  # the loader's sentinel for an absent finding / impression
MISSING_CONTEXT = 0  # ... and for an absent indication / history


class ConsistencyError(RuntimeError):
    """A scenario table breaks an invariant of MIMIC-RG4; the rule must fail."""


# --- the rewriter interface -------------------------------------------------------------------------------


@dataclass(slots=True)  # half a million of each at MIMIC scale
class Job:
    """One target to rewrite: a study's (finding, impression) for one scenario."""

    study_id: int
    scenario: str
    finding: str | None
    impression: str | None
    removes: frozenset[str]


@dataclass(slots=True)
class Outcome:
    finding: str | None = None
    impression: str | None = None
    reason: str | None = None  # None: accepted; otherwise why the job is dropped
    request_hash: str | None = None
    sentences: int = 0
    removed: Counter = field(default_factory=Counter)
    rephrased: Counter = field(default_factory=Counter)


class RulesJobRunner:
    """Runs jobs through :class:`RulesRewriter` and :func:`check` (no retries: it is deterministic)."""

    name = "rules"
    parallel_min_jobs = 20_000  # below this the targets are assembled in-process

    def __init__(self, label_vector: Callable[[str], dict], workers: int = 1, learn_findings: bool = True):
        """``learn_findings``: the rewriter keeps which sentences name a finding (for the token weights)."""
        self.label_vector = _memo(label_vector)
        self.rewriter = RulesRewriter(label_vector=self.label_vector, learn_findings=learn_findings)
        self.workers = workers

    def run(self, jobs: list[Job]) -> list[Outcome]:
        try:
            return self._run(jobs)
        finally:  # hundreds of MB at MIMIC scale, of no use to the next run's texts
            self.rewriter.clear_caches()

    def _run(self, jobs: list[Job]) -> list[Outcome]:
        t0 = time.perf_counter()
        items = [(j.finding, j.removes) for j in jobs] + [(j.impression, j.removes) for j in jobs]
        self.rewriter.prepare(items, self.workers, self.label_vector)
        log.info("rg4 rules: sentences detected and edits made in %.1f s", time.perf_counter() - t0)
        if self.workers < 2 or len(jobs) < self.parallel_min_jobs:
            return self._run_range(jobs, 0, len(jobs))
        # the caches are warm: forked workers only assemble texts and check them (jobs are grouped by
        # study, so contiguous ranges keep a study's scenarios together); several ranges per worker, so
        # that no answer is a pickle of hundreds of MB in this process
        ranges = RUN_RANGES_PER_WORKER * self.workers
        bounds = [len(jobs) * k // ranges for k in range(ranges + 1)]
        _RUN.update(runner=self, jobs=jobs)
        try:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(self.workers) as pool:
                parts = pool.starmap(_run_part, list(zip(bounds[:-1], bounds[1:], strict=True)))
        finally:
            _RUN.clear()
        outcomes = []
        for index, start in enumerate(bounds[:-1]):
            part, parts[index] = parts[index], None  # each answer freed once read
            # plain tuples travel faster than objects; texts left as written come back as _SAME_MARK
            for k, (finding, impression, reason, n, removed, rephrased) in enumerate(part):
                job = jobs[start + k]
                outcomes.append(
                    Outcome(
                        job.finding if finding == _SAME_MARK else finding,
                        job.impression if impression == _SAME_MARK else impression,
                        reason,
                        None,
                        n,
                        removed or NO_COUNTS,
                        rephrased or NO_COUNTS,
                    )
                )
        return outcomes

    def _run_range(self, jobs: list[Job], start: int, end: int, mark_same: bool = False) -> list[Outcome]:
        from tqdm import tqdm  # here: the merge imports this module and has no progress to show

        rw, lv = self.rewriter, self.label_vector
        text = rw.text
        same = rw.labels_check(lv)  # (before, after): whether their labels agree
        outcomes = []
        # a study's scenarios often get the same edits of its texts (sn and mn remove the same categories
        # from most: the cached edits are the same objects); the outcome then is the previous one, unless
        # the categories removed matter (check_edits asks them only of a residue)
        last_f = last_i = last_removes = last = None
        for job in tqdm(
            jobs[start:end], desc="rg4 rewrite (rules)", unit="target", mininterval=5, disable=None
        ):
            f = text(job.finding, job.removes)
            i = text(job.impression, job.removes)
            if (
                f is last_f
                and i is last_i
                and (job.removes is last_removes or not (f.residual or i.residual))
            ):
                outcomes.append(last)
                continue
            if f.foreign or i.foreign:
                raise_if_corrupt((f, i), job.study_id, job.scenario)
            reason = check_edits((job.finding, job.impression), (f, i), job.removes, lv, same)
            # the edits' counters are shared (cached edits): added only when both count something
            removed = f.removed + i.removed if f.removed and i.removed else f.removed or i.removed
            rephrased = (
                f.rephrased + i.rephrased if f.rephrased and i.rephrased else f.rephrased or i.rephrased
            )
            if mark_same:  # for a worker's answer: a compact tuple
                finding = _SAME_MARK if f.text == job.finding and f.text is not None else f.text
                impression = _SAME_MARK if i.text == job.impression and i.text is not None else i.text
                outcomes.append(
                    (
                        finding,
                        impression,
                        reason,
                        f.sentences + i.sentences,
                        dict(removed) or None,
                        dict(rephrased) or None,
                    )
                )
            else:
                outcomes.append(
                    Outcome(f.text, i.text, reason, None, f.sentences + i.sentences, removed, rephrased)
                )
            last_f, last_i, last_removes, last = f, i, job.removes, outcomes[-1]
        return outcomes


_RUN: dict = {}  # what forked workers inherit (never pickled)
RUN_RANGES_PER_WORKER = 8
_SAME_MARK = "\x00same"  # a text no report contains: "unchanged" in transit from a worker


def _run_part(start: int, end: int) -> list[Outcome]:
    return _RUN["runner"]._run_range(_RUN["jobs"], start, end, mark_same=True)


def _memo(fn: Callable[[str], dict]) -> Callable[[str], dict]:
    seen: dict[str, dict] = {}

    def wrapped(text: str) -> dict:
        value = seen.get(text)
        if value is None:
            value = seen[text] = fn(text)
        return value

    return wrapped


def default_label_vector() -> Callable[[str], dict]:
    """The key-information extractor's report-level label vector (name → presence)."""
    from workflow.keyinfo.extract import label_vector

    return label_vector


# --- building the scenarios -------------------------------------------------------------------------------


def normalise_texts(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each text as a target holds it: ``rewrite.normalise_space`` (``" ".join(text.split())``); "" and
    missing: null. In Arrow (split at white space and joined) where it splits as ``str.split``: Arrow's
    ASCII white space is Python's but for the separators U+001C-U+001F, so the texts holding one of them or a
    non-ASCII character (a byte >= 0x80; it may be white space) are normalised in Python."""
    column = one_array(values)
    if not pa.types.is_string(column.type):  # (large_string: its buffers are laid out otherwise)
        return pa.array(
            [(" ".join(v.split()) or None) if v else None for v in column.to_pylist()], pa.string()
        )
    texts = pc.binary_join(pc.ascii_split_whitespace(pc.ascii_trim_whitespace(column)), " ")
    python = _rows_with_bytes(column, lambda data: (data >= 0x80) | ((data >= 0x1C) & (data <= 0x1F)))
    if python is not None:
        texts = pc.replace_with_mask(
            texts,
            python,
            pa.array([" ".join(v.split()) for v in pc.filter(column, python).to_pylist()], pa.string()),
        )
    return pc.if_else(pc.equal(texts, ""), pa.scalar(None, pa.string()), texts)


def stripped_texts(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each indication / history as the records hold it, ``str.strip()``, in Arrow ("" and missing: null)."""
    stripped = pc.utf8_trim(one_array(values), WHITESPACE)
    return pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)


def prepare(studies: pa.Table, images: pa.Table, sections: pa.Table):
    """(eligible studies with priors, their per-scenario masks, the rejected study ids, their reasons):
    the texts normalised, the image paths relative to ``files/`` and the prior's texts and image added."""
    eligible, rejected, reasons = eligible_studies(studies, images, sections)
    df = attach_priors(eligible)
    for col in ("findings", "impression"):
        df = df.set_column(df.schema.get_field_index(col), col, normalise_texts(df.column(col)))
    for col in ("frontal_image_path", "lateral_image_path"):
        df = df.set_column(df.schema.get_field_index(col), col, relative_to_files(one_array(df.column(col))))
    prior = pc.index_in(df.column("last_study_id"), value_set=one_array(df.column("study_id")))
    df = df.append_column("last_finding", one_array(df.column("findings")).take(prior))
    df = df.append_column("last_impression", one_array(df.column("impression")).take(prior))
    df = df.append_column("last_APPA_imagepath", one_array(df.column("frontal_image_path")).take(prior))
    return df, scenario_members(df), rejected, reasons


class Columns:
    """The eligible studies' columns as Arrow arrays by their name in ``contract.RG4_RECORDS`` (built once;
    taken by position per scenario), and the ids and texts the jobs are made of as lists."""

    def __init__(self, df: pa.Table):
        def column(name: str) -> pa.Array:
            return one_array(df.column(name))

        self.study_id = column("study_id").to_pylist()
        self.arrays = {
            "split": column("split"),
            "id": column("frontal_dicom_id"),
            "subject_id": column("subject_id"),
            "study_id": column("study_id"),
            "APPA_flag": column("frontal_view"),
            "APPA_imagepath": column("frontal_image_path"),
            "lateral_imagepath": column("lateral_image_path"),
            "last_study_id": column("last_study_id"),
            "last_finding": column("last_finding"),
            "last_impression": column("last_impression"),
            "last_APPA_imagepath": column("last_APPA_imagepath"),
            "indication": stripped_texts(column("indication")),
            "history": stripped_texts(column("history")),
            "original_finding": column("findings"),
            "original_impression": column("impression"),
        }
        self.findings = self.arrays["original_finding"].to_pylist()
        self.impression = self.arrays["original_impression"].to_pylist()


_NOT_IN = {  # the columns a scenario's records leave null (its inputs have no prior / no lateral image)
    "sn": ("lateral_imagepath", "last_study_id", "last_finding", "last_impression", "last_APPA_imagepath"),
    "sw": ("lateral_imagepath",),
    "mn": ("last_study_id", "last_finding", "last_impression", "last_APPA_imagepath"),
    "mw": (),
}


def _rewritten(cols: Columns, name: str, pos: list[int], rows: pa.Array, texts: list[str | None]) -> pa.Array:
    """The column ``name`` (finding / impression) of rewritten ``texts`` of the eligible rows ``pos``: the
    original column taken, and only the texts that differ from it converted (most are left as written)."""
    original = cols.findings if name == "finding" else cols.impression
    changed = [k for k, (p, text) in enumerate(zip(pos, texts, strict=True)) if text != original[p]]
    column = cols.arrays[f"original_{name}"].take(rows)
    if not changed:
        return column
    mask = np.zeros(len(pos), bool)
    mask[changed] = True
    return pc.replace_with_mask(column, pa.array(mask), pa.array([texts[k] for k in changed], pa.string()))


def scenario_table(
    cols: Columns, pos: list[int], scenario: str, outcomes: list[Outcome], rewriter: str
) -> pa.Table:
    rows = pa.array(pos, pa.int64())
    n = len(pos)
    arrays = []
    for f in RG4_RECORDS:
        if f.name in ("finding", "impression"):
            arrays.append(_rewritten(cols, f.name, pos, rows, list(map(attrgetter(f.name), outcomes))))
        elif f.name == "request_hash":
            arrays.append(pa.array(list(map(attrgetter(f.name), outcomes)), f.type))
        elif f.name == "rewriter":
            arrays.append(pa.array([rewriter] * n, f.type))
        elif f.name in _NOT_IN[scenario]:
            arrays.append(pa.nulls(n, f.type))
        else:
            arrays.append(cols.arrays[f.name].take(rows))
    return pa.Table.from_arrays(arrays, schema=RG4_RECORDS)


# The released MIMIC-RG4 targets carry section labels (reference/mimic_rg4.md §2.2, §4.3: LLM-RG4's
# outputs and references read "finding : ... impression : ..." after the R2Gen cleaner, and its DiscBERT
# test path builds 'finding: ' + f + 'impression: ' + i), so the JSON files carry them by default
# (config rg4.label_sections); the prior report (last_*) is written the same way.
SECTION_PREFIXES = ("finding: ", "impression: ")


_json_string = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) writes for a str
_JSON_ESCAPED = r'["\\\x00-\x1f]'  # the characters it escapes (in an RE2 class); others it writes as they are


def _rows_with_bytes(column: pa.Array, test) -> pa.Array | None:
    """Which values of a string array hold a byte of UTF-8 for which ``test`` (of a uint8 array of the data
    buffer) is true (None: none does), found in the data buffer at once."""
    if not len(column) or column.buffers()[2] is None:
        return None
    offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    at = np.flatnonzero(test(data)) + offsets[0]
    if not len(at):
        return None
    rows = np.zeros(len(column), bool)
    rows[np.searchsorted(offsets, at, side="right") - 1] = True  # the value whose bytes hold the byte
    found = pa.array(rows)
    return pc.and_(found, column.is_valid()) if column.null_count else found


def _to_escape(column: pa.Array) -> pa.Array | None:
    """Which values of a string array hold a character JSON escapes (None: none does), found in the bytes of
    its data buffer at once (in UTF-8 no byte of a multi-byte character is below 0x80): for short values a
    regex match per value costs far more."""
    if not pa.types.is_string(column.type):
        escaped = pc.match_substring_regex(column, _JSON_ESCAPED).fill_null(False)
        return escaped if pc.any(escaped).as_py() else None
    return _rows_with_bytes(column, lambda data: (data < 0x20) | (data == ord('"')) | (data == ord("\\")))


def _json_strings(
    column: pa.ChunkedArray | pa.Array, prefix: str = "", missing: str | None = None
) -> pa.Array:
    """The JSON text of each value of a string column, ``json.dumps(prefix + value, ensure_ascii=False)``,
    quoted in Arrow (only values with a character to escape are encoded in Python); ``missing`` for a
    null or "" (None: ``null`` for a null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    texts = pc.binary_join_element_wise(_json_string(prefix)[:-1], column, '"', "")  # null for a null
    escaped = _to_escape(column)
    if escaped is not None:
        values = pc.filter(column, escaped).to_pylist()
        texts = pc.replace_with_mask(
            texts, escaped, pa.array([_json_string(prefix + v) for v in values], pa.string())
        )
    if missing is None:
        return texts.fill_null("null")
    return pc.if_else(pc.equal(column, "").fill_null(True), missing, texts)


def _json_weights(values: np.ndarray) -> pa.Array:
    """``json.dumps(list(row))`` for each row of a uint8 matrix of weights, as Arrow strings: the digits
    written into a ``[0, 0, ...]`` template (binary weights: one digit each), no list of ints per record."""
    n, width = values.shape
    if not n or not width or values.max() > 9:
        return pa.array([json.dumps(row.tolist()) for row in values], pa.string())
    text = np.tile(np.frombuffer(("[" + ", ".join("0" * width) + "]").encode(), np.uint8), (n, 1))
    text[:, 1::3] = values + ord("0")
    offsets = np.arange(n + 1, dtype=np.int32) * text.shape[1]
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(text)])


def loader_lines(
    part: pa.Table,
    split_index: int,
    positions: np.ndarray,
    scenario: str,
    label_sections: bool,
    weights: np.ndarray | None,
) -> tuple[pa.ChunkedArray | pa.Array, int, int]:
    """Rows of a scenario table (all of one split) as :func:`write_loader_fragment` writes them: one line
    ``<split index>\\t<position>\\t<record>`` each, the record byte for byte as ``json.dumps(...,
    ensure_ascii=False)`` writes the dict of the loader's field names (in this order) and sentinels
    (findings / impressions with ``SECTION_PREFIXES`` when ``label_sections``, ``"s"`` when missing;
    indication / history integer 0 when absent; ``new_scores`` the rows' ``weights``, one row of a uint8
    matrix each, see :func:`score_targets`, otherwise ``[]``). Each field is encoded column by
    column and the lines joined in Arrow: no dict per record. Returns (the lines, a string
    column, see :func:`_write_utf8`; emphasised and total target positions of their weights)."""
    fp, ip = SECTION_PREFIXES if label_sections else ("", "")
    # the loader's sentinels: "s" for a missing finding / impression, integer 0 for an absent context
    section_missing, context_missing = _json_string(MISSING_SECTION), json.dumps(MISSING_CONTEXT)
    emphasised = total = 0
    if weights is None:
        new_scores = "[]"
    else:
        emphasised, total = int(weights.sum()), weights.size
        new_scores = _json_weights(weights)
    fields = {
        "id": _json_strings(part.column("id")),
        "study_id": pc.cast(part.column("study_id"), pa.string()),
        "subject_id": pc.cast(part.column("subject_id"), pa.string()),
        "finding": _json_strings(part.column("finding"), fp, section_missing),
        "impression": _json_strings(part.column("impression"), ip, section_missing),
        "APPA_flag": _json_strings(part.column("APPA_flag")),
        "APPA_imagepath": _json_strings(part.column("APPA_imagepath")),
        "indication": _json_strings(part.column("indication"), missing=context_missing),
        "history": _json_strings(part.column("history"), missing=context_missing),
        "new_scores": new_scores,
    }
    if scenario in ("mn", "mw"):
        fields["lateral_imagepath"] = _json_strings(part.column("lateral_imagepath"))
    if scenario in ("sw", "mw"):
        fields["last_finding"] = _json_strings(part.column("last_finding"), fp, section_missing)
        fields["last_impression"] = _json_strings(part.column("last_impression"), ip, section_missing)
        fields["last_APPA_imagepath"] = _json_strings(part.column("last_APPA_imagepath"))
    pieces = [f"{split_index}\t", pa.array(positions, pa.int64()).cast(pa.string()), "\t{"]
    for k, (name, values) in enumerate(fields.items()):
        pieces += [f"{', ' if k else ''}{_json_string(name)}: ", values]
    pieces.append("}\n")
    lines = pc.binary_join_element_wise(*pieces, "")
    return lines, emphasised, total


def _write_utf8(fh, values: pa.ChunkedArray | pa.Array) -> None:
    """Write a string column without nulls to the binary file ``fh`` as ``"".join(values.to_pylist())``
    encoded in UTF-8 (no Python string per value): each chunk's data buffer between its first and last
    offset."""
    if values.null_count:
        raise ValueError("a loader line is null")
    for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
        if len(chunk):
            offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
            offsets = np.frombuffer(chunk.buffers()[1], offset_type)
            first, last = offsets[chunk.offset], offsets[chunk.offset + len(chunk)]
            fh.write(memoryview(chunk.buffers()[2])[first:last])


# The columns of a scenario table that loader_lines reads
LOADER_COLUMNS = frozenset(
    {"id", "study_id", "subject_id", "finding", "impression", "APPA_flag", "APPA_imagepath", "indication"}
    | {"history", "lateral_imagepath", "last_finding", "last_impression", "last_APPA_imagepath"}
)
FRAGMENT_COMPRESSION = "zstd"  # of the loader lines a shard writes (ShardPaths.json)
JSON_CHUNK = 5_000  # records encoded at a time (their Arrow columns: 20,000 cost +100 MB peak RSS)


def write_loader_fragment(
    table: pa.Table,
    positions: list[int],
    path: Path,
    scenario: str,
    label_sections: bool = True,
    scores: TargetWeights | None = None,
) -> tuple[int, int]:
    """A scenario's records for the LLM-RG4 JSON file, one line each (:func:`loader_lines`), split by split
    (``RG4_SPLITS`` order), in table order within a split, zstd-compressed. The merge
    (:mod:`workflow.rg4.merge`) joins the shards' lines by (split, position) into the loader's ``{"train": [...], "val": [...], "test": [...]}``
    without parsing a record. Encoded a chunk of rows at a time (the whole scenario at once would cost
    gigabytes at MIMIC scale). Returns (emphasised, total) target positions of the weights."""
    from workflow.tables import atomic_output

    split = table.column("split")
    # only the columns the records are made of are taken chunk by chunk (not the audit's original texts)
    table = table.select([name for name in table.column_names if name in LOADER_COLUMNS])
    position = np.asarray(positions, dtype=np.int64)
    targets = None if scores is None else scores.rows[scenario]
    emphasised = total = 0
    # zstd: the lines are read once, by the merge, and are as large as the loader's JSON files (445 MB for
    # the two shards at 227k studies, 71 MB compressed); on a VM, each megabyte written to new page cache
    # cost up to 10 ms of system time, compressing it about 2 ms of user time
    with atomic_output(path) as out, pa.CompressedOutputStream(out, FRAGMENT_COMPRESSION) as fh:
        for index, name in enumerate(RG4_SPLITS):
            rows = np.flatnonzero(pc.equal(split, name).fill_null(False).to_numpy(zero_copy_only=False))
            for start in range(0, len(rows), JSON_CHUNK):
                chunk = rows[start : start + JSON_CHUNK]
                part = table.take(pa.array(chunk, pa.int64()))
                weights = None if scores is None else scores.values[targets[chunk]]
                lines, n_emphasised, n_total = loader_lines(
                    part, index, position[chunk], scenario, label_sections, weights
                )
                _write_utf8(fh, lines)
                emphasised += n_emphasised
                total += n_total
    return emphasised, total


class _Codes(dict):
    """value -> its code; a new value gets the next code."""

    def __missing__(self, value) -> int:
        k = self[value] = len(self)
        return k


@dataclass
class TargetWeights:
    """The token weights of every distinct (finding, impression) target of the scenario tables, and which
    target each of their rows has (see :func:`score_targets`)."""

    targets: list[tuple[str | None, str | None]]  # as the loader reads them (see distinct_targets)
    values: np.ndarray  # uint8, a row of max_length weights per target
    rows: dict[str, np.ndarray]  # scenario -> the index of each row's target in ``targets``

    def by_target(self) -> dict[tuple, bytes]:
        return {target: values.tobytes() for target, values in zip(self.targets, self.values, strict=True)}


def score_targets(
    tables: dict[str, pa.Table], label_sections: bool, scorer: TokenScorer, workers: int = 1
) -> TargetWeights:
    """The weights of every distinct (finding, impression) target of all scenarios (sn and mn, sw and mw
    mostly share targets), scored once, by the target as the loader reads it (see
    :func:`distinct_targets`); one byte per position (a list of 100 ints costs 850 bytes: at MIMIC scale
    that is the difference of half a gigabyte). On ``workers`` forked processes: first the distinct
    sentences (emphasis, cleaning, token counts: most of the work, each sentence once), then the targets
    in chunks, which inherit the sentences' results (in one process, the targets work out their
    sentences' as they meet them)."""
    raws, rows = distinct_targets(tables, label_sections)
    _SCORE["scorer"] = scorer
    try:
        if scorer.word_by_word and scorer.by_sentence and workers > 1:
            sentences = scorer.sentences(raws)
            chunks = _chunks(sentences, workers)
            parts = _map(_prepare_sentences, chunks, workers)
            for chunk, part in zip(chunks, parts, strict=True):
                scorer.adopt_sentences(chunk, part)
        chunks = _chunks(raws, workers)
        parts = _map(_score_chunk, chunks, workers)
    finally:
        _SCORE.clear()
        scorer.clear_caches()
    values = b"".join(values for part in parts for values in part)
    return TargetWeights(raws, np.frombuffer(values, np.uint8).reshape(len(raws), scorer.max_length), rows)


def distinct_targets(
    tables: dict[str, pa.Table], label_sections: bool
) -> tuple[list[tuple[str | None, str | None]], dict[str, np.ndarray]]:
    """The distinct (finding, impression) targets of the tables' rows as the loader reads them (with the
    section labels when ``label_sections``, None when missing), in the order the rows first have them,
    and the index of each row's target (by scenario): each section text coded and labelled once, the
    (finding, impression) pairs made distinct in NumPy (most rows repeat a target: sn and mn, sw and mw
    share them)."""
    fp, ip = SECTION_PREFIXES if label_sections else ("", "")

    def codes(column: str, prefix: str) -> tuple[list[str | None], np.ndarray]:
        code = _Codes.fromkeys((None, ""), 0)  # null and "" are both a missing section
        rows = [
            np.fromiter(map(code.__getitem__, t.column(column).to_pylist()), np.int64)
            for t in tables.values()
        ]
        rows = np.concatenate([*rows, np.zeros(0, np.int64)])
        texts: list[str | None] = [None] * len(code)
        for value, k in code.items():
            texts[k] = prefix + value if value else None
        return texts, rows

    findings, finding_codes = codes("finding", fp)
    impressions, impression_codes = codes("impression", ip)
    keys = finding_codes.astype(np.int64) * len(impressions) + impression_codes
    distinct, first_rows, row_keys = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first_rows)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    f, i = np.divmod(distinct[order], len(impressions))
    targets = [(findings[a], impressions[b]) for a, b in zip(f.tolist(), i.tolist(), strict=True)]
    ends = np.cumsum([t.num_rows for t in tables.values()])
    rows = dict(zip(tables, np.split(rank[row_keys.reshape(-1)], ends[:-1]), strict=True))
    return targets, rows


_SCORE: dict = {}  # what forked scorers inherit
SCORE_CHUNK = 512  # items per task at least: below this, forking costs more than it saves


def _chunks(items: list, workers: int) -> list[list]:
    size = max(SCORE_CHUNK, len(items) // (4 * max(workers, 1)) + 1)
    return [items[k : k + size] for k in range(0, len(items), size)]


def _map(fn, chunks: list[list], workers: int) -> list:
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(fn, chunks, chunksize=1)
    return [fn(c) for c in chunks]


def _prepare_sentences(sentences: list[str]) -> list[tuple]:
    return _SCORE["scorer"].prepare_sentences(sentences)


def _score_chunk(targets: list[tuple]) -> list[bytes]:
    return _SCORE["scorer"].scores_bytes(targets)


def consistency_problems(tables: dict[str, pa.Table]) -> list[str]:
    """Every broken invariant (empty list when the scenario tables are consistent)."""
    ids = {s: set(t.column("study_id").to_pylist()) for s, t in tables.items()}
    problems = nesting_problems(ids)
    subject_splits = []
    for scenario, t in tables.items():
        pairs = t.select(["split", "id"]).group_by(["split", "id"], use_threads=False).aggregate([])
        dup = t.num_rows - pairs.num_rows
        if dup:
            problems.append(f"{scenario}: {dup} duplicated ids")
        empty = pc.sum(pc.and_(pc.is_null(t.column("finding")), pc.is_null(t.column("impression")))).as_py()
        if empty:
            problems.append(f"{scenario}: {empty} records with neither finding nor impression")
        bad_split = set(pc.unique(t.column("split")).to_pylist()) - set(RG4_SPLITS)
        if bad_split:
            problems.append(f"{scenario}: unknown splits {sorted(bad_split)}")
        subject_splits.append(t.select(["subject_id", "split"]))
    if subject_splits:
        pairs = pa.concat_tables(subject_splits).group_by(["subject_id", "split"], use_threads=False)
        per_subject = (
            pairs.aggregate([]).group_by("subject_id", use_threads=False).aggregate([([], "count_all")])
        )
        crossing = pc.sum(pc.greater(per_subject.column("count_all"), 1)).as_py() or 0
        if crossing:
            problems.append(f"{crossing} subjects in more than one split")
    if tables["sw"].num_rows and tables["sw"].column("last_APPA_imagepath").null_count:
        problems.append("sw: records without a prior image")
    return problems


def rewrite_stats_table(rows: Iterable[tuple[str, str, int, int, int]]) -> pa.Table:
    """``contract.RG4_REWRITE_STATS`` from (scenario, category, sentences, removed, rephrased) rows."""
    data = {f.name: [] for f in RG4_REWRITE_STATS}
    for scenario, cat, total, removed, rephrased in rows:
        data["scenario"].append(scenario)
        data["category"].append(cat)
        data["sentences"].append(total)
        data["flagged"].append(removed + rephrased)
        data["removed"].append(removed)
        data["rephrased"].append(rephrased)
        data["share_removed"].append(removed / total if total else 0.0)
        data["share_rephrased"].append(rephrased / total if total else 0.0)
    return pa.Table.from_pydict(data, schema=RG4_REWRITE_STATS)


@dataclass
class BuildResult:
    tables: dict[str, pa.Table]
    counts: pa.Table
    stats: pa.Table
    rejects: Rejects
    n_studies: int
    # scenario -> each row's position: the row label of its study in the studies table read (today's row
    # order, kept by a shard's subset); the merge restores the order of the whole corpus by it
    positions: dict[str, list[int]] = field(default_factory=dict)
    reject_order: list[int] = field(default_factory=list)  # one sort key per reject, see _reject_key


# Rejects are written in the order an unsharded build makes them: the ineligible studies (by position),
# then the targets the check dropped (by position, then scenario), then nesting's drops scenario by scenario
# (by position). One int64 key per row carries that order through the shards to the merge.
_POSITION_BITS = 40


def _reject_key(group: int, position: int, minor: int = 0) -> int:
    return ((group << _POSITION_BITS) + position) * 8 + minor


@dataclass
class Prepared:
    """What :func:`build_prepared` needs of the input tables (which can be freed once it is made): the
    eligible studies and their scenario masks (:func:`prepare`), the rejected ones and their reasons, each
    study's position (its row in the studies table read: ``study_ids`` -> ``positions``) and the number of
    studies read."""

    df: pa.Table | None
    masks: dict[str, np.ndarray]
    rejected: pa.Array
    reasons: list[str]
    study_ids: pa.Array
    positions: np.ndarray
    n_studies: int

    @classmethod
    def of(
        cls,
        studies: pa.Table | pd.DataFrame,
        images: pa.Table | pd.DataFrame,
        sections: pa.Table | pd.DataFrame,
        positions: np.ndarray | None = None,
    ) -> Prepared:
        """``positions``: each studies row's position (default: its row label in a frame, its row number
        in a table)."""
        if positions is None:
            positions = (
                np.arange(studies.num_rows, dtype=np.int64)
                if isinstance(studies, pa.Table)
                else np.asarray(studies.index, np.int64)
            )
        studies, images, sections = map(_table, (studies, images, sections))
        first = first_rows(studies.column("study_id"))
        study_ids = one_array(studies.column("study_id")).take(pa.array(first, pa.int64()))
        return cls(*prepare(studies, images, sections), study_ids, positions[first], studies.num_rows)

    def position_of(self, study_ids: pa.Array | pa.ChunkedArray) -> list[int]:
        rows = pc.index_in(study_ids, value_set=self.study_ids).to_numpy(zero_copy_only=False)
        return self.positions[rows].tolist()


def _table(frame: pa.Table | pd.DataFrame) -> pa.Table:
    """An input as an Arrow table (a frame's columns of None only as strings)."""
    if isinstance(frame, pa.Table):
        return frame
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for k, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(k, f.name, table.column(k).cast(pa.string()))
    return table


def build(
    studies: pa.Table | pd.DataFrame,
    images: pa.Table | pd.DataFrame,
    sections: pa.Table | pd.DataFrame,
    runner,
) -> BuildResult:
    return build_prepared(Prepared.of(studies, images, sections), runner)


def _split_counts(splits: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(splits)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))


def build_prepared(prepared: Prepared, runner) -> BuildResult:
    """The scenario tables, counts, stats and rejects; consumes ``prepared.df`` (the frame is freed once its
    columns are lists, before the rewriter runs)."""
    rules = load_rules()
    df, masks = prepared.df, prepared.masks
    prepared.df = None
    rejects, reject_order = Rejects(STAGE), []
    for sid, reason, position in zip(
        prepared.rejected.to_pylist(), prepared.reasons, prepared.position_of(prepared.rejected), strict=True
    ):
        rejects.add(sid, reason)
        reject_order.append(_reject_key(0, position))

    cols = Columns(df)
    row_position = prepared.position_of(df.column("study_id"))
    eligible = {s: _split_counts(pc.filter(cols.arrays["split"], masks[s])) for s in RG4_SCENARIOS}
    del df
    scenario_index = {s: k for k, s in enumerate(RG4_SCENARIOS)}
    # jobs study by study, so the rewriter splits each text once for all of its scenarios
    jobs, index = [], []
    member = {s: masks[s].tolist() for s in RG4_SCENARIOS}
    removes = {s: rules.scenario_removes[s] for s in RG4_SCENARIOS}
    for pos, (sid, f, i) in enumerate(zip(cols.study_id, cols.findings, cols.impression, strict=True)):
        for scenario in RG4_SCENARIOS:
            if member[scenario][pos]:
                jobs.append(Job(sid, scenario, f, i, removes[scenario]))
                index.append((scenario, pos))
    t0 = time.perf_counter()
    outcomes = runner.run(jobs)
    log.info("rg4: %d targets rewritten and checked in %.1f s", len(jobs), time.perf_counter() - t0)

    by_scenario: dict[str, tuple[list, list[Outcome]]] = {s: ([], []) for s in RG4_SCENARIOS}
    stats: dict[tuple[str, str], Counter] = {(s, c): Counter() for s in RG4_SCENARIOS for c in CATEGORIES}
    sentences = Counter()
    for (scenario, pos), job, outcome in zip(index, jobs, outcomes, strict=True):
        sentences[scenario] += outcome.sentences
        if outcome.removed:  # most targets lose and rephrase nothing
            for cat, n in outcome.removed.items():
                stats[(scenario, cat)]["removed"] += n
        if outcome.rephrased:
            for cat, n in outcome.rephrased.items():
                stats[(scenario, cat)]["rephrased"] += n
        if outcome.reason is None:
            kept_rows, kept_outcomes = by_scenario[scenario]
            kept_rows.append(pos)
            kept_outcomes.append(outcome)
        else:
            rejects.add(job.study_id, f"{scenario}:{outcome.reason}")
            reject_order.append(_reject_key(1, row_position[pos], scenario_index[scenario]))

    del jobs, index, outcomes  # kept outcomes live on in by_scenario; the tables are built next

    # nested as released (MW ⊆ SW ∩ MN, SW ⊆ SN, MN ⊆ SN): a study dropped from a scenario by its check
    # leaves every scenario that refines it, with the reason "<scenario>:not_in_<parents>"
    kept = {s: {cols.study_id[p] for p in by_scenario[s][0]} for s in RG4_SCENARIOS}
    nested, _ = nest(kept)
    for scenario in RG4_SCENARIOS:
        reason = f"{scenario}:not_in_{'_and_'.join(PARENTS[scenario])}"
        positions, outs = [], []
        for pos, outcome in zip(*by_scenario[scenario], strict=True):
            if cols.study_id[pos] in nested[scenario]:
                positions.append(pos)
                outs.append(outcome)
            else:
                rejects.add(cols.study_id[pos], reason)
                reject_order.append(_reject_key(2 + scenario_index[scenario], row_position[pos]))
        by_scenario[scenario] = (positions, outs)

    tables, table_positions = {}, {}
    for scenario in RG4_SCENARIOS:  # each scenario's rewritten texts freed once its table holds them
        positions, outs = by_scenario.pop(scenario)
        tables[scenario] = scenario_table(cols, positions, scenario, outs, runner.name)
        table_positions[scenario] = [row_position[p] for p in positions]
        del positions, outs
    counts = {"scenario": [], "split": [], "records": [], "rejected": []}
    for s in RG4_SCENARIOS:
        got = _split_counts(tables[s].column("split"))
        for split in RG4_SPLITS:
            counts["scenario"].append(s)
            counts["split"].append(split)
            counts["records"].append(int(got.get(split, 0)))
            counts["rejected"].append(int(eligible[s].get(split, 0)) - int(got.get(split, 0)))
    return BuildResult(
        tables,
        pa.Table.from_pydict(counts, schema=RG4_COUNTS),
        rewrite_stats_table(
            (scenario, cat, sentences[scenario], c["removed"], c["rephrased"])
            for (scenario, cat), c in stats.items()
        ),
        rejects,
        prepared.n_studies,
        table_positions,
        reject_order,
    )


@dataclass
class OutputPaths:
    tables: dict[str, Path]  # scenario -> rg4_<scenario>.parquet
    json: dict[str, Path]  # scenario -> the loader's JSON file (none: the merge of the tables only)
    counts: Path
    stats: Path
    rejects: Path
    notes: Path  # build_notes.json: how the files were made, one line each (quoted in the dataset card)
    llm_requests: Path | None = None  # the llm rewriter's requests (an empty table with the rules rewriter)

    @classmethod
    def of_rule(cls, paths: Mapping[str, Path]) -> OutputPaths:
        """From the rules' output names (``sn`` ... ``mw``, ``counts``, ... of the rule rg4; ``json_sn`` ...
        ``json_mw`` of the rule rg4_loader, when given)."""
        return cls(
            {s: Path(paths[s]) for s in RG4_SCENARIOS},
            {s: Path(paths[f"json_{s}"]) for s in RG4_SCENARIOS} if "json_sn" in paths else {},
            Path(paths["counts"]),
            Path(paths["stats"]),
            Path(paths["rejects"]),
            Path(paths["notes"]),
            Path(paths["llm_requests"]) if "llm_requests" in paths else None,
        )


def rule_args(paths: Mapping[str, Path]) -> list[str]:
    """The path flags of rules/rg4.smk's shell line, from the names of its inputs and outputs
    (``studies``, ``images``, ``sections``, ``sn`` ... ``json_mw``, ``counts``, ``stats``, ``rejects``,
    ``notes``, ``llm_requests``): tests and bench/ run the stage the way the rule does. Other names are ignored."""
    return [
        *("--studies", str(paths["studies"]), "--images", str(paths["images"])),
        *("--sections", str(paths["sections"])),
        *output_args(OutputPaths.of_rule(paths)),
    ]


def output_args(out: OutputPaths) -> list[str]:
    """The flags naming the stage's outputs (of ``python -m workflow.rg4`` and of the merge)."""
    return [
        *("--tables", *(str(out.tables[s]) for s in RG4_SCENARIOS)),
        *(("--json", *(str(out.json[s]) for s in RG4_SCENARIOS)) if out.json else ()),
        *("--counts", str(out.counts), "--stats", str(out.stats)),
        *("--rejects", str(out.rejects), "--notes", str(out.notes)),
        *(("--llm-requests", str(out.llm_requests)) if out.llm_requests is not None else ()),
    ]


def add_output_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags of :func:`output_args` but ``--llm-requests`` (an option of every LLM task)."""
    p.add_argument(
        "--tables", nargs=4, type=Path, required=required, metavar="PARQUET", help="rg4 tables of sn sw mn mw"
    )
    p.add_argument(
        "--json", nargs=4, type=Path, required=required, metavar="JSON", help="loader files of sn sw mn mw"
    )
    p.add_argument("--counts", type=Path, required=required)
    p.add_argument("--stats", type=Path, required=required, help="rewrite_stats.parquet")
    p.add_argument("--rejects", type=Path, required=required)
    p.add_argument("--notes", type=Path, required=required, help="build_notes.json")


def output_paths(args: argparse.Namespace) -> OutputPaths:
    return OutputPaths(
        dict(zip(RG4_SCENARIOS, args.tables, strict=True)),
        dict(zip(RG4_SCENARIOS, args.json, strict=True)) if args.json else {},
        args.counts,
        args.stats,
        args.rejects,
        args.notes,
        args.llm_requests,
    )


# --- one shard's outputs ----------------------------------------------------------------------------------

POSITION = "position"  # the shards' scenario tables: each row's position (BuildResult.positions)
SHARD_RECORDS = RG4_RECORDS.append(pa.field(POSITION, pa.int64(), nullable=False))
REJECT_ORDER = "order"  # the shards' rejects: each row's sort key (_reject_key)
SHARD_REJECTS = REJECTS.append(pa.field(REJECT_ORDER, pa.int64(), nullable=False))


@dataclass(frozen=True)
class ShardPaths:
    """The outputs of one shard in ``folder`` (rules/rg4.smk's ``rg4_shard`` names them the same, see
    :meth:`by_name`): the scenario tables with their rows' positions, the loader records as lines
    (:func:`write_loader_fragment`), counts, rewrite stats and rejects with their sort keys, the llm
    rewriter's requests, and ``facts.json`` (studies read, rewriter, options, the weights' totals)."""

    folder: Path

    def by_name(self) -> dict[str, Path]:
        return {
            **{s: self.folder / f"rg4_{s}.parquet" for s in RG4_SCENARIOS},
            **{f"json_{s}": self.folder / f"rg4_{s}.jsonl.zst" for s in RG4_SCENARIOS},
            **{name: getattr(self, name) for name in ("counts", "stats", "rejects", "llm_requests", "facts")},
        }

    @property
    def counts(self) -> Path:
        return self.folder / "counts.parquet"

    @property
    def stats(self) -> Path:
        return self.folder / "rewrite_stats.parquet"

    @property
    def rejects(self) -> Path:
        return self.folder / "rejects_to_merge.parquet"  # REJECTS + a sort key: not a rejects table yet

    @property
    def llm_requests(self) -> Path:
        return self.folder / "llm_requests.parquet"

    @property
    def facts(self) -> Path:
        return self.folder / "facts.json"

    @property
    def tables(self) -> dict[str, Path]:
        return {s: self.by_name()[s] for s in RG4_SCENARIOS}

    @property
    def json(self) -> dict[str, Path]:
        return {s: self.by_name()[f"json_{s}"] for s in RG4_SCENARIOS}


_WRITE: dict = {}  # what forked writers inherit (never pickled)


def _write_scenario(scenario: str) -> tuple[int, int]:
    """Write one scenario's shard table and loader lines; (emphasised, total) target positions of its weights."""
    result, shard = _WRITE["result"], _WRITE["shard"]
    table, positions = result.tables[scenario], result.positions[scenario]
    write_table(
        table.append_column(POSITION, pa.array(positions, pa.int64())), shard.tables[scenario], SHARD_RECORDS
    )
    return write_loader_fragment(
        table, positions, shard.json[scenario], scenario, _WRITE["label_sections"], _WRITE["weights"]
    )


def write_shard(
    result: BuildResult,
    shard: ShardPaths,
    label_sections: bool = True,
    workers: int = 1,
    scorer: TokenScorer | None = None,
    rewriter: str = "rules",
    requests: list[dict] = (),
) -> None:
    """Check the tables (a shard holds whole patients, so every invariant holds within it), then write the
    shard's outputs for :func:`workflow.rg4.merge.merge`."""
    problems = consistency_problems(result.tables)
    if problems:
        raise ConsistencyError("the rg4 scenario tables break MIMIC-RG4's invariants: " + "; ".join(problems))
    weights = None
    if scorer is not None:
        t0 = time.perf_counter()
        weights = score_targets(result.tables, label_sections, scorer, workers)
        log.info(
            "rg4 new_scores: %d distinct targets scored in %.1f s",
            len(weights.targets),
            time.perf_counter() - t0,
        )
    _WRITE.update(result=result, shard=shard, label_sections=label_sections, weights=weights)
    try:
        if workers > 1:  # four independent files: encode and write them on forked processes
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                totals = pool.map(_write_scenario, list(result.tables), chunksize=1)
        else:
            totals = [_write_scenario(scenario) for scenario in result.tables]
    finally:
        _WRITE.clear()
    del weights
    write_table(result.counts, shard.counts, RG4_COUNTS)
    write_table(result.stats, shard.stats, RG4_REWRITE_STATS)
    rejects = pa.Table.from_pydict(result.rejects.rows, schema=REJECTS)
    rejects = rejects.append_column(REJECT_ORDER, pa.array(result.reject_order, pa.int64()))
    write_table(rejects, shard.rejects, SHARD_REJECTS)
    write_table(pa.Table.from_pylist(list(requests), schema=LLM_REQUESTS), shard.llm_requests, LLM_REQUESTS)
    facts = {
        "n_studies": result.n_studies,
        "rewriter": rewriter,
        "label_sections": label_sections,
        "scorer": None if scorer is None else {"name": scorer.name, "max_length": scorer.max_length},
        "emphasised": sum(t[0] for t in totals),
        "positions": sum(t[1] for t in totals),
    }
    write_json(facts, shard.facts)


def write_outputs(
    result: BuildResult,
    paths: OutputPaths,
    label_sections: bool = True,
    workers: int = 1,
    scorer: TokenScorer | None = None,
    rewriter: str = "rules",
    requests: list[dict] = (),
) -> list[str]:
    """Check the tables, then write every output of the stage (one shard, merged: the same writer as a
    sharded run's); returns the build notes written."""
    import tempfile

    from workflow.rg4.merge import merge

    paths.notes.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".rg4_shard.", dir=paths.notes.parent) as tmp:
        shard = ShardPaths(Path(tmp))
        write_shard(result, shard, label_sections, workers, scorer, rewriter, requests)
        return merge([shard], paths)


def build_notes(reasons: Iterable[str], label_sections: bool, rewriter: str = "rules") -> list[str]:
    """What a user of the files must know about how they were made (the dataset card quotes them);
    ``reasons``: the rejects' reasons."""
    dropped = Counter(reason.split(":", 1)[0] for reason in reasons if ":" in reason)
    lines = [
        f"Rewriter: {rewriter}"
        + (
            " (libs/rg4_rules.yaml, whole-word rules, every output word checked)."
            if rewriter == "rules"
            else "."
        ),
        "Section prefixes (rg4.label_sections: "
        + (
            "true): in the LLM-RG4 JSON files findings and impressions, of the target and of the prior report, "
            f"start with {SECTION_PREFIXES[0]!r} / {SECTION_PREFIXES[1]!r} as in the released MIMIC-RG4; "
            if label_sections
            else "false): the LLM-RG4 JSON files hold findings and impressions without the "
            f"{SECTION_PREFIXES[0]!r} / {SECTION_PREFIXES[1]!r} labels of the released MIMIC-RG4; "
        )
        + "the Parquet tables hold the unlabelled text.",
        "Nested by study (mw ⊆ sw ∩ mn, sw ⊆ sn, mn ⊆ sn); targets dropped by the check or by nesting: "
        + ", ".join(f"{s} {dropped.get(s, 0)}" for s in RG4_SCENARIOS)
        + " (reasons in rejects.parquet).",
    ]
    return lines


def log_figures(counts: pa.Table, stats: pa.Table) -> None:
    for row in counts.to_pylist():
        log.info(
            "%s %-5s %7d records, %5d dropped by the check",
            row["scenario"],
            row["split"],
            row["records"],
            row["rejected"],
        )
    for row in stats.to_pylist():
        log.info(
            "%s %-4s removed %.2f%% rephrased %.2f%% of %d sentences",
            row["scenario"],
            row["category"],
            100 * row["share_removed"],
            100 * row["share_rephrased"],
            row["sentences"],
        )


def _read(path: Path, columns: list[str], study_ids: pa.Array | None = None) -> pa.Table:
    table = read_table(path, columns)
    if study_ids is not None:
        table = table.filter(pc.is_in(table.column("study_id"), value_set=study_ids))
    return table


def read_inputs(
    studies_path: Path, images_path: Path, sections_path: Path, shard: int = 0, shards: int = 1
) -> tuple[pa.Table, np.ndarray, pa.Table, pa.Table, int]:
    """(studies, their positions, images, sections, studies read) of one shard: the patients with
    ``subject_id % shards == shard`` (a patient's studies, priors and split stay together), their images and
    sections. Each study's position is its row in the whole table (the merge restores the order by it); a
    study listed twice belongs to the shard of its first row, as the unsharded build keeps that one."""
    studies = _read(studies_path, ["subject_id", "study_id", "split", "study_datetime"])
    columns = (["dicom_id", "study_id", "view_position", "image_path"], ["study_id", *SECTION_COLUMNS])
    if shards == 1:
        images, sections = _read(images_path, columns[0]), _read(sections_path, columns[1])
        return studies, np.arange(studies.num_rows, dtype=np.int64), images, sections, studies.num_rows
    mine = one_array(studies.column("subject_id")).to_numpy() % shards == shard
    first = np.zeros(studies.num_rows, bool)
    first[first_rows(studies.column("study_id"))] = True
    rows = np.flatnonzero(mine & first)
    studies = studies.take(pa.array(rows, pa.int64()))
    ids = one_array(studies.column("study_id"))
    images, sections = _read(images_path, columns[0], ids), _read(sections_path, columns[1], ids)
    return studies, rows, images, sections, int(mine.sum())


SECTION_COLUMNS = ["indication", "history", "findings", "impression"]


def main(argv: list[str] | None = None) -> BuildResult:
    p = cli_parser("MIMIC-RG4 scenario splits with input-agnostic rewriting")
    p.add_argument("--studies", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--sections", required=True, type=Path)
    add_output_args(p, required=False)
    p.add_argument("--shard", type=int, default=0, help="with --shard-dir: which shard (0 ... shards - 1)")
    p.add_argument("--shards", type=int, default=1, help="rg4.shards: patients by subject_id %% shards")
    p.add_argument(
        "--shard-dir",
        type=Path,
        help="write the shard's outputs here (rules/rg4.smk rg4_shard) for `python -m workflow.rg4.merge`,"
        " instead of the stage's outputs",
    )
    p.add_argument("--rewriter", choices=("rules", "llm"), default="rules")
    add_llm_task_args(p, "the llm rewriter", max_tokens=800)
    p.add_argument("--max-attempts", type=int, default=3, help="llm: requests per target before dropping it")
    p.add_argument("--workers", type=int, default=1, help="rules: processes for detection and rewriting")
    p.add_argument(
        "--scores-tokenizer", help="rg4.scores.tokenizer: tokenizer.json (or its folder) for new_scores"
    )
    p.add_argument("--scores-max-length", type=int, default=100, help="rg4.scores.max_length")
    p.add_argument(
        "--label-sections",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='JSON findings / impressions as "finding: ..." / "impression: ..." (default, as released)',
    )
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not 0 <= args.shard < args.shards:
        p.error(f"--shard {args.shard} is not one of 0 ... {args.shards - 1} (--shards {args.shards})")
    if args.shard_dir is None:
        missing = [
            f for f in ("tables", "json", "counts", "stats", "rejects", "notes") if getattr(args, f) is None
        ]
        if missing:
            p.error("without --shard-dir the stage's outputs are needed: --" + ", --".join(missing))
        if args.shards > 1:
            p.error("--shards > 1 writes one shard: give --shard-dir (and merge with workflow.rg4.merge)")

    scorer = None
    if args.scores_tokenizer:  # checked before any work: a wrong path fails at once, naming the key
        try:
            scorer = TokenScorer(
                load_tokenizer(args.scores_tokenizer),
                default_emphasis(),
                args.scores_max_length,
                Path(args.scores_tokenizer).name,
                section_labels=SECTION_PREFIXES if args.label_sections else (),
            )
        except ScoresConfigError as exc:
            p.error(str(exc))

    # millions of small objects, no reference cycles worth collecting: the cyclic GC would rescan the
    # whole heap again and again (it doubled the run time at MIMIC scale)
    gc.disable()
    t0 = time.perf_counter()
    studies, positions, images, sections, n_read = read_inputs(
        args.studies, args.images, args.sections, args.shard, args.shards
    )
    prepared = Prepared.of(studies, images, sections, positions)
    prepared.n_studies = n_read
    del studies, images, sections  # what the build needs of them is in `prepared`
    label_vector = default_label_vector()
    if args.rewriter == "rules":
        runner = RulesJobRunner(label_vector, args.workers, learn_findings=scorer is not None)
    else:
        from workflow.rg4.llm_rewriter import LLMJobRunner

        runner = LLMJobRunner.from_config(
            args.llm_config,
            args.llm_cache,
            args.llm_endpoint,
            label_vector,
            params={"temperature": args.temperature, "max_tokens": args.max_tokens},
            max_attempts=args.max_attempts,
        )
    t1 = time.perf_counter()
    result = build_prepared(prepared, runner)
    t2 = time.perf_counter()
    requests = runner.requests if args.rewriter == "llm" else []  # the rules rewriter asks nothing
    if scorer is not None and args.rewriter == "rules":
        # default_emphasis(text) == names_a_finding(label_vector(text)): the same extractor call, and
        # the label checks made it for most rewritten sentences
        scorer.learn_emphasis(runner.rewriter.finding_in)
    rewriter = runner.name
    # the rewriter is done with: freed before the scorers and writers fork
    del runner, prepared
    if args.shard_dir is not None:
        write_shard(
            result, ShardPaths(args.shard_dir), args.label_sections, args.workers, scorer, rewriter, requests
        )
        log.info(
            "rg4 shard %d of %d: %d studies in, %s scenario rows, %d rejects (merged by the rg4 rule)",
            args.shard,
            args.shards,
            result.n_studies,
            " / ".join(f"{s} {t.num_rows}" for s, t in result.tables.items()),
            len(result.rejects),
        )
    else:
        write_outputs(
            result, output_paths(args), args.label_sections, args.workers, scorer, rewriter, requests
        )
    log.info(
        "rg4 timing: read %.1f s, build %.1f s, write %.1f s", t1 - t0, t2 - t1, time.perf_counter() - t2
    )
    return result


if __name__ == "__main__":
    main()
