"""Build the review page: sample the studies, collect their items, render one self-contained HTML file.

``python -m workflow.review.build --sections ... --findings ... --questions ... --rg4 sn=... --page
review/index.html --sample review/sample.csv``. The page embeds its data as JSON and renders one study at
a time, so it weighs little and stays quick with a thousand studies; see ``page.html.j2``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from workflow.cards import IU_LICENCE
from workflow.cli import parser, setup_logging
from workflow.contract import REVIEW_SAMPLE, REVIEW_VERDICT_COLUMNS, RG4_SCENARIOS
from workflow.review import items as review_items
from workflow.review.sample import read_exclusions, stratified_sample, study_strata
from workflow.tables import atomic_path

log = logging.getLogger(__name__)
TEMPLATE = "page.html.j2"

MIMIC_NOTICE = (
    "Derived from MIMIC-CXR, distributed by PhysioNet under the PhysioNet Credentialed Health Data License "
    "1.5.0 and its Data Use Agreement. This page contains report text: show it only to credentialed "
    "PhysioNet users who signed the DUA, never share it publicly, and never paste its text into "
    "third-party services (e.g. public LLM APIs)."
)
DEMO_NOTICE = (
    "Built from the synthetic demo corpus (no patient data). A page built from MIMIC-CXR falls under the "
    "PhysioNet Credentialed Health Data License 1.5.0 and its Data Use Agreement: show it only to "
    "credentialed PhysioNet users who signed the DUA, never share it publicly, and never paste its text "
    "into third-party services (e.g. public LLM APIs)."
)


def notice(corpus_format: str, demo: bool) -> str:
    if demo:
        return DEMO_NOTICE
    return MIMIC_NOTICE if corpus_format == "mimic" else IU_LICENCE


def corpus_label(corpus_format: str, reports: str | None, demo: bool) -> str:
    name = {"mimic": "MIMIC-CXR", "iu": "IU X-Ray"}.get(corpus_format, corpus_format)
    if demo:
        return f"synthetic demo ({name} layout)"
    return f"{name} ({Path(reports).name})" if reports else name


def _by_study(table: pa.Table, wanted: set[int]) -> dict[int, list[dict]]:
    """The rows of the sampled studies as dicts, per study. Plain Python from here on: a page holds a few
    thousand rows, and per-row access to a data frame would cost more than everything else."""
    mask = pc.is_in(table["study_id"], value_set=pa.array(sorted(wanted), pa.int64()))
    grouped: dict[int, list[dict]] = {}
    for row in table.filter(mask).to_pylist():
        grouped.setdefault(int(row["study_id"]), []).append(row)
    return grouped


def collect(
    chosen: list[int],
    strata: dict[int, set[str]],
    sections: pa.Table,
    images: pa.Table,
    findings: pa.Table,
    questions: pa.Table,
    rg4: dict[str, pa.Table],
    rules_findings: pa.Table | None = None,
) -> list[dict]:
    """The page's study dicts, in sample order (see :mod:`workflow.review.items`)."""
    wanted = set(chosen)
    sec = {s: rows[0] for s, rows in _by_study(sections, wanted).items()}
    views = {r["dicom_id"]: r["view_position"] for rows in _by_study(images, wanted).values() for r in rows}
    f_by, q_by = _by_study(findings, wanted), _by_study(questions, wanted)
    r_by = {s: {k: rows[0] for k, rows in _by_study(frame, wanted).items()} for s, frame in rg4.items()}
    rules_by = _by_study(rules_findings, wanted) if rules_findings is not None else {}
    studies = []
    for study_id in chosen:
        row = sec.get(study_id, {})
        texts = {name: review_items._text(row.get(name)) for name in review_items.SHOWN_SECTIONS}
        study_findings, study_questions = f_by.get(study_id, []), q_by.get(study_id, [])
        f_items, spans = review_items.finding_items(study_id, texts, study_findings)
        q_items = review_items.question_items(study_id, study_questions, views)
        records = {s: r_by[s][study_id] for s in RG4_SCENARIOS if s in r_by and study_id in r_by[s]}
        rows = [*study_findings, *study_questions, *records.values(), row]
        subject = next((int(r["subject_id"]) for r in rows if "subject_id" in r), None)
        split = next(
            (str(r["split"]) for r in [*study_questions, *records.values()]), None
        )  # official names first
        study = {
            "study_id": study_id,
            "subject_id": subject,
            "split": split,
            "strata": sorted(strata.get(study_id, ())),
            "sections": review_items.report_sections(texts, spans),
            "items": f_items + q_items + review_items.rg4_items(study_id, records),
        }
        if rules_findings is not None:
            study["disagreements"] = review_items.disagreements(study_findings, rules_by.get(study_id, []))
        studies.append(study)
    return studies


