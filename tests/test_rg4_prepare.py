"""rg4's preparation in Arrow (scenario membership, priors, the records' columns) against its definition in
pandas, on a random corpus full of the cases that could differ silently: studies listed twice, unknown
splits, missing / duplicated / blank sections, view positions in any case and spacing, ties between images,
studies at the same time or undated, priors across splits, unusual white space."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from workflow.contract import IMAGES, SECTIONS, STUDIES
from workflow.rg4 import build as rg4
from workflow.rg4.rewrite import normalise_space
from workflow.rg4.scenarios import first_rows

# --- the definitions (pandas, one value at a time) ----------------------------------------------------------

SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _pick_view(images: pd.DataFrame, views: tuple[str, ...]) -> pd.DataFrame:
    view = images["view_position"].fillna("").str.upper().str.strip()
    chosen = images.loc[view.isin(views), ["study_id", "dicom_id", "image_path"]].copy()
    chosen["view"] = view[chosen.index]
    chosen["rank"] = chosen["view"].map({v: i for i, v in enumerate(views)})
    chosen = chosen.sort_values(["study_id", "rank", "dicom_id"], kind="stable")
    return chosen.drop_duplicates("study_id", keep="first").drop(columns="rank").set_index("study_id")


def _present(series: pd.Series) -> pd.Series:
    return series.fillna("").str.strip() != ""


def _eligible(studies, images, sections):
    frontal, lateral = _pick_view(images, ("PA", "AP")), _pick_view(images, ("LATERAL", "LL"))
    df = studies[["subject_id", "study_id", "split", "study_datetime"]].drop_duplicates("study_id").copy()
    df["split"] = df["split"].map(SPLIT_NAMES)
    sec = sections.drop_duplicates("study_id").set_index("study_id")
    df = df.join(sec[["indication", "history", "findings", "impression"]], on="study_id")
    df = df.join(frontal.rename(columns=lambda c: f"frontal_{c}"), on="study_id")
    df = df.join(lateral.rename(columns=lambda c: f"lateral_{c}"), on="study_id")
    reason = pd.Series(pd.NA, index=df.index, dtype="object")
    reason[df["frontal_dicom_id"].isna()] = "no_frontal_image"
    reason[~(_present(df["findings"]) | _present(df["impression"]))] = "no_findings_or_impression"
    reason[~df["study_id"].isin(sec.index)] = "no_sections"
    reason[df["split"].isna()] = "unknown_split"
    rejected = pd.DataFrame({"study_id": df["study_id"], "reason": reason})[reason.notna()]
    return df[reason.isna()].reset_index(drop=True), rejected.reset_index(drop=True)


def _priors(eligible: pd.DataFrame) -> pd.DataFrame:
    df = eligible.copy()
    timed = df[df["study_datetime"].notna()].sort_values(["subject_id", "study_datetime", "study_id"])
    groups = timed.drop_duplicates(["subject_id", "study_datetime"], keep="last")[
        ["subject_id", "study_datetime", "study_id", "split"]
    ]
    prev = groups.groupby("subject_id", sort=False)[["study_id", "split"]].shift(1)
    groups = groups.assign(last_study_id=prev["study_id"], last_split=prev["split"])
    timed = timed.merge(
        groups[["subject_id", "study_datetime", "last_study_id", "last_split"]],
        on=["subject_id", "study_datetime"],
        how="left",
    )
    timed.loc[timed["last_split"] != timed["split"], "last_study_id"] = pd.NA
    df = df.merge(timed[["study_id", "last_study_id"]], on="study_id", how="left")
    df["last_study_id"] = df["last_study_id"].astype("Int64")
    return df


def _missing(v) -> bool:
    return v is None or (not isinstance(v, str) and pd.isna(v))


def _text(v):
    return None if _missing(v) else normalise_space(v) or None


def _context(v):
    return None if _missing(v) else v.strip() or None


def _listed(series: pd.Series) -> list:
    return [None if _missing(v) else v for v in series.tolist()]


def reference(studies: pd.DataFrame, images: pd.DataFrame, sections: pd.DataFrame) -> dict:
    """The records' columns of the eligible studies, their masks, the rejects and positions."""
    eligible, rejected = _eligible(studies, images, sections)
    df = _priors(eligible)
    for col in ("findings", "impression"):
        df[col] = pd.Series([_text(v) for v in df[col]], index=df.index, dtype=object)
    for col in ("frontal_image_path", "lateral_image_path"):
        df[col] = df[col].astype("string").str.replace(r"^files/", "", regex=True)
    prior = df.set_index("study_id").reindex(df["last_study_id"].astype("float").astype("Int64"))
    df["last_finding"] = pd.Series(prior["findings"].to_numpy(), index=df.index, dtype=object)
    df["last_impression"] = pd.Series(prior["impression"].to_numpy(), index=df.index, dtype=object)
    df["last_APPA_imagepath"] = prior["frontal_image_path"].to_numpy()
    first = studies.drop_duplicates("study_id")
    position_of = pd.Series(first.index.to_numpy(dtype=np.int64), index=first["study_id"].to_numpy())
    columns = {
        "split": _listed(df["split"]),
        "id": _listed(df["frontal_dicom_id"]),
        "subject_id": [int(v) for v in df["subject_id"]],
        "study_id": [int(v) for v in df["study_id"]],
        "APPA_flag": _listed(df["frontal_view"]),
        "APPA_imagepath": _listed(df["frontal_image_path"]),
        "lateral_imagepath": _listed(df["lateral_image_path"]),
        "last_study_id": [None if pd.isna(v) else int(v) for v in df["last_study_id"]],
        "last_finding": _listed(df["last_finding"]),
        "last_impression": _listed(df["last_impression"]),
        "last_APPA_imagepath": _listed(df["last_APPA_imagepath"]),
        "indication": [_context(v) for v in df["indication"]],
        "history": [_context(v) for v in df["history"]],
        "original_finding": _listed(df["findings"]),
        "original_impression": _listed(df["impression"]),
    }
    prior, lateral = df["last_study_id"].notna(), df["lateral_dicom_id"].notna()
    masks = {
        "sn": [True] * len(df),
        "sw": prior.tolist(),
        "mn": lateral.tolist(),
        "mw": (prior & lateral).tolist(),
    }
    return {
        "columns": columns,
        "masks": masks,
        "rejected": list(zip(rejected["study_id"].tolist(), rejected["reason"].tolist(), strict=True)),
        "positions": position_of.reindex(df["study_id"]).tolist(),
        "reject_positions": position_of.reindex(rejected["study_id"]).tolist(),
    }


