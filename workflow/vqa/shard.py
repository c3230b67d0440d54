"""Reading one shard's inputs: the patients with ``subject_id % shards == shard`` (a patient's studies
stay together), only the columns the question builders use, and the whole corpus's facts the shard's
questions must respect (:class:`Corpus`)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflow.vqa.prepare import Corpus, corpus_facts

FINDINGS_COLUMNS = ["study_id", "name", "presence", "location", "level", "type", "raw_name", "evidence"]
IMAGES_COLUMNS = ["study_id", "dicom_id", "image_path", "view_position", "view_code_meaning", "split"]
# what the corpus facts need: the views per split, and the rows with a level (the level words)
VIEW_COLUMNS = ["study_id", "view_position", "view_code_meaning", "split"]
LEVEL_COLUMNS = ["study_id", "name", "presence", "level", "raw_name", "evidence"]
KEYINFO_COLUMNS = ["study_id", "status"]


def _read(path, *selections: tuple[Callable[[pa.Table], pa.Table] | None, list[str]]) -> list[pa.Table]:
    """``path`` read once, one table per selection (rows, columns): the rows a function of a table keeps
    (None: all), in file order, and the ``columns`` the file has (optional ones may be absent).

    One row group at a time, in one thread: about half the CPU (and less memory) of reading the whole
    table once per selection with Arrow's threaded reader and a filter; the other core has a job too."""
    file = pq.ParquetFile(path)
    available = set(file.schema_arrow.names)
    wanted = [c for c in dict.fromkeys(c for _, columns in selections for c in columns) if c in available]
    picks = [(rows, [c for c in columns if c in available]) for rows, columns in selections]
    groups = (file.read_row_group(i, columns=wanted, use_threads=False) for i in range(file.num_row_groups))
    parts = [[] for _ in picks]
    for group in groups if file.num_row_groups else [file.schema_arrow.empty_table().select(wanted)]:
        for part, (rows, columns) in zip(parts, picks, strict=True):
            part.append((rows(group) if rows else group).select(columns))
    return [pa.concat_tables(part) for part in parts]


def in_shard(subject_id: pd.Series, shard: int, shards: int) -> pd.Series:
    """The rows of patients of ``shard`` (a missing subject_id goes to shard 0)."""
    return (subject_id % shards == shard).fillna(shard == 0).astype(bool)


def read_inputs(
    findings,
    images,
    studies,
    keyinfo_studies,
    shard: int = 0,
    shards: int = 1,
    names: list[str] | None = None,
    exclude_names: tuple[str, ...] = (),
    level_lib: dict[str, str] | None = None,
) -> tuple[dict, Corpus | None]:
    """The inputs of :func:`generate` for one shard (all rows when ``shards`` is 1): findings, images,
    studies and keyinfo_studies (None without the table); and with several shards the whole corpus's
    facts (:func:`corpus_facts`; the level words' only with ``level_lib``). Each table is read once for
    both: the shard's rows and the corpus's are picked as its row groups pass."""
    (all_studies,) = _read(studies, (None, ["subject_id", "study_id", "split"]))
    all_studies = all_studies.to_pandas()
    if shards == 1:
        inputs = {
            "findings": _read(findings, (None, FINDINGS_COLUMNS))[0].to_pandas(),
            "images": _read(images, (None, IMAGES_COLUMNS))[0].to_pandas(),
            "studies": all_studies,
            "keyinfo_studies": _read(keyinfo_studies, (None, KEYINFO_COLUMNS))[0].to_pandas()
            if keyinfo_studies
            else None,
        }
        return inputs, None

    shard_studies = all_studies[in_shard(all_studies["subject_id"], shard, shards).to_numpy()]
    # one hash table of the shard's studies for every row group (pc.is_in would build one per call)
    ids = pd.Index(shard_studies["study_id"].unique())

    def of_shard(table: pa.Table) -> pa.Table:
        return table.filter(ids.get_indexer(table["study_id"].to_numpy()) >= 0)

    def with_level(table: pa.Table) -> pa.Table:
        return table.filter(pc.is_valid(table["level"]))

    level_rows = [(with_level, LEVEL_COLUMNS)] if level_lib else []
    shard_findings, *levels = _read(findings, (of_shard, FINDINGS_COLUMNS), *level_rows)
    shard_images, views = _read(images, (of_shard, IMAGES_COLUMNS), (None, VIEW_COLUMNS))
    inputs = {
        "findings": shard_findings.to_pandas(),
        "images": shard_images.to_pandas(),
        "studies": shard_studies.reset_index(drop=True),
        "keyinfo_studies": _read(keyinfo_studies, (of_shard, KEYINFO_COLUMNS))[0].to_pandas()
        if keyinfo_studies
        else None,
    }
    level_rows = levels[0] if levels else None
    corpus = corpus_facts(level_rows, views.to_pandas(), all_studies, names, exclude_names, level_lib)
    return inputs, corpus
