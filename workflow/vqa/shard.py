"""Reading one shard's inputs: the patients with ``subject_id % shards == shard`` (a patient's studies
stay together), only the columns the question builders use, and the whole corpus's facts the shard's
questions must respect (:class:`Corpus`)."""

from __future__ import annotations

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


def _read(path, columns: list[str], filters=None) -> pd.DataFrame:
    """The ``columns`` of ``path`` that it has (optional ones may be absent), rows matching ``filters``."""
    available = set(pq.read_schema(path).names)
    return pq.read_table(path, columns=[c for c in columns if c in available], filters=filters).to_pandas()


def in_shard(subject_id: pd.Series, shard: int, shards: int) -> pd.Series:
    """The rows of patients of ``shard`` (a missing subject_id goes to shard 0)."""
    return (subject_id % shards == shard).fillna(shard == 0).astype(bool)


def read_shard(findings, images, studies, keyinfo_studies, shard: int = 0, shards: int = 1) -> dict:
    """The inputs of :func:`generate` for one shard (all rows when ``shards`` is 1): findings, images,
    studies and keyinfo_studies (None without the table)."""
    all_studies = _read(studies, ["subject_id", "study_id", "split"])
    if shards == 1:
        rows = None
        shard_studies = all_studies
    else:
        shard_studies = all_studies[in_shard(all_studies["subject_id"], shard, shards).to_numpy()]
        # filtered while reading (row group by row group): the other shards' rows are never held
        rows = pc.field("study_id").isin(pa.array(shard_studies["study_id"].unique(), pa.int64()))
    return {
        "findings": _read(findings, FINDINGS_COLUMNS, rows),
        "images": _read(images, IMAGES_COLUMNS, rows),
        "studies": shard_studies.reset_index(drop=True),
        "keyinfo_studies": _read(keyinfo_studies, ["study_id", "status"], rows) if keyinfo_studies else None,
    }


def read_corpus(findings, images, studies, names, exclude_names, level_lib) -> Corpus:
    """:func:`corpus_facts` of the whole corpus, from the few columns (and level rows) it needs."""
    level_rows = _read(findings, LEVEL_COLUMNS, ~pc.field("level").is_null()) if level_lib else None
    return corpus_facts(
        level_rows,
        _read(images, VIEW_COLUMNS),
        _read(studies, ["subject_id", "study_id", "split"]),
        names,
        exclude_names,
        level_lib,
    )
