"""Release folders load with `datasets` exactly as their card says."""

import json
from pathlib import Path

import datasets
import pyarrow as pa
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
