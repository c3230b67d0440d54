# The chest X-ray dataset factory. Wiring only: configuration, validation, rule modules, targets.
# All logic lives in the `workflow/` package; see README.md.

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The working directory's config.yaml, else the shipped one (`snakemake -s /path/to/Snakefile --directory
# /my/run`); a `module` import passes its own config instead.
configfile:
    "config.yaml"
    if Path("config.yaml").exists()
    else f"{workflow.current_basedir}/config.yaml"


# The report's landing page: what was built, from which corpus, with which backend (jinja2 over the config).
report: "workflow/report_captions/workflow.rst"


include: "rules/common.smk"
include: "rules/ingest.smk"
include: "rules/sections.smk"
include: "rules/keyinfo.smk"
include: "rules/llm.smk"
include: "rules/vqa.smk"
include: "rules/rg4.smk"
include: "rules/exports.smk"
include: "rules/finetune.smk"
include: "rules/release.smk"
include: "rules/report.smk"
include: "rules/review.smk"


rule all:
    default_target: True
    input:
        ALL_TARGETS,
