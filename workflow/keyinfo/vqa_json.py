"""Import / export of the Medical-CXR-VQA KeyInfo JSON (``all_diseases.json``-style).

One record per study: ``study_id``, ``subject_id``, ``dicom_id``, ``view``, ``study_order`` (strings, as the
released file has them) plus ``entity`` / ``uncertain_entity`` (name -> {location, level, type}),
``no_entity`` (list of names) and ``opacity_vs_clear`` ({"opacity": {...}, "clear": {"location": ...}}).

* import: any such file (also the raw, malformed shapes their models emit, and JSON Lines) -> the standardised
  ``findings`` table + audit + unknown terms (``standardise(fmt="vqa")``), so a released file can go straight
  into question generation;
* export: a ``findings`` table -> that JSON, names written with their Medical-CXR-VQA names (``vqa_name`` of
  ``libs/findings.csv``), support devices left out (the dataset ignores them), the post-processed shape
  (``uncertain_entity`` as a dict), several instances of one name flattened as ``"left,right"``;
  with ``--side-files DIR`` also the files the original ``question_gen.py`` reads next to the JSON
  (:func:`write_side_files`), so it can run unmodified on our key information:
  ``DIR/data/mimic_all.csv``, ``DIR/data/type_lib.csv``, ``DIR/libs/disease_lib_llm.csv``,
  ``DIR/libs/{entity,location,level,type}_dict.json`` and ``DIR/libs/{level_lib,location_lib,
  postlocation_lib,position_change}.csv``.

    python -m workflow.keyinfo.vqa_json import --json all_diseases.json --findings F --audit A --unknown U
    python -m workflow.keyinfo.vqa_json export --findings F --studies S --images I --json out.json [--side-files D]
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow.cli import parser as cli_parser
from workflow.cli import setup_logging
from workflow.contract import AUDIT, FINDINGS, UNKNOWN_TERMS
from workflow.keyinfo.libs import load_libs
from workflow.keyinfo.standardise import DEFAULT_FUZZY_CUTOFF, standardise_many
from workflow.tables import summary, write_table

log = logging.getLogger(__name__)
FRONTAL = ("postero-anterior", "antero-posterior")


def read_keyinfo_json(path: str | Path) -> list[dict]:
    """Records of a KeyInfo file: a JSON list, a dict of records, or JSON Lines."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = [{"study_id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    return [r for r in data if isinstance(r, dict)]


def _int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def import_records(records: list[dict], fuzzy_cutoff: float = DEFAULT_FUZZY_CUTOFF, source: str = "llm"):
    """(FINDINGS, AUDIT, UNKNOWN_TERMS) tables of KeyInfo records; records without a study id are skipped."""
    triples = []
    for r in records:
        sid = _int(r.get("study_id"))
        if sid is None:
            log.warning("skipping a KeyInfo record without a study_id")
            continue
        triples.append((_int(r.get("subject_id")), sid, r))
    return standardise_many(triples, "vqa", fuzzy_cutoff, source=source)


def _join(values) -> str | None:
    vals = [v for v in dict.fromkeys(values) if v]
    return ",".join(vals) or None


