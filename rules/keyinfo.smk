rule keyinfo_rules:
    input:
        sections=rules.sections.output.sections,
        libs=[
            packaged("libs", "vocabulary.yaml"),
            packaged("libs", "findings.csv"),
            packaged("libs", "blockers.csv"),
            packaged("libs", "locations.csv"),
            packaged("libs", "levels.csv"),
            packaged("libs", "types.csv"),
            packaged("libs", "changes.csv"),
            packaged("libs", "triggers.yaml"),
            packaged("libs", "anchors.yaml"),
        ],
    output:
        findings=out("keyinfo", "rules", "findings.parquet"),
        stats=out("keyinfo", "rules", "stats.parquet"),
        rejects=out("keyinfo", "rules", "rejects.parquet"),
    log:
        logfile("keyinfo_rules"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
    params:
        py=PY,
    shell:
        "{params.py} -m workflow.keyinfo.run_rules --sections {input.sections:q} --findings {output.findings:q}"
        " --stats {output.stats:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_rules.output
