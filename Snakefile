# The chest X-ray dataset factory. Wiring only: configuration, validation, rule modules, targets.
# All logic lives in the `workflow/` package; see README.md and DESIGN notes in docs.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/ingest.smk"
include: "rules/sections.smk"


rule all:
    default_target: True
    input:
        ALL_TARGETS,
