"""Benchmark of the vqa rule at MIMIC-CXR scale (227,835 studies, ~377k images).

The inputs are generated directly here (not from the synthetic report corpus): findings in the
FINDINGS schema with per-finding prevalences, negation rates, locations, levels and types of the order
seen in MIMIC-CXR reports, images with MIMIC's view mix. The same generator (small n) feeds the tests.

    .venv/bin/python bench/bench_vqa.py [--studies 227835] [--out bench/cache/vqa]

prints wall and CPU time of each job of `workflow.vqa` (its shards, then the merge, run as the rules
run them: subprocesses on Parquet files) and the largest peak RSS, and compares the per-type counts with the released Medical-CXR-VQA dataset.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow.contract import FINDINGS, IMAGES, KEYINFO_STUDIES, STUDIES  # noqa: E402
from workflow.vqa.stats import RELEASED_COUNTS as RELEASED  # noqa: E402

# name: (positive rate, negated rate, P(location | positive), P(level | positive), types)
PROFILE = {
    "pleural effusion": (0.24, 0.35, 0.75, 0.45, ["layering", "loculated"]),
    "pneumothorax": (0.04, 0.45, 0.8, 0.5, ["loculated"]),
    "atelectasis": (0.22, 0.04, 0.8, 0.25, ["plate-like", "subsegmental", "linear", "compressive"]),
    "consolidation": (0.07, 0.30, 0.7, 0.1, ["focal", "patchy", "multifocal"]),
    "pneumonia": (0.08, 0.12, 0.5, 0.05, ["multifocal", "aspiration"]),
    "edema": (0.12, 0.15, 0.2, 0.6, ["interstitial", "alveolar"]),
    "vascular congestion": (0.07, 0.05, 0.1, 0.45, []),
    "cardiomegaly": (0.20, 0.06, 0.0, 0.5, []),
    "enlarged cardiomediastinum": (0.04, 0.05, 0.0, 0.3, []),
    "lung opacity": (0.22, 0.04, 0.8, 0.2, ["patchy", "hazy", "airspace", "streaky", "ground-glass"]),
    "nodule": (0.03, 0.01, 0.7, 0.1, ["calcified", "nodular"]),
    "mass": (0.01, 0.01, 0.7, 0.2, []),
    "granuloma": (0.02, 0.0, 0.6, 0.0, ["calcified"]),
    "emphysema": (0.03, 0.0, 0.2, 0.3, []),
    "hyperinflation": (0.02, 0.0, 0.0, 0.2, []),
    "fibrosis": (0.01, 0.0, 0.5, 0.2, ["interstitial"]),
    "scarring": (0.03, 0.0, 0.7, 0.1, ["linear"]),
    "pleural thickening": (0.02, 0.0, 0.6, 0.1, []),
    "blunting of the costophrenic angle": (0.02, 0.01, 0.8, 0.2, []),
    "interstitial markings": (0.02, 0.0, 0.2, 0.3, ["reticular"]),
    "fracture": (0.03, 0.02, 0.6, 0.0, ["healed", "displaced", "nondisplaced", "chronic"]),
    "hiatal hernia": (0.02, 0.0, 0.0, 0.3, []),
    "calcification": (0.03, 0.0, 0.4, 0.0, []),
    "pneumomediastinum": (0.003, 0.02, 0.0, 0.1, []),
    "subcutaneous emphysema": (0.01, 0.01, 0.6, 0.3, []),
    "pneumoperitoneum": (0.002, 0.01, 0.0, 0.2, []),
    "pericardial effusion": (0.005, 0.01, 0.0, 0.3, []),
    "tortuous aorta": (0.05, 0.0, 0.0, 0.3, []),
    "aortic calcification": (0.04, 0.0, 0.0, 0.2, []),
    "scoliosis": (0.02, 0.0, 0.0, 0.3, []),
    "degenerative changes": (0.04, 0.0, 0.5, 0.2, []),
    "elevated hemidiaphragm": (0.03, 0.0, 0.95, 0.3, []),
    "bronchiectasis": (0.005, 0.0, 0.5, 0.1, []),
    "lymphadenopathy": (0.01, 0.01, 0.5, 0.1, []),
    "aspiration": (0.01, 0.01, 0.6, 0.0, []),
    "hilar congestion": (0.01, 0.0, 0.3, 0.3, []),
    "heart failure": (0.02, 0.01, 0.0, 0.3, ["chronic", "acute"]),
    "lesion": (0.01, 0.0, 0.6, 0.0, []),
    "hematoma": (0.003, 0.0, 0.5, 0.2, []),
    "support device": (0.40, 0.0, 0.0, 0.0, []),
}
LOCATIONS = [  # (location, weight) for findings that have one
    ("left", 8),
    ("right", 8),
    ("bilateral", 10),
    ("left basal", 8),
    ("right basal", 7),
    ("bilateral basal", 9),
    ("left lower lobe", 7),
    ("right lower lobe", 6),
    ("right middle lobe", 3),
    ("left upper lobe", 3),
    ("right upper lobe", 3),
    ("retrocardiac", 6),
    ("left retrocardiac", 2),
    ("bilateral perihilar", 3),
    ("right apical", 2),
    ("left apical", 2),
    ("lingula", 2),
    ("right hilum", 1),
    ("left costophrenic angle", 2),
    ("right costophrenic angle", 2),
    ("bilateral lower", 2),
    ("right lower", 2),
    ("left lower", 2),
]
LEVELS = (["minimal", "mild", "moderate", "severe", "massive"], [0.1, 0.42, 0.3, 0.14, 0.04])


def synthetic_inputs(
    n_studies: int = 227_835, n_subjects: int | None = None, seed: int = 0, unknown_rate: float = 0.02
):
    """(findings, images, studies) DataFrames in the contract's schemas, MIMIC-like distributions."""
    rng = np.random.default_rng(seed)
    vocab = yaml.safe_load((REPO / "libs" / "vocabulary.yaml").read_text())["findings"]
    names = [n for n in vocab if n in PROFILE]
    n_subjects = n_subjects or max(1, round(n_studies * 65_379 / 227_835))
    subject = np.sort(rng.integers(n_subjects, size=n_studies)) + 10_000_000
    study_id = 50_000_000 + rng.choice(9_999_999, size=n_studies, replace=False)
    subj_split = rng.choice(["train", "validate", "test"], p=[0.978, 0.008, 0.014], size=n_subjects)
    split = subj_split[subject - 10_000_000]
    studies = pd.DataFrame(
        {
            "subject_id": subject,
            "study_id": study_id,
            "split": split,
            "study_datetime": pd.Timestamp("2150-01-01"),
            "report": "",
            "source_path": "",
        }
    )

    # views: portable AP only, PA + lateral, AP + lateral, lateral only / unknown view (no frontal)
    kind = rng.choice(4, p=[0.50, 0.39, 0.06, 0.05], size=n_studies)
    layouts = {0: ["AP"], 1: ["PA", "LATERAL"], 2: ["AP", "LATERAL"], 3: ["LATERAL"]}
    img_study, img_view = [], []
    for k, views in layouts.items():
        idx = np.flatnonzero(kind == k)
        for v in views:
            img_study.append(idx)
            img_view.append(np.full(len(idx), v, dtype=object))
        extra = idx[rng.random(len(idx)) < 0.25]  # repeated / extra views
        img_study.append(extra)
        img_view.append(rng.choice(np.array(["AP", "LL", "LATERAL", ""], dtype=object), size=len(extra)))
    s = np.concatenate(img_study)
    v = np.concatenate(img_view)
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    dicom = pd.Series(np.arange(len(s))).map(lambda i: f"{i:08x}-dcm").to_numpy()
    meaning = (
        pd.Series(v)
        .map({"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral", "LL": "left lateral"})
        .to_numpy()
    )
    images = pd.DataFrame(
        {
            "dicom_id": dicom,
            "subject_id": subject[s],
            "study_id": study_id[s],
            "split": split[s],
            "view_position": v,
            "view_code_meaning": meaning,
            "image_path": [
                f"files/p{str(a)[:2]}/p{a}/s{b}/{d}.jpg"
                for a, b, d in zip(subject[s], study_id[s], dicom, strict=True)
            ],
        }
    )

    # findings: ~28 % of studies are normal; the rest carry the prevalences above (scaled)
    sick = np.where(rng.random(n_studies) < 0.28, 0.03, 1.35)
    prof = [PROFILE[n] for n in names]
    pos_rate = np.array([p[0] for p in prof])
    neg_rate = np.array([p[1] for p in prof])
    r = rng.random((n_studies, len(names)))
    pos = r < sick[:, None] * pos_rate
    unc = ~pos & (r < sick[:, None] * pos_rate * 1.15)
    neg = ~pos & ~unc & (rng.random((n_studies, len(names))) < neg_rate)
    rows = []
    loc_names = np.array([loc for loc, _ in LOCATIONS], dtype=object)
    loc_w = np.array([w for _, w in LOCATIONS], dtype=float)
    for presence, m in (("positive", pos), ("uncertain", unc), ("negative", neg)):
        si, ni = np.nonzero(m)
        if presence == "positive":  # 6 % of positive findings are reported twice (two places)
            dup = rng.random(len(si)) < 0.06
            si, ni = np.r_[si, si[dup]], np.r_[ni, ni[dup]]
        k = len(si)
        p_loc = np.array([p[2] for p in prof])[ni]
        p_lev = np.array([p[3] for p in prof])[ni]
        has_loc = (rng.random(k) < p_loc) & (presence != "negative")
        loc = np.where(has_loc, rng.choice(loc_names, p=loc_w / loc_w.sum(), size=k), None)
        level = np.where(
            (rng.random(k) < p_lev) & (presence == "positive"),
            rng.choice(LEVELS[0], p=LEVELS[1], size=k),
            None,
        )
        typ = np.full(k, None, dtype=object)
        for j, p in enumerate(prof):
            sel = np.flatnonzero((ni == j) & (rng.random(k) < 0.35)) if p[4] else np.zeros(0, int)
            typ[sel] = rng.choice(np.array(p[4], dtype=object), size=len(sel))
        rows.append(
            pd.DataFrame(
                {
                    "study_id": study_id[si],
                    "subject_id": subject[si],
                    "name": np.asarray(names, dtype=object)[ni],
                    "presence": presence,
                    "location": loc,
                    "level": level,
                    "type": typ,
                }
            )
        )
    unk = np.flatnonzero(rng.random(n_studies) < unknown_rate)
    rows.append(
        pd.DataFrame(
            {
                "study_id": study_id[unk],
                "subject_id": subject[unk],
                "name": "unknown",
                "presence": "positive",
                "location": None,
                "level": None,
                "type": None,
            }
        )
    )
    findings = pd.concat(rows, ignore_index=True).sort_values("study_id", kind="stable")
    # the surface text keeps the report's level word ("small effusion" -> level mild), as extraction does
    lib = pd.read_csv(REPO / "libs" / "levels.csv")
    lib = lib[~lib["phrase"].str.contains(" ")]
    word = pd.Series(None, index=findings.index, dtype=object)
    for level, phrases in lib.groupby("level")["phrase"]:
        sel = (findings["level"] == level).to_numpy()
        word[sel] = rng.choice(phrases.to_numpy()[:4], size=int(sel.sum()))
    findings = findings.assign(
        raw_name=(word.fillna("") + " " + findings["name"]).str.strip(),
        change=None,
        section="findings",
        start=None,
        end=None,
        source="rules",
        round=0,
        request_hash=None,
    )
    return findings.reset_index(drop=True), images, studies