def keyinfo_of(rows: list[dict]) -> dict:
    """The four KeyInfo categories of one study's findings rows."""
    libs = load_libs()
    entity: dict[str, list[dict]] = {}
    uncertain: dict[str, list[dict]] = {}
    no_entity: list[str] = []
    opacity: list[dict] = []
    clear: list[dict] = []
    for r in rows:
        name = r["name"]
        vqa = libs.vqa_name.get(name, name)
        if not vqa:
            continue  # support devices are not Medical-CXR-VQA findings
        attrs = {"location": r.get("location"), "level": r.get("level"), "type": r.get("type")}
        if name == "lung opacity" and r["presence"] == "positive":
            opacity.append(attrs)
        elif (
            name == "lung opacity"
            and r["presence"] == "negative"
            and "clear" in (r.get("raw_name") or "").lower()
        ):
            clear.append({"location": r.get("location") or "lungs"})
        elif r["presence"] == "positive":
            entity.setdefault(vqa, []).append(attrs)
        elif r["presence"] == "uncertain":
            uncertain.setdefault(vqa, []).append(attrs)
        elif vqa not in no_entity:
            no_entity.append(vqa)

    def flat(group: dict[str, list[dict]]) -> dict:
        return {
            n: {k: _join(a[k] for a in insts) for k in ("location", "level", "type")}
            for n, insts in group.items()
        }

    ovc = {}
    if opacity:
        ovc["opacity"] = {k: _join(a[k] for a in opacity) for k in ("location", "level", "type")}
    if clear:
        ovc["clear"] = {"location": _join(a["location"] for a in clear)}
    no_entity = [n for n in no_entity if n not in entity and n not in uncertain]
    return {
        "opacity_vs_clear": ovc,
        "entity": flat(entity),
        "uncertain_entity": flat(uncertain),
        "no_entity": no_entity,
    }


def study_meta(studies: pa.Table, images: pa.Table | None) -> dict[int, dict]:
    """study_id -> subject_id, dicom_id, view, study_order as Medical-CXR-VQA's mimic_all.csv defines them:
    the first frontal image (else the first image), its view code meaning, the rank (method 'min') of the
    study date within the patient."""
    import pandas as pd

    s = studies.select(["subject_id", "study_id", "study_datetime"]).to_pandas()
    day = pd.to_datetime(s["study_datetime"]).dt.normalize()
    s["study_order"] = day.groupby(s["subject_id"]).rank(method="min")
    meta = {}
    for row in s.itertuples(index=False):
        order = row.study_order
        meta[int(row.study_id)] = {
            "subject_id": str(row.subject_id),
            "dicom_id": None,
            "view": None,
            "study_order": None
            if order is None or (isinstance(order, float) and math.isnan(order))
            else str(order),
        }
    if images is not None:
        first: dict[int, tuple] = {}
        for img in images.select(["study_id", "dicom_id", "view_code_meaning"]).to_pylist():
            sid = img["study_id"]
            frontal = (img["view_code_meaning"] or "") in FRONTAL
            if sid not in first or (frontal and not first[sid][2]):
                first[sid] = (img["dicom_id"], img["view_code_meaning"], frontal)
        for sid, (dicom, view, _f) in first.items():
            if sid in meta:
                meta[sid]["dicom_id"] = dicom
                meta[sid]["view"] = view
    return meta


def export_records(findings: pa.Table, meta: dict[int, dict] | None = None) -> list[dict]:
    """KeyInfo records, one per study of ``meta`` (or of the findings table when no meta is given)."""
    by_study: dict[int, list[dict]] = {}
    subject: dict[int, int] = {}
    for r in findings.to_pylist():
        by_study.setdefault(r["study_id"], []).append(r)
        subject[r["study_id"]] = r["subject_id"]
    ids = list(meta) if meta else list(by_study)
    out = []
    for sid in ids:
        m = (meta or {}).get(sid, {})
        record = {
            "study_id": str(sid),
            "subject_id": m.get("subject_id") or str(subject.get(sid, "")),
            "dicom_id": m.get("dicom_id"),
            "view": m.get("view"),
            "study_order": m.get("study_order"),
        }
        record.update(keyinfo_of(by_study.get(sid, [])))
        out.append(record)
    return out


# The 14 CheXpert columns of mimic_all.csv, in the original's order (MIMIC-CXR-JPG's chexpert.csv).
CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)  # fmt: skip
_CHEXPERT_VALUE = {"positive": 1.0, "uncertain": -1.0, "negative": 0.0}


