"""Release folders load with `datasets` exactly as their card says."""

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from workflow.cards import CardSpec, licence_text, load_spec, quoted_config, write_release
from workflow.cards import main as cards_main

REPO = Path(__file__).resolve().parents[1]


def _table(n, splits):
    return pa.table(
        {
            "study_id": pa.array(range(50000000, 50000000 + n), pa.int64()),
            "split": pa.array([splits[i % len(splits)] for i in range(n)]),
            "question": pa.array([f"is there {{x}} #{i}?" for i in range(n)]),
        }
    )


@pytest.fixture
def release(tmp_path):
    paths = {}
    for name, splits in {"sn": ["train", "val", "test"], "mw": ["train", "test"]}.items():
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(_table(12, splits), paths[name])
    spec = CardSpec(
        title="Test set",
        description="Questions.",
        sources=["synthetic"],
        columns={"study_id": "MIMIC study id"},
    )
    out = tmp_path / "release"
    counts = write_release(paths, out, spec, licence_text("mimic", False), "corpus:\n  format: mimic\n")
    return out, counts


def test_counts_and_files_per_split(release):
    out, counts = release
    assert counts == {"sn": {"train": 4, "validation": 4, "test": 4}, "mw": {"train": 6, "test": 6}}
    assert sorted(p.name for p in (out / "mw").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]


def test_card_header_declares_configs_and_licence(release):
    out, _ = release
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert [c["config_name"] for c in header["configs"]] == ["sn", "mw"]
    assert "Data Use Agreement" in text
    assert "| sn | 4 | 4 | 4 | 12 |" in text
    assert "| `study_id` | `int64` | MIMIC study id |" in text


def test_loads_with_datasets(release, tmp_path):
    out, _ = release
    cache = str(tmp_path / "hf")
    by_card = datasets.load_dataset(str(out), "sn", cache_dir=cache)
    assert {k: v.num_rows for k, v in by_card.items()} == {"train": 4, "validation": 4, "test": 4}
    assert set(by_card["validation"]["source_split"]) == {"val"}  # the source's own name stays
    by_parquet = datasets.load_dataset("parquet", data_dir=str(out / "mw"), cache_dir=cache)
    assert {k: v.num_rows for k, v in by_parquet.items()} == {"train": 6, "test": 6}
    assert by_parquet["train"][0]["question"].startswith("is there {x}")


