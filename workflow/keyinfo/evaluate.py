"""Quality of key-information extraction: against the synthetic corpus truth and against hand labels.

* :func:`score_mentions` — mention-level scoring against ``truth.parquet`` of ``tools.synth`` (one row per
  finding mention per section): rows are paired within (study, section, name), best attribute agreement
  first; presence-aware F1 counts a pair as a hit only when the presence matches too; every attribute is
  then scored as exact match over the paired rows (both null counts as a match).
* :func:`synth_predictions` — run the rules extractor over a synthetic corpus directory.
* :func:`chexpert14` / :func:`score_labels` — report-level 14-class labels (CheXpert names) and their
  micro-F1 against hand labels, with the uncertainty policy stated (``u_ones``: uncertain counts as
  positive; ``presence``: all three presences must match, blank = not mentioned).

``python -m workflow.keyinfo.evaluate --synth DIR`` prints the tables.
"""

from __future__ import annotations

import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from workflow.keyinfo.extract import extract_mentions, merge_presence
from workflow.keyinfo.libs import load_libs, no_finding

FIELDS = ("location", "level", "type", "change")
CHEXPERT14 = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)  # fmt: skip


def _pair_score(p: dict, t: dict) -> int:
    return 8 * (p["presence"] == t["presence"]) + sum(p.get(f) == t.get(f) for f in FIELDS)


def score_mentions(pred: list[dict], truth: list[dict]) -> dict:
    """Presence-aware and name-only micro P/R/F1 plus per-field exact match on paired rows."""
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in pred:
        groups[(r["study_id"], r["section"], r["name"])][0].append(r)
    for r in truth:
        groups[(r["study_id"], r["section"], r["name"])][1].append(r)
    tp = tp_name = 0
    field_hits: Counter = Counter()
    pairs = 0
    errors: list[dict] = []
    per_name: dict[str, Counter] = defaultdict(Counter)
    for (study, section, name), (ps, ts) in groups.items():
        cand = sorted(
            ((_pair_score(p, t), i, j) for i, p in enumerate(ps) for j, t in enumerate(ts)), reverse=True
        )
        used_p, used_t = set(), set()
        for _score, i, j in cand:
            if i in used_p or j in used_t:
                continue
            used_p.add(i)
            used_t.add(j)
            p, t = ps[i], ts[j]
            tp_name += 1
            pairs += 1
            ok = p["presence"] == t["presence"]
            tp += ok
            per_name[name]["tp" if ok else "wrong_presence"] += 1
            for f in FIELDS:
                hit = p.get(f) == t.get(f)
                field_hits[f] += hit
                if not hit or not ok:
                    errors.append({"study_id": study, "section": section, "name": name, "field": f if ok else "presence",
                                   "pred": p.get(f) if ok else p["presence"], "truth": t.get(f) if ok else t["presence"],
                                   "sentence": t.get("sentence")})  # fmt: skip
        for i, p in enumerate(ps):
            if i not in used_p:
                per_name[name]["fp"] += 1
                errors.append({"study_id": study, "section": section, "name": name, "field": "spurious",
                               "pred": p["presence"], "truth": None, "sentence": p.get("raw_name")})  # fmt: skip
        for j, t in enumerate(ts):
            if j not in used_t:
                per_name[name]["fn"] += 1
                errors.append({"study_id": study, "section": section, "name": name, "field": "missed",
                               "pred": None, "truth": t["presence"], "sentence": t.get("sentence")})  # fmt: skip

    def prf(hits: int) -> dict:
        p = hits / len(pred) if pred else 0.0
        r = hits / len(truth) if truth else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}

    return {
        "n_pred": len(pred),
        "n_truth": len(truth),
        "presence_aware": prf(tp),
        "name_only": prf(tp_name),
        "fields": {f: field_hits[f] / pairs if pairs else 0.0 for f in FIELDS},
        "pairs": pairs,
        "per_name": {k: dict(v) for k, v in per_name.items()},
        "errors": errors,
    }


def synth_reports(corpus: Path) -> dict[int, tuple[int, str]]:
    """study_id -> (subject_id, report text) of a synthetic corpus (the zip, else the files/ tree)."""
    out: dict[int, tuple[int, str]] = {}
    zpath = corpus / "mimic-cxr-reports.zip"
    if zpath.exists():
        with zipfile.ZipFile(zpath) as zf:
            for name in zf.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[3].startswith("s") and parts[3].endswith(".txt"):
                    out[int(parts[3][1:-4])] = (int(parts[2][1:]), zf.read(name).decode("utf-8"))
        return out
    for path in (corpus / "files").glob("p*/p*/s*.txt"):
        out[int(path.stem[1:])] = (int(path.parent.name[1:]), path.read_text(encoding="utf-8"))
    return out


