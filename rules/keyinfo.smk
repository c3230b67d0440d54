rule keyinfo_rules:
    input:
        sections=rules.sections.output.sections,
        libs=[
            "libs/vocabulary.yaml",
            "libs/findings.csv",
            "libs/blockers.csv",
            "libs/locations.csv",
            "libs/levels.csv",
            "libs/types.csv",
            "libs/changes.csv",
            "libs/triggers.yaml",
            "libs/anchors.yaml",
        ],
    output:
        findings=out("keyinfo", "rules", "findings.parquet"),
        stats=out("keyinfo", "rules", "stats.parquet"),
        rejects=out("keyinfo", "rules", "rejects.parquet"),
    log:
        logfile("keyinfo_rules"),
    conda:
        "../envs/core.yaml"
    params:
        py=PY,
    shell:
        "{params.py} -m workflow.keyinfo.run_rules --sections {input.sections:q} --findings {output.findings:q}"
        " --stats {output.stats:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_rules.output