def test_a_table_read_in_many_batches_is_released_row_for_row(tmp_path, monkeypatch):
    """The split files are written a batch at a time: each holds its split's rows in the table's order,
    whatever the batch size, and a row without a split is in none of them."""
    import workflow.cards as cards

    n = 5000
    splits = ["train"] * 7 + ["validate", "test", None]
    table = pa.table(
        {
            "study_id": pa.array(range(50000000, 50000000 + n), pa.int64()),
            "split": pa.array([splits[(i * 7919) % len(splits)] for i in range(n)], pa.string()),
            "question": pa.array([f"is there {{x}} #{i}? " + "word " * (i % 40) for i in range(n)]),
        }
    )
    pq.write_table(table, tmp_path / "default.parquet", row_group_size=1500)
    monkeypatch.setattr(cards, "BATCH_BYTES", 20_000)  # batches of a few hundred rows
    spec = CardSpec(title="VQA", description="Questions.", sources=["synthetic"])
    counts = write_release({"default": tmp_path / "default.parquet"}, tmp_path / "out", spec, "", "")
    expected = {"train": "train", "validation": "validate", "test": "test"}
    assert counts == {"default": {s: splits.count(v) * n // len(splits) for s, v in expected.items()}}
    for hf_name, source_name in expected.items():
        path = tmp_path / "out" / "default" / f"{hf_name}-00000-of-00001.parquet"
        assert pq.ParquetFile(path).metadata.num_row_groups > 1  # written in several batches
        written = pq.read_table(path)
        rows = table.filter(pc.equal(table["split"], source_name))
        assert written["study_id"].to_pylist() == rows["study_id"].to_pylist()
        assert written["question"].to_pylist() == rows["question"].to_pylist()
        assert set(written["split"].to_pylist()) == {hf_name}
        assert set(written["source_split"].to_pylist()) == {source_name}


def test_empty_configuration_is_counted_but_not_declared(tmp_path):
    pq.write_table(_table(6, ["train", "test"]), tmp_path / "sn.parquet")
    pq.write_table(_table(0, ["train"]), tmp_path / "sw.parquet")
    spec = CardSpec(title="IU", description="No priors.", sources=["IU X-Ray"])
    paths = {"sn": tmp_path / "sn.parquet", "sw": tmp_path / "sw.parquet"}
    counts = write_release(
        paths, tmp_path / "out", spec, licence_text("iu", False), "corpus:\n  format: iu\n"
    )
    assert counts["sw"] == {}
    text = (tmp_path / "out" / "README.md").read_text()
    assert [c["config_name"] for c in yaml.safe_load(text.split("---")[1])["configs"]] == ["sn"]
    assert "| sw | 0 | 0 | 0 |" in text and "non-commercial" in text


@pytest.mark.parametrize(
    ("spec_name", "sections"),
    [("medical_cxr_vqa", {"corpus", "vqa", "llm"}), ("mimic_rg4", {"corpus", "rg4"})],
)
def test_card_from_its_quoted_config_equals_the_card_from_the_whole_config(tmp_path, spec_name, sections):
    """The workflow passes a release only the keys its card reads: the card must not lose anything by it."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    quoted = quoted_config(config, load_spec(spec_name))
    assert set(quoted) == sections
    if "llm" in sections:
        assert quoted["llm"] == {"backend": "rules"}  # a fact the card states, not the whole llm section
    pq.write_table(_table(12, ["train", "test"]), tmp_path / "default.parquet")
    cards = {}
    for name, given in (("whole", config), ("quoted", quoted)):
        cards_main(["--table", f"default={tmp_path / 'default.parquet'}", "--spec", spec_name,
                    "--config-json", json.dumps(given), "--corpus-format", "mimic", "--demo", "--out", str(tmp_path / name)])  # fmt: skip
        cards[name] = (tmp_path / name / "README.md").read_text()
    assert cards["quoted"] == cards["whole"]


def _breakdown_with_pandas(tables, spec):
    """The breakdown sections as pandas defines them (group-by size, value_counts): what
    :func:`workflow.cards.breakdown_sections` counts in Arrow."""
    from workflow.cards import SPLIT_ORDER, _markdown_table, hf_splits

    b = spec.breakdown
    col, answers, reference = b["column"], b["answers"], b.get("reference") or {}
    sections = []
    for name, table in tables.items():
        df = table.select([col, "split", answers])
        df = df.set_column(1, "split", hf_splits(df["split"])).to_pandas()
        counts = df.groupby([col, "split"]).size().unstack(fill_value=0)
        splits = [s for s in SPLIT_ORDER if s in counts.columns]
        splits += sorted(set(counts.columns) - set(SPLIT_ORDER))
        order = [v for v in reference if v in counts.index] + sorted(set(counts.index) - set(reference))
        total = int(counts.to_numpy().sum())
        ref_total = sum(reference.values())
        rows = []
        for v in order:
            n = int(counts.loc[v].sum())
            ref = reference.get(v)
            rows.append([v, *(int(counts.loc[v, s]) for s in splits), n, f"{100 * n / total:.1f} %",
                         f"{ref:,}" if ref else "", f"{100 * ref / ref_total:.1f} %" if ref else ""])  # fmt: skip
        header = [col, *splits, "total", "share", f"{b['reference_name']} count", "reference share"]
        text = f"## {col.replace('_', ' ').capitalize()} counts ({name})\n" + _markdown_table(header, rows)
        sections.append(text + ("\n\n" + b["note"].strip() if b.get("note") else ""))
        top = int(b["max_answers"])
        parts = [f"## Answer vocabulary ({name})\nDistinct answers per {col} with their counts"
                 f" (at most {top} listed, most frequent first)."]  # fmt: skip
        for v in order:
            vc = df.loc[df[col] == v, answers].value_counts()
            listed = "; ".join(f"`{a}` ({n:,})" for a, n in vc.head(top).items())
            more = f"; … {len(vc) - top:,} more" if len(vc) > top else ""
            parts.append(f"- **{v}** ({len(vc):,} distinct): {listed}{more}")
        sections.append("\n".join(parts))
    return sections


def test_breakdown_counts_as_pandas_with_ties_nulls_and_chunks():
    """Equal counts keep the order of first appearance (pandas' stable value_counts); null types, splits
    and answers are left out; more distinct answers than are listed; a table of several chunks."""
    from workflow.cards import breakdown_sections

    rng = np.random.default_rng(7)
    n = 30_000
    types = np.array(["presence", "view", "level", "location", "a type outside the reference", None])
    splits = np.array(["train", "validate", "test", "val", "other", None], dtype=object)
    answers = np.array([f"answer {i}" for i in range(60)] + [None], dtype=object)
    table = pa.table(
        {
            "question_type": pa.array(types[rng.integers(0, len(types), n)], pa.string()),
            "split": pa.array(splits[rng.choice(len(splits), n, p=[0.6, 0.1, 0.1, 0.1, 0.05, 0.05])]),
            # answers in blocks of four equal codes: many ties
            "answer": pa.array(answers[rng.integers(0, len(answers), n) // 4 * 4], pa.string()),
        }
    )
    spec = load_spec("medical_cxr_vqa")
    spec.breakdown["max_answers"] = 10
    tables = {"default": pa.Table.from_batches(table.to_batches(max_chunksize=4_000)), "small": table[:50]}
    assert breakdown_sections(tables, spec) == _breakdown_with_pandas(tables, spec)