def synth_predictions(corpus: Path) -> list[dict]:
    """Mention rows (study_id, section, name, presence, attributes) of the rules extractor on a corpus."""
    from workflow.sections import split_report_fast

    libs = load_libs()
    rows = []
    for study_id, (_subject, text) in synth_reports(corpus).items():
        if not text.strip():
            continue
        sections = split_report_fast(text.replace("\r\n", "\n"))
        for m in extract_mentions(sections, libs):
            rows.append({"study_id": study_id, "section": m.section, "name": m.name, "presence": m.presence,
                         "location": m.location(libs), "level": m.level, "type": m.type, "change": m.change,
                         "raw_name": m.raw})  # fmt: skip
    return rows


def score_synth(corpus: Path) -> dict:
    """Score the rules extractor on a corpus; studies the generator marks ``bad`` (no truth) are left out."""
    truth = pq.read_table(corpus / "truth.parquet").to_pylist()
    pred = synth_predictions(corpus)
    studies = corpus / "truth_studies.parquet"
    if studies.exists():
        bad = {
            r["study_id"] for r in pq.read_table(studies, columns=["study_id", "bad"]).to_pylist() if r["bad"]
        }
        pred = [r for r in pred if r["study_id"] not in bad]
    return score_mentions(pred, truth)


# ---- report-level classes: CheXpert's 14 and ChestX-ray14's 14 (+ No Finding) --------------------------------
CXR14 = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "No Finding", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)  # fmt: skip
LABEL_SETS = {"chexpert": CHEXPERT14, "cxr14": CXR14}
# the hand labels write ChestX-ray14's two classes that CheXpert also has under CheXpert's names
GOLD_NAME = {"cxr14": {"Pleural Effusion": "Effusion", "Pleural Thickening": "Pleural_Thickening"}}
# CheXpert's conventions: these findings speak for a class only as uncertain, and never deny it
ONLY_UNCERTAIN = frozenset(("vascular congestion", "blunting of the costophrenic angle"))


def report_labels(rows: list, scheme: str = "chexpert") -> dict[str, str]:
    """Class -> merged presence of a report's findings rows (name, presence pairs or dicts).

    The class of each canonical finding is a column of ``libs/findings.csv`` (``chexpert`` / ``cxr14``).
    No Finding is positive when no finding at all (devices aside) is positive or uncertain — granuloma,
    scoliosis and the other findings without a class block it too (CheXpert's rule, kept for both sets).
    """
    libs = load_libs()
    mapping = libs.chexpert if scheme == "chexpert" else libs.cxr14
    pairs = []
    named = [(r["name"], r["presence"]) if isinstance(r, dict) else tuple(r) for r in rows]
    for name, presence in named:
        cls = mapping.get(name)
        if not cls:
            continue
        if name in ONLY_UNCERTAIN:
            if presence == "negative":
                continue  # "normal pulmonary vascularity" says nothing about edema
            presence = "uncertain"
        pairs.append((cls, presence))
    labels = merge_presence(pairs)
    if no_finding(named, "any"):
        labels["No Finding"] = "positive"
    return labels


def chexpert14(rows: list) -> dict[str, str]:
    """CheXpert's 14 classes of a report's findings rows (:func:`report_labels`)."""
    return report_labels(rows, "chexpert")


def score_labels(pred: dict[object, dict[str, str]], gold: dict[object, dict[str, str]],
                 policy: str = "u_ones", classes: tuple[str, ...] = CHEXPERT14) -> dict:  # fmt: skip
    """Micro P/R/F1 over (report, class) of ``gold``'s reports.

    ``u_ones``: the positive class is positive-or-uncertain (blank and negative are the other class);
    ``presence``: a hit needs the same presence (positive / uncertain / negative), blank never counts.
    """
    tp = fp = fn = 0
    per_class: dict[str, Counter] = defaultdict(Counter)
    per_presence: dict[str, Counter] = defaultdict(Counter)
    for report, g in gold.items():
        p = pred.get(report, {})
        for cls in classes:
            gv, pv = g.get(cls), p.get(cls)
            for value in ("positive", "uncertain", "negative"):
                per_presence[value]["tp"] += gv == value and pv == value
                per_presence[value]["fp"] += pv == value and gv != value
                per_presence[value]["fn"] += gv == value and pv != value
            if policy == "u_ones":
                gpos = gv in ("positive", "uncertain")
                ppos = pv in ("positive", "uncertain")
                tp_, fp_, fn_ = gpos and ppos, ppos and not gpos, gpos and not ppos
            else:
                tp_ = gv is not None and gv == pv
                fp_ = pv is not None and gv != pv
                fn_ = gv is not None and gv != pv
            tp, fp, fn = tp + tp_, fp + fp_, fn + fn_
            per_class[cls]["tp"] += tp_
            per_class[cls]["fp"] += fp_
            per_class[cls]["fn"] += fn_
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    for c in (*per_class.values(), *per_presence.values()):
        c["f1"] = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) if c["tp"] + c["fp"] + c["fn"] else None
        c["support"] = c["tp"] + c["fn"]
    return {"policy": policy, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "tp": tp, "fp": fp, "fn": fn, "per_class": {k: dict(v) for k, v in per_class.items()},
            "per_presence": {k: dict(v) for k, v in per_presence.items()}}  # fmt: skip