def keyinfo_status(findings: pd.DataFrame, studies: pd.DataFrame, unread_rate: float = 0.01, seed: int = 0):
    """A KEYINFO_STUDIES-like table: normal (no positive/uncertain finding), abnormal, or unknown."""
    rng = np.random.default_rng(seed)
    f = findings[findings["name"] != "support device"]
    sick = set(f.loc[f["presence"].isin(["positive", "uncertain"]), "study_id"])
    status = np.where(studies["study_id"].isin(sick), "abnormal", "normal").astype(object)
    status[rng.random(len(studies)) < unread_rate] = "unknown"
    n = f.groupby(["study_id", "presence"]).size().unstack(fill_value=0)
    n = n.reindex(columns=["positive", "uncertain", "negative"], fill_value=0).reindex(
        studies["study_id"], fill_value=0
    )
    return pd.DataFrame(
        {
            "subject_id": studies["subject_id"].to_numpy(),
            "study_id": studies["study_id"].to_numpy(),
            "status": status,
            "normal_evidence": np.where(status == "normal", "No acute cardiopulmonary process.", None),
            "n_positive": n["positive"].to_numpy().astype("int32"),
            "n_uncertain": n["uncertain"].to_numpy().astype("int32"),
            "n_negative": n["negative"].to_numpy().astype("int32"),
        }
    )