# --- a random corpus -------------------------------------------------------------------------------------

SPACES = [" ", "  ", "\n ", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000"]
WORDS = [
    "No",
    "acute",
    "process.",
    "Mild",
    "cardiomegaly",
    "unchanged",
    'the "tube"',
    "a\\b",
    "é",
    "₂",
    "\x01",
]
VIEWS = ["PA", "AP", "pa", " ap ", "Pa\t", "LATERAL", "lateral", "LL", " ll", None, "", "OBLIQUE", "ß", "ı"]


def _random_text(rng: random.Random):
    kind = rng.random()
    if kind < 0.1:
        return None
    if kind < 0.15:
        return rng.choice(["", " ", "\n \n", "\x1c", "\u3000"])
    text = rng.choice(["", " ", "\n"])
    for _ in range(rng.randint(1, 8)):
        text += rng.choice(WORDS) + rng.choice(SPACES)
    return text if rng.random() < 0.5 else text.strip()


def corpus(seed: int, n_studies: int = 600):
    rng = random.Random(seed)
    studies = {n: [] for n in STUDIES.names}
    images = {n: [] for n in IMAGES.names}
    sections = {n: [] for n in SECTIONS.names}
    start = datetime(2150, 1, 1)
    study_ids = list(range(5000, 5000 + n_studies))
    for study in study_ids:
        subject = rng.randint(1, n_studies // 5)
        split = rng.choice(["train", "train", "validate", "test", "val", None, "other"])
        when = (
            None
            if rng.random() < 0.08
            else start + timedelta(days=rng.randint(0, 40), hours=rng.choice([0, 0, 9]))
        )
        for _ in range(2 if rng.random() < 0.03 else 1):  # a study listed twice: its first row counts
            studies["subject_id"].append(subject)
            studies["study_id"].append(study)
            studies["split"].append(split)
            studies["study_datetime"].append(when)
            studies["report"].append("FINDINGS: ...")
            studies["source_path"].append(f"files/p{subject}/s{study}.txt")
        if rng.random() < 0.05:  # no sections
            continue
        for _ in range(2 if rng.random() < 0.03 else 1):  # duplicated sections: the first counts
            for name in SECTIONS.names:
                value = {"subject_id": subject, "study_id": study}.get(name)
                sections[name].append(value if name in ("subject_id", "study_id") else _random_text(rng))
        for k in range(rng.choice([0, 1, 1, 2, 3, 4])):
            dicom = rng.choice([f"d{study}", f"d{study}x", f"c{study}", f"e{k}{study}"])
            images["dicom_id"].append(dicom)
            images["subject_id"].append(subject)
            images["study_id"].append(study)
            images["split"].append(split)
            images["view_position"].append(rng.choice(VIEWS))
            images["view_code_meaning"].append("")
            prefix = rng.choice(["files/", "", "other/files/"])
            images["image_path"].append(f"{prefix}p{subject}/s{study}/{dicom}.jpg")
    order = list(range(len(studies["study_id"])))
    rng.shuffle(order)  # positions are not study order
    studies = {n: [v[k] for k in order] for n, v in studies.items()}
    return (
        pa.Table.from_pydict(studies, schema=STUDIES),
        pa.Table.from_pydict(images, schema=IMAGES),
        pa.Table.from_pydict(sections, schema=SECTIONS),
    )


@pytest.mark.parametrize("seed", range(6))
def test_preparation_in_arrow_is_the_pandas_definition(seed):
    studies, images, sections = corpus(seed)
    want = reference(studies.to_pandas(), images.to_pandas(), sections.to_pandas())
    prepared = rg4.Prepared.of(studies, images, sections)
    cols = rg4.Columns(prepared.df)
    assert {name: array.to_pylist() for name, array in cols.arrays.items()} == want["columns"]
    assert {s: m.tolist() for s, m in prepared.masks.items()} == want["masks"]
    assert list(zip(prepared.rejected.to_pylist(), prepared.reasons, strict=True)) == want["rejected"]
    assert prepared.position_of(prepared.df.column("study_id")) == want["positions"]
    assert prepared.position_of(prepared.rejected) == want["reject_positions"]
    assert cols.findings == want["columns"]["original_finding"]
    assert sum(want["masks"]["sw"]) and sum(want["masks"]["mn"]) and want["rejected"]  # the corpus has all


def test_a_shard_reads_its_patients_with_their_positions(tmp_path):
    studies, images, sections = corpus(7)
    paths = {}
    for name, t in (("studies", studies), ("images", images), ("sections", sections)):
        paths[name] = tmp_path / f"{name}.parquet"
        rg4.write_table(t, paths[name], t.schema)
    frame = studies.to_pandas()
    first = ~frame["study_id"].duplicated()
    for shard in range(2):
        got, positions, got_images, got_sections, n_read = rg4.read_inputs(
            paths["studies"], paths["images"], paths["sections"], shard, 2
        )
        mine = frame["subject_id"] % 2 == shard
        assert n_read == int(mine.sum())
        assert positions.tolist() == frame.index[mine & first].tolist()
        assert got.column("study_id").to_pylist() == frame.loc[mine & first, "study_id"].tolist()
        ids = set(got.column("study_id").to_pylist())
        assert set(got_images.column("study_id").to_pylist()) <= ids
        assert got_sections.num_rows == sum(s in ids for s in sections.column("study_id").to_pylist())


def test_first_rows_are_the_first_occurrences():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1000):
        ids = rng.integers(0, max(1, n // 3), n)
        _, first = np.unique(ids, return_index=True)
        assert first_rows(pa.array(ids)).tolist() == sorted(first.tolist())


def test_json_strings_are_json_dumps():
    """The escapes found in the data buffer: multi-byte characters, control characters, quotes,
    backslashes, nulls, empty values and a sliced array (an offset into its buffers)."""
    rng = random.Random(3)
    values = [_random_text(rng) for _ in range(3000)] + ['"', "\\", "\x00", "\x1f", "\x7f", "\u2028", "é\x05"]
    array = pa.array(["pad", *values], pa.string()).slice(1)
    want = ["null" if v is None else json.dumps("finding: " + v, ensure_ascii=False) for v in values]
    assert rg4._json_strings(array, "finding: ").to_pylist() == want
    missing = ['"s"' if not v else json.dumps(v, ensure_ascii=False) for v in values]
    assert rg4._json_strings(array, "", '"s"').to_pylist() == missing


def test_texts_are_normalised_as_normalise_space():
    """White space of every kind, ASCII and not, as str.split() splits on it."""
    rng = random.Random(5)
    ascii_spaces = [" ", "  ", "\n ", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f"]
    values = [None, "", " ", "a", " a", "a ", "\x1f\x1fa\t\tb\n", "\x01 x", "x \x7f y"]
    for _ in range(3000):
        text = "".join(
            rng.choice([*ascii_spaces, "a", "bc", "No.", "\x01"]) for _ in range(rng.randint(0, 12))
        )
        values.append(text if rng.random() < 0.9 else text + rng.choice(SPACES[-4:]) + "é")
    values += values[:500]  # repeated texts
    array = pa.array(["pad", *values], pa.string()).slice(1)
    assert rg4.normalise_texts(array).to_pylist() == [_text(v) for v in values]
    only_ascii = [v for v in values if v is None or v.isascii()]
    assert rg4.normalise_texts(pa.array(only_ascii, pa.string())).to_pylist() == [
        _text(v) for v in only_ascii
    ]
    assert rg4.normalise_texts(pa.array([None, None], pa.string())).to_pylist() == [None, None]


def test_whitespace_is_what_str_strip_strips():
    from workflow.rg4.scenarios import WHITESPACE

    assert "".join(chr(c) for c in range(0x110000) if chr(c).isspace()) == WHITESPACE
