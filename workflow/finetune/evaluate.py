"""Student vs teacher on the held-out gold: is the student good enough to spend GPU hours on bulk?

The teacher's gold findings of the held-out studies (never trained on) are the reference. The student
is asked about the same studies through the LLM layer (same prompt, cache and executor as the bulk
``keyinfo`` stage, so these answers are reused by bulk), each answer is parsed, and scored:

* ``json_valid_rate``: share of held-out studies whose answer parsed into findings,
* precision / recall / ``f1`` on (study, name, presence) triples: a finding with the wrong presence
  counts as both a false positive and a false negative,
* ``positive_f1`` on the positive findings only, ``name_f1`` ignoring presence.

Other finding tables (the rules backend, another model) can be scored alongside (``--compare
rules=results/keyinfo/rules/findings.parquet``). Output: one row per model (``FINETUNE_EVAL``) as
Parquet and as a Markdown table for the log / report.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow import cli
from workflow.contract import FINETUNE_EVAL
from workflow.tables import summary, write_table

log = logging.getLogger(__name__)


def normal_name(name: str | None) -> str:
    return re.sub(r"\s+", " ", (name or "").strip().lower())


def triples(items: list[dict], study_id: int, presence: bool = True, only: str | None = None) -> set[tuple]:
    out = set()
    for item in items:
        name = normal_name(item.get("name"))
        state = normal_name(item.get("presence")) or "positive"
        if not name or (only and state != only):
            continue
        out.add((study_id, name, state) if presence else (study_id, name))
    return out


def prf(reference: set, predicted: set) -> tuple[float, float, float]:
    tp = len(reference & predicted)
    precision = tp / len(predicted) if predicted else (1.0 if not reference else 0.0)
    recall = tp / len(reference) if reference else (1.0 if not predicted else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(
    model: str, gold: dict[int, list[dict]], answers: dict[int, list[dict] | None], studies: list[int]
) -> dict:
    """One ``FINETUNE_EVAL`` row. ``answers[study]`` is None when the answer was missing or unparsable
    (it then scores as predicting nothing)."""
    ref = {"all": set(), "pos": set(), "name": set()}
    pred = {"all": set(), "pos": set(), "name": set()}
    for study in studies:
        g, a = gold.get(study, []), answers.get(study) or []
        ref["all"] |= triples(g, study)
        pred["all"] |= triples(a, study)
        ref["pos"] |= triples(g, study, only="positive")
        pred["pos"] |= triples(a, study, only="positive")
        ref["name"] |= triples(g, study, presence=False)
        pred["name"] |= triples(a, study, presence=False)
    precision, recall, f1 = prf(ref["all"], pred["all"])
    valid = sum(answers.get(s) is not None for s in studies)
    return {
        "model": model,
        "studies": len(studies),
        "answered": sum(s in answers for s in studies),
        "json_valid": valid,
        "json_valid_rate": valid / len(studies) if studies else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "positive_f1": prf(ref["pos"], pred["pos"])[2],
        "name_f1": prf(ref["name"], pred["name"])[2],
    }


def by_study(table: pa.Table, studies: set[int]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in table.select(
        [c for c in ("study_id", "name", "presence") if c in table.column_names]
    ).to_pylist():
        if row["study_id"] in studies:
            out.setdefault(row["study_id"], []).append(row)
    return out


def ask_student(config: dict, cache: Path, sections: Path, studies_table: Path, heldout: list[int]):
    """The student's parsed answers for the held-out studies: the very requests bulk ``keyinfo`` sends
    (same builder, same cache), so bulk reuses them."""
    from workflow.llm.keyinfo import shard_requests
    from workflow.llm.stages import ask, load_studies, stage_params
    from workflow.tables import Rejects

    cfg, params = stage_params(config, "keyinfo")
    studies = load_studies(sections, studies_table)
    studies = studies[studies["study_id"].isin(heldout)]
    _, requests = shard_requests(studies, 0, 1, cfg, params, Rejects("finetune_eval"))
    answers: dict[int, list[dict] | None] = {}
    reasons: dict[str, int] = {}
    for answer in ask(requests, cfg, cache):
        study = int(answer.request.meta["study_id"])
        # an unusable answer (re-asked, still not JSON of the schema) counts against "JSON valid"
        if answer.result is not None and answer.result.status in ("completed", "unusable"):
            answers[study] = answer.items
        if answer.items is None:
            reason = answer.parse_error or (answer.result.status if answer.result else "not_answered")
            reason = reason.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        log.info("student answers not usable, by reason: %s", reasons)
    return answers


def markdown(rows: list[dict]) -> str:
    head = "| model | studies | JSON valid | precision | recall | F1 | positive F1 | name F1 |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['studies']} | {r['json_valid_rate']:.1%} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['f1']:.3f} | {r['positive_f1']:.3f} | {r['name_f1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--gold", type=Path, required=True, help="the teacher's gold findings (parquet)")
    p.add_argument("--split", type=Path, required=True, help="split.parquet of finetune_data")
    p.add_argument("--sections", type=Path, required=True, help="sections.parquet")
    p.add_argument("--studies", type=Path, required=True, help="studies.parquet (ingest)")
    p.add_argument(
        "--config",
        required=True,
        help="the keyinfo stage's settings (corpus + llm sections): a JSON file or text",
    )
    p.add_argument("--cache", type=Path, required=True, help="the LLM response cache (SQLite)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=FINDINGS.parquet")
    p.add_argument(
        "--out", type=Path, required=True, help="evaluation table (parquet); .md written alongside"
    )
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    from workflow.llm.stages import load_config

    split = pq.read_table(args.split).to_pylist()
    heldout = sorted(r["study_id"] for r in split if r["part"] == "heldout")
    gold = by_study(pq.read_table(args.gold), set(heldout))
    answers = ask_student(load_config(args.config), args.cache, args.sections, args.studies, heldout)
    rows = [score("student", gold, answers, heldout)]
    for spec in args.compare:
        name, _, path = spec.partition("=")
        found = by_study(pq.read_table(path), set(heldout))
        rows.append(score(name, gold, {s: found.get(s, []) for s in heldout}, heldout))
    write_table(pa.Table.from_pylist(rows, schema=FINETUNE_EVAL), args.out, FINETUNE_EVAL)
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(table)
    log.info("student vs teacher on %d held-out gold studies:\n%s", len(heldout), table)
    summary("finetune_eval", len(heldout), rows[0]["json_valid"], len(heldout) - rows[0]["json_valid"])


if __name__ == "__main__":
    main()