def frequency_dicts(records: list[dict]) -> dict[str, dict[str, int]]:
    """``entity``/``location``/``level``/``type`` term counts over the records, count-descending.

    The original's counting rule (``get_initial_dicts``): a name counts once per occurrence in
    ``entity``, ``uncertain_entity`` and ``opacity_vs_clear``; an attribute value counts as written.
    """
    from collections import Counter

    counts = {k: Counter() for k in ("entity", "location", "level", "type")}
    for r in records:
        for cat in ("entity", "uncertain_entity", "opacity_vs_clear"):
            for name, attrs in (r.get(cat) or {}).items():
                counts["entity"][name] += 1
                for k in ("location", "level", "type"):
                    value = (attrs or {}).get(k)
                    if isinstance(value, str) and value:
                        counts[k][value] += 1
    return {k: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for k, c in counts.items()}


def mimic_all_rows(records: list[dict], studies: pa.Table | None, findings: pa.Table) -> list[dict]:
    """One ``mimic_all.csv`` row per record: ids, the 14 CheXpert-style labels from our findings (1 / -1 / 0,
    empty when not mentioned), dicom_id, view (code meaning), split, study_date (yyyymmdd), study_order."""
    libs = load_libs()
    labels: dict[int, dict[str, float]] = {}
    rank = {"positive": 3, "uncertain": 2, "negative": 1}
    for r in findings.select(["study_id", "name", "presence"]).to_pylist():
        col = libs.chexpert.get(r["name"])
        if not col or r["presence"] not in rank:
            continue
        mine = labels.setdefault(r["study_id"], {})
        old = mine.get(col)
        new = _CHEXPERT_VALUE[r["presence"]]
        if old is None or rank[r["presence"]] > {1.0: 3, -1.0: 2, 0.0: 1}[old]:
            mine[col] = new
    extra: dict[int, dict] = {}
    if studies is not None:
        cols = [c for c in ("study_id", "split", "study_datetime") if c in studies.column_names]
        for r in studies.select(cols).to_pylist():
            when = r.get("study_datetime")
            extra[r["study_id"]] = {
                "split": r.get("split"),
                "study_date": int(when.strftime("%Y%m%d")) if when is not None else None,
            }
    rows = []
    for rec in records:
        sid = int(rec["study_id"])
        mine = labels.get(sid, {})
        if not any(v == 1.0 for k, v in mine.items() if k != "Support Devices"):
            mine = {**mine, "No Finding": 1.0} if sid in labels else mine
        rows.append(
            {
                "subject_id": rec["subject_id"],
                "study_id": rec["study_id"],
                **{c: mine.get(c) for c in CHEXPERT_COLUMNS},
                "dicom_id": rec.get("dicom_id"),
                "view": rec.get("view"),
                "split": extra.get(sid, {}).get("split"),
                "study_date": extra.get(sid, {}).get("study_date"),
                "study_order": rec.get("study_order"),
            }
        )
    return rows


def disease_lib_rows(records: list[dict]) -> list[dict]:
    """``disease_lib_llm.csv``: one row per Medical-CXR-VQA name we write, ``report_name`` = the name itself.

    The original looks a record's entity up by the first row whose report name is a substring of it;
    rows are ordered longest name first, so every name finds its own row and never a shorter look-alike
    (``effusion`` in ``pericardial effusion``).
    """
    libs = load_libs()
    names = set(libs.vqa_name.values()) - {""}
    for r in records:
        for cat in ("entity", "uncertain_entity", "opacity_vs_clear"):
            names |= set(r.get(cat) or {})
        names |= set(r.get("no_entity") or [])
    lung = {"infiltration", "pulmonary fibrosis", "nodule", "mass", "cyst", "cavity"}
    ordered = sorted(names - {"", "clear"}, key=lambda n: (-len(n), n))
    return [
        {"id": i, "report_name": n, "official_name": n, "location": "lung" if n in lung else ""}
        for i, n in enumerate(ordered)
    ]