def format_fields(result: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key in ("presence_aware", "name_only"):
        m = result[key]
        lines.append(f"| {key} P / R / F1 | {m['precision']:.3f} / {m['recall']:.3f} / {m['f1']:.3f} |")
    for f, v in result["fields"].items():
        lines.append(f"| {f} exact match (paired rows) | {v:.3f} |")
    lines.append(
        f"| rows truth / predicted / paired | {result['n_truth']} / {result['n_pred']} / {result['pairs']} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from workflow.cli import parser as cli_parser

    p = cli_parser("Score the rules extractor against a synthetic corpus' truth.")
    p.add_argument("--synth", required=True, type=Path, help="corpus directory written by tools.synth")
    p.add_argument("--errors", type=int, default=0, help="print this many errors")
    args = p.parse_args(argv)
    result = score_synth(args.synth)
    print(format_fields(result))
    counts = Counter((e["field"], e["name"]) for e in result["errors"])
    for (field, name), n in counts.most_common(15):
        print(f"  {n:5d} {field:10s} {name}")
    for e in result["errors"][: args.errors]:
        print(e)


# ---- IU X-Ray development set --------------------------------------------------------------------------------
def iu_reports(path: Path) -> dict[str, dict[str, str | None]]:
    """uid -> {findings, impression} of ``indiana_reports.csv``."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return {r["uid"]: {"findings": r["findings"] or None, "impression": r["impression"] or None}
                for r in csv.DictReader(fh)}  # fmt: skip


def read_labels(path: Path, sets: tuple[str, ...] | None = None) -> dict[str, dict[str, str]]:
    """uid -> {class: presence} of the hand-label csv (uid, set, finding, presence; tests/data/LABELING.md),
    only the reports of ``sets`` (dev / holdout / blind) when given."""
    import csv

    out: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if sets is None or r["set"] in sets:
                out.setdefault(r["uid"], {})[r["finding"]] = r["presence"]
    return out


def score_iu(reports_csv: Path, labels_csv: Path, sets: tuple[str, ...] | None = None, scheme: str = "chexpert",
             conventions=None) -> dict[str, dict]:  # fmt: skip
    """Report-level scores of the rules extractor on hand-labelled IU reports: all classes of ``scheme``
    and the same without No Finding (``_13``), U-Ones and presence-aware."""
    from workflow.keyinfo.extract import extract_sections

    classes = LABEL_SETS[scheme]
    rename = GOLD_NAME.get(scheme, {})
    gold = {u: {rename.get(k, k): v for k, v in g.items() if rename.get(k, k) in classes}
            for u, g in read_labels(labels_csv, sets).items()}  # fmt: skip
    reports = iu_reports(reports_csv)
    pred = {uid: report_labels(extract_sections(reports[uid], conventions), scheme) for uid in gold}
    without = tuple(c for c in classes if c != "No Finding")
    out = {}
    for policy in ("u_ones", "presence"):
        out[policy] = score_labels(pred, gold, policy, classes)
        out[policy + "_13"] = score_labels(pred, gold, policy, without)
    out["_pred"] = pred
    return out


def format_per_class(result: dict, policy: str = "u_ones") -> str:
    """A Markdown table: class, support (gold positives), TP / FP / FN, F1."""
    lines = ["| class | support | TP / FP / FN | F1 |", "|---|---:|---|---:|"]
    for cls, c in sorted(result[policy]["per_class"].items()):
        f1 = "–" if c["f1"] is None else f"{c['f1']:.3f}"
        lines.append(f"| {cls} | {c['support']} | {c['tp']} / {c['fp']} / {c['fn']} | {f1} |")
    return "\n".join(lines)


def main_iu(argv: list[str] | None = None) -> None:
    from workflow.cli import parser as cli_parser
    from workflow.keyinfo.extract import Conventions

    p = cli_parser("Score the rules extractor against the hand-labelled IU X-Ray reports.")
    p.add_argument("--iu", required=True, type=Path, help="indiana_reports.csv")
    p.add_argument(
        "--gold", type=Path, default=Path(__file__).resolve().parents[2] / "tests/data/iu_labels.csv"
    )
    p.add_argument(
        "--labels", choices=sorted(LABEL_SETS), default="chexpert", help="which 14-class label set"
    )
    p.add_argument(
        "--sets", default="dev,holdout,blind", help="comma-separated label sets (tests/data/LABELING.md)"
    )
    p.add_argument("--alternatives", choices=("uncertain", "positive"), default="uncertain")
    p.add_argument("--hedges", choices=("uncertain", "positive"), default="uncertain")
    args = p.parse_args(argv)
    r = score_iu(args.iu, args.gold, tuple(args.sets.split(",")), args.labels,
                 Conventions(args.alternatives, args.hedges))  # fmt: skip
    for key in ("u_ones", "u_ones_13", "presence", "presence_13"):
        m = r[key]
        print(f"{key:12s} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}")
    print(format_per_class(r))
    print(
        " ".join(f"{k} F1 {v['f1']:.3f} (n={v['support']})" for k, v in r["u_ones"]["per_presence"].items())
    )


if __name__ == "__main__":
    import sys

    main_iu(sys.argv[1:]) if "--iu" in sys.argv else main()