def to_contract(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """``df`` as a table of ``schema``; columns the generator does not fill are null."""
    missing = {f.name: None for f in schema if f.name not in df.columns}
    return pa.Table.from_pandas(df.assign(**missing)[schema.names], schema=schema, preserve_index=False)


def write_inputs(out: Path, n_studies: int, seed: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    findings, images, studies = synthetic_inputs(n_studies, seed=seed)
    paths = {
        "findings": out / "findings.parquet",
        "images": out / "images.parquet",
        "studies": out / "studies.parquet",
        "keyinfo-studies": out / "keyinfo_studies.parquet",
    }
    for key, df, schema in (
        ("findings", findings, FINDINGS),
        ("images", images, IMAGES),
        ("studies", studies, STUDIES),
        ("keyinfo-studies", keyinfo_status(findings, studies, seed=seed), KEYINFO_STUDIES),
    ):
        pq.write_table(to_contract(df, schema), paths[key])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=227_835)
    ap.add_argument("--out", default=str(REPO / "bench" / "cache" / "vqa"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leak-probe-max", type=int, default=200_000)
    ap.add_argument("--style", default="medical_cxr_vqa", choices=["medical_cxr_vqa", "clean"])
    ap.add_argument("--shards", type=int, default=2, help="vqa.shards: shard jobs before the merge")
    ap.add_argument("--reuse-inputs", action="store_true", help="keep the inputs of an earlier run")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.reuse_inputs and (out / "in" / "keyinfo_studies.parquet").exists():
        paths = {
            k: out / "in" / f"{k.replace('-', '_')}.parquet"
            for k in ("findings", "images", "studies", "keyinfo-studies")
        }
    else:
        paths = write_inputs(out / "in", args.studies, args.seed)
    print(
        f"inputs: {time.perf_counter() - t0:.1f} s "
        f"({pq.read_metadata(paths['findings']).num_rows:,} finding rows, "
        f"{pq.read_metadata(paths['images']).num_rows:,} images)"
    )
    shard_cmd = [
        sys.executable,
        "-m",
        "workflow.vqa",
        "shard",
        "--findings",
        str(paths["findings"]),
        "--images",
        str(paths["images"]),
        "--studies",
        str(paths["studies"]),
        "--keyinfo-studies",
        str(paths["keyinfo-studies"]),
        "--style",
        args.style,
        "--seed",
        str(args.seed),
        "--names",
        str(REPO / "libs" / "findings.csv"),
        "--shards",
        str(args.shards),
    ]
    shard_out = [
        (out / f"shard{k}" / "questions.parquet", out / f"shard{k}" / "rejects.parquet")
        for k in range(args.shards)
    ]
    merge_cmd = [sys.executable, "-m", "workflow.vqa", "merge", "--seed", str(args.seed)]
    merge_cmd += [
        "--leak-probe-max",
        str(args.leak_probe_max),
        "--shard-questions",
        *(str(q) for q, _ in shard_out),
    ]
    merge_cmd += ["--shard-rejects", *(str(r) for _, r in shard_out)]
    for key, name in (
        ("questions", "questions.parquet"),
        ("csv", "questions.csv"),
        ("stats", "stats.parquet"),
        ("stats-csv", "stats.csv"),
        ("leak", "leak.csv"),
        ("rejects", "rejects.parquet"),
    ):
        merge_cmd += [f"--{key}", str(out / name)]
    # the jobs one after the other (as on one core): each job's wall and CPU, the largest peak RSS
    jobs = [
        (f"shard {k}", [*shard_cmd, "--shard", str(k), "--questions", str(q), "--rejects", str(r)])
        for k, (q, r) in enumerate(shard_out)
    ]
    for name, cmd in [*jobs, ("merge", merge_cmd)]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
        print(f"vqa {name}: {wall:.2f} s wall, {cpu:.2f} s CPU (load average {os.getloadavg()[0]:.1f})")
    print(f"vqa: peak RSS of the largest job {usage.ru_maxrss / 1024:.0f} MB")
    q = pq.read_table(out / "questions.parquet", columns=["question_type"]).to_pandas()
    counts = q["question_type"].value_counts()
    scale = args.studies / 227_835
    print(f"{'type':<12}{'ours':>10}{'released':>11}{'ratio':>8}")
    for t, n in RELEASED.items():
        ours = int(counts.get(t, 0))
        print(f"{t:<12}{ours:>10,}{round(n * scale):>11,}{ours / (n * scale):>8.2f}")
    print(f"{'total':<12}{len(q):>10,}{round(sum(RELEASED.values()) * scale):>11,}")
    print(pd.read_csv(out / "leak.csv").to_string(index=False))


if __name__ == "__main__":
    main()