def write_side_files(
    records: list[dict], findings: pa.Table, studies: pa.Table | None, out_dir: str | Path
) -> dict[str, Path]:
    """The files the original ``question_gen.py`` reads besides the KeyInfo JSON, in its layout."""
    import csv

    out_dir = Path(out_dir)
    (out_dir / "libs").mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def write_csv(rel: str, header: list[str], rows: list[dict]) -> None:
        path = out_dir / rel
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
        paths[rel] = path

    mimic_all = mimic_all_rows(records, studies, findings)
    header = [
        "subject_id",
        "study_id",
        *CHEXPERT_COLUMNS,
        "dicom_id",
        "view",
        "split",
        "study_date",
        "study_order",
    ]
    write_csv("data/mimic_all.csv", header, mimic_all)
    write_csv(
        "libs/disease_lib_llm.csv",
        ["id", "report_name", "official_name", "location"],
        disease_lib_rows(records),
    )
    for kind, counts in frequency_dicts(records).items():
        path = out_dir / "libs" / f"{kind}_dict.json"
        path.write_text(json.dumps(counts, indent=1), encoding="utf-8")
        paths[f"libs/{kind}_dict.json"] = path
    # phrase lists: the original reads them but its questions do not depend on them (reference §4)
    libs_dir = Path(__file__).resolve().parents[2] / "libs"

    def phrases(fname: str) -> list[str]:
        with (libs_dir / fname).open(encoding="utf-8") as fh:
            return list(dict.fromkeys(r["phrase"] for r in csv.DictReader(fh)))

    write_csv("libs/level_lib.csv", ["level"], [{"level": x} for x in phrases("levels.csv")])
    write_csv("libs/location_lib.csv", ["location"], [{"location": x} for x in phrases("locations.csv")])
    write_csv("data/type_lib.csv", ["type"], [{"type": x} for x in phrases("types.csv")])
    write_csv("libs/postlocation_lib.csv", ["post_location", "relate_keyword"], [])
    write_csv("libs/position_change.csv", ["from", "to"], [])
    return paths


def main(argv: list[str] | None = None) -> None:
    p = cli_parser("Import / export the Medical-CXR-VQA KeyInfo JSON.")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="KeyInfo JSON -> standardised findings + audit + unknown terms")
    imp.add_argument("--json", required=True, type=Path)
    imp.add_argument("--findings", required=True, type=Path)
    imp.add_argument("--audit", required=True, type=Path)
    imp.add_argument("--unknown", required=True, type=Path)
    imp.add_argument("--fuzzy-cutoff", type=float, default=DEFAULT_FUZZY_CUTOFF)
    imp.add_argument("--source", default="llm")
    exp = sub.add_parser("export", help="findings table -> KeyInfo JSON")
    exp.add_argument("--findings", required=True, type=Path)
    exp.add_argument("--studies", type=Path, help="studies.parquet (for subject, study order)")
    exp.add_argument("--images", type=Path, help="images.parquet (for dicom_id and view)")
    exp.add_argument("--json", required=True, type=Path)
    exp.add_argument(
        "--side-files", type=Path, help="folder for the other files the original question_gen.py reads"
    )
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if args.cmd == "import":
        records = read_keyinfo_json(args.json)
        findings, audit, unknown = import_records(records, args.fuzzy_cutoff, args.source)
        write_table(findings, args.findings, FINDINGS)
        write_table(audit, args.audit, AUDIT)
        write_table(unknown, args.unknown, UNKNOWN_TERMS)
        n_out = len(set(findings.column("study_id").to_pylist()))
        summary("keyinfo_import", len(records), n_out, 0)
        log.info("%d finding rows, %d audit rows, %d unknown terms", findings.num_rows, audit.num_rows,
                 unknown.num_rows)  # fmt: skip
    else:
        findings = pq.read_table(args.findings)
        meta = None
        if args.studies:
            meta = study_meta(
                pq.read_table(args.studies), pq.read_table(args.images) if args.images else None
            )
        records = export_records(findings, meta)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
        tmp.replace(args.json)
        if args.side_files:
            studies = pq.read_table(args.studies) if args.studies else None
            for rel in write_side_files(records, findings, studies, args.side_files):
                log.info("wrote %s", args.side_files / rel)
        summary("keyinfo_export", len(records), len(records), 0)


if __name__ == "__main__":
    main()
