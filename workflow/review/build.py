"""Build the review page: sample the studies, collect their items, render one self-contained HTML file.

``python -m workflow.review.build --sections ... --findings ... --questions ... --rg4 sn=... --page
review/index.html --sample review/sample.csv``. The page embeds its data as JSON and renders one study at
a time, so it weighs little and stays quick with a thousand studies; see ``page.html.j2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
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


def _by_study(frame: pd.DataFrame, wanted: set[int]) -> dict[int, list[dict]]:
    """The rows of the sampled studies as dicts, per study (plain Python from here: per-row pandas access
    costs more than everything else the page needs)."""
    grouped: dict[int, list[dict]] = {}
    for row in frame[frame["study_id"].isin(wanted)].to_dict("records"):
        grouped.setdefault(int(row["study_id"]), []).append(row)
    return grouped


def collect(
    chosen: list[int],
    strata: dict[int, set[str]],
    sections: pd.DataFrame,
    images: pd.DataFrame,
    findings: pd.DataFrame,
    questions: pd.DataFrame,
    rg4: dict[str, pd.DataFrame],
    rules_findings: pd.DataFrame | None = None,
) -> list[dict]:
    """The page's study dicts, in sample order (see :mod:`workflow.review.items`)."""
    wanted = set(chosen)
    sec = {s: rows[0] for s, rows in _by_study(sections, wanted).items()}
    views = dict(zip(images["dicom_id"], images["view_position"].fillna(""), strict=True))
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
        split = next((str(r["split"]) for r in [*study_questions, *records.values()]), None)  # official names first
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
    sections: pd.DataFrame,
    images: pd.DataFrame,
    findings: pd.DataFrame,
    questions: pd.DataFrame,
    rg4: dict[str, pd.DataFrame],
    n: int,
    seed: int,
    exclude: set[int] = frozenset(),
    meta: dict | None = None,
    rules_findings: pd.DataFrame | None = None,
) -> tuple[str, pd.DataFrame]:
    """(page HTML, sample table) for the given tables."""
    strata = study_strata(findings, questions, rg4)
    chosen = stratified_sample(strata, n, seed, exclude)
    studies = collect(chosen, strata, sections, images, findings, questions, rg4, rules_findings)
    html = render(studies, {"seed": seed, **(meta or {})})
    sample = pd.DataFrame(
        {
            "study_id": [s["study_id"] for s in studies],
            "subject_id": [s["subject_id"] for s in studies],
            "strata": [";".join(s["strata"]) for s in studies],
            "items": [len(s["items"]) for s in studies],
        }
    )
    return html, sample


def _read(path: str, columns=None) -> pd.DataFrame:
    return pd.read_parquet(path, columns=columns)


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
        rg4[scenario] = _read(path)
    html, sample = build(
        _read(args.sections),
        _read(args.images, ["dicom_id", "view_position"]),
        _read(args.findings),
        _read(args.questions),
        rg4,
        args.n,
        args.seed,
        read_exclusions(args.exclude),
        {
            "corpus": corpus_label(args.corpus_format, args.corpus_reports, args.demo),
            "notice": notice(args.corpus_format, args.demo),
        },
        _read(args.rules_findings) if args.rules_findings else None,
    )
    with atomic_path(args.page) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    table = pa.Table.from_pandas(sample, preserve_index=False).select(REVIEW_SAMPLE.names).cast(REVIEW_SAMPLE)
    with atomic_path(args.sample) as tmp:
        table.to_pandas().to_csv(tmp, index=False)
    log.info(
        "review: %d studies, %d items, page %.0f kB in %.2f s",
        len(sample),
        int(sample["items"].sum()) if len(sample) else 0,
        len(html.encode()) / 1024,
        time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
