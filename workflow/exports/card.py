"""``exports/README.md``: what a build of the exports holds and how it was made.

A reader of the training files learns here what R2GenGPT's / MeGPT's ``report`` field holds (and why that
is the default for the corpus), which RaDialog prompt wording the files carry (our paraphrases or the
user's RaDialog checkout, named by file and key, never quoted), the records per task, and whether the
easy-language and reasoning tasks are in the files (only with an LLM backend) or absent.
"""

from __future__ import annotations

from workflow.exports import DEFAULT_SECTIONS

CORPUS_NAMES = {"mimic": "MIMIC-CXR", "iu": "IU X-Ray"}
_SECTIONS_WHY = {
    "findings_impression": "findings + impression (R2GenGPT's own MIMIC annotation holds both, its maintainers "
    "say; R2Gen-style baselines use findings only, so compare with their numbers only after "
    "`exports.report_sections: findings`)",
    "findings": "findings only (R2Gen's convention, and its IU X-Ray annotation)",
}


def render(counts: dict, dataset: str, clean: bool) -> str:
    sections = counts["r2gen_report_sections"]
    default = "the default for this corpus" if DEFAULT_SECTIONS[dataset] == sections else "set in the config"
    r2gen = counts["r2gen"]
    tasks = counts["radialog_tasks"]
    prompts = counts["radialog_prompts"]
    llm = counts["radialog_llm_tasks"]
    lines = [
        "# R2GenGPT / MeGPT and RaDialog training files",
        "",
        f"Corpus: {CORPUS_NAMES.get(dataset, dataset)}. Built by `rules/exports.smk` (`workflow/exports/`); "
        "counts also in `summary.json`, dropped studies with a reason in `rejects.parquet`.",
        "",
        "## `r2gen/annotation.json` (R2GenGPT, MeGPT; R2Gen format)",
        "",
        f"* `report`: {_SECTIONS_WHY[sections]}; {default}. Items need a findings section.",
        f"* Items: train {r2gen.get('train', 0):,}, val {r2gen.get('val', 0):,}, test {r2gen.get('test', 0):,}.",
        "* Text: "
        + (
            "cleaned with the R2Gen cleaner of the corpus." if clean else "as written (the loaders clean it)."
        ),
        "",
        "## `radialog/` (RaDialog RG and INS)",
        "",
        f"* Prompts: {prompts['source']}"
        + (f" (sha256 of the wording `{prompts['sha256'][:16]}`)." if prompts.get("sha256") else "."),
        f"* RG (`mimic_cxr_reports_stratified.json`): {counts['radialog_rg']:,} records; "
        f"INS (`mimic_cxr_instruct_stratified.json`): {counts['radialog_ins']:,} records (RG + instruct).",
        "",
        "| task | records |",
        "|---|---:|",
        *(f"| {task} | {n:,} |" for task, n in tasks.items()),
        "",
    ]
    if not isinstance(llm, dict):  # the reason they are absent (workflow.exports.llm_tasks.ABSENT)
        lines.append(f"* Easy language, reasoning: {llm}.")
    else:
        dropped = ", ".join(f"{k} {v}" for k, v in llm["dropped"].items()) or "none"
        lines.append(
            f"* Easy language, reasoning: written by `{llm['model']}` (endpoint `{llm['endpoint']}`) through the "
            f"LLM layer: {llm['accepted']:,} of {llm['jobs']:,} jobs accepted ({llm['requests']:,} distinct "
            f"requests, {llm['cached']:,} from the cache; dropped: {dropped}); tokens {llm['prompt_tokens']:,} in "
            f"/ {llm['completion_tokens']:,} out, ${llm['cost_usd']:,.4f}."
        )
    lines.append("")
    return "\n".join(lines)