def render(studies: list[dict], meta: dict) -> str:
    """The page's HTML. ``meta['build']`` is filled with the hash of the content when absent."""
    payload = json.dumps(studies, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    meta = dict(meta)
    meta.setdefault("build", hashlib.sha256(payload.encode()).hexdigest()[:12])
    meta.update(
        n_studies=len(studies),
        n_items=sum(len(s["items"]) for s in studies),
        columns=list(REVIEW_VERDICT_COLUMNS),
        scenario_names=review_items.SCENARIO_NAMES,
        category_names=review_items.CATEGORY_NAMES,
    )
    data = json.dumps({"meta": meta, "studies": studies}, ensure_ascii=False, separators=(",", ":"))
    # Inside <script>: no '</script>' or '<!--' may appear; \u escapes keep the JSON identical.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
    )
    return env.get_template(TEMPLATE).render(meta=meta, data_json=Markup(data))


def build(
    sections: pa.Table,
    images: pa.Table,
    findings: pa.Table,
    questions: pa.Table,
    rg4: dict[str, pa.Table],
    n: int,
    seed: int,
    exclude: set[int] = frozenset(),
    meta: dict | None = None,
    rules_findings: pa.Table | None = None,
) -> tuple[str, pa.Table]:
    """(page HTML, sample table) for the given tables (pyarrow, as the contract declares them)."""
    strata = study_strata(findings, questions, rg4)
    chosen = stratified_sample(strata, n, seed, exclude)
    studies = collect(chosen, strata, sections, images, findings, questions, rg4, rules_findings)
    html = render(studies, {"seed": seed, **(meta or {})})
    sample = pa.Table.from_pylist(
        [
            {
                "study_id": s["study_id"],
                "subject_id": s["subject_id"],
                "strata": ";".join(s["strata"]),
                "items": len(s["items"]),
            }
            for s in studies
        ],
        schema=REVIEW_SAMPLE,
    )
    return html, sample


def write_sample(sample: pa.Table, path: str | Path) -> None:
    with atomic_path(path) as tmp, Path(tmp).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=REVIEW_SAMPLE.names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sample.to_pylist())


def main(argv=None) -> None:
    p: argparse.ArgumentParser = parser("Build the clinicians' review page (one self-contained HTML file)")
    p.add_argument("--sections", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--findings", required=True, help="the standardised findings table downstream stages read")
    p.add_argument("--questions", required=True)
    p.add_argument("--rg4", action="append", default=[], metavar="SCENARIO=PATH")
    p.add_argument("--rules-findings", help="LLM backends: the rules' findings, shown where they disagree")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="study ids never to sample (one per line, or a CSV with study_id)")
    p.add_argument("--corpus-format", default="mimic")
    p.add_argument("--corpus-reports", help="the corpus's reports path (its name is shown on the page)")
    p.add_argument("--demo", action="store_true", help="the corpus is the synthetic demo")
    p.add_argument("--page", required=True)
    p.add_argument("--sample", required=True)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    t0 = time.perf_counter()
    rg4 = {}
    for item in args.rg4:
        scenario, _, path = item.partition("=")
        if scenario not in RG4_SCENARIOS or not path:
            p.error(f"--rg4 takes SCENARIO=PATH with a scenario in {RG4_SCENARIOS}, got {item!r}")
        rg4[scenario] = pq.read_table(path)
    html, sample = build(
        pq.read_table(args.sections),
        pq.read_table(args.images, columns=["study_id", "dicom_id", "view_position"]),
        pq.read_table(args.findings),
        pq.read_table(args.questions),
        rg4,
        args.n,
        args.seed,
        read_exclusions(args.exclude),
        {
            "corpus": corpus_label(args.corpus_format, args.corpus_reports, args.demo),
            "notice": notice(args.corpus_format, args.demo),
        },
        pq.read_table(args.rules_findings) if args.rules_findings else None,
    )
    with atomic_path(args.page) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    write_sample(sample, args.sample)
    log.info(
        "review: %d studies, %d items, page %.0f kB in %.2f s",
        sample.num_rows,
        sum(sample["items"].to_pylist()),
        len(html.encode()) / 1024,
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
