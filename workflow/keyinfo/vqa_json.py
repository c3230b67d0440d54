"""Import / export of the Medical-CXR-VQA KeyInfo JSON (``all_diseases.json``-style).

One record per study: ``study_id``, ``subject_id``, ``dicom_id``, ``view``, ``study_order`` (strings, as the
released file has them) plus ``entity`` / ``uncertain_entity`` (name -> {location, level, type}),
``no_entity`` (list of names) and ``opacity_vs_clear`` ({"opacity": {...}, "clear": {"location": ...}}).

* import: any such file (also the raw, malformed shapes their models emit, and JSON Lines) -> the standardised
  ``findings`` table + audit + unknown terms (``standardise(fmt="vqa")``), so a released file can go straight
  into question generation;
* export: a ``findings`` table -> that JSON, names written with their Medical-CXR-VQA names (``vqa_name`` of
  ``libs/findings.csv``), support devices left out (the dataset ignores them), the post-processed shape
  (``uncertain_entity`` as a dict), several instances of one name flattened as ``"left,right"``.

    python -m workflow.keyinfo.vqa_json import --json all_diseases.json --findings F --audit A --unknown U
    python -m workflow.keyinfo.vqa_json export --findings F --studies S --images I --json out.json
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
        summary("keyinfo_export", len(records), len(records), 0)


if __name__ == "__main__":
    main()
