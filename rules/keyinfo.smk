rule keyinfo_rules:
    input:
        sections=rules.sections.output.sections,
        reports=rules.ingest.output.studies,
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
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
    params:
        py=PY,
        conventions=lambda wc: (
            f"--alternatives {config['keyinfo']['alternatives']} --hedges {config['keyinfo']['hedges']}"
            + ("" if config["keyinfo"]["lenient_sections"] else " --no-lenient")
        ),
    shell:
        "{params.py} -m workflow.keyinfo.run_rules --sections {input.sections:q} --reports {input.reports:q}"
        " --findings {output.findings:q} --stats {output.stats:q} --rejects {output.rejects:q}"
        " --workers {threads} {params.conventions} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_rules.output


# normal / abnormal / unknown per study, from the findings downstream stages read (either backend)
rule keyinfo_studies:
    input:
        sections=rules.sections.output.sections,
        reports=rules.ingest.output.studies,
        findings=findings_table,
        libs=packaged("libs", "triggers.yaml"),
    output:
        studies=out("keyinfo", "studies.parquet"),
    log:
        logfile("keyinfo_studies"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        lenient=lambda wc: (
            "" if config["keyinfo"]["lenient_sections"] else "--no-lenient"
        ),
    shell:
        "{params.py} -m workflow.keyinfo.studies --sections {input.sections:q} --reports {input.reports:q}"
        " --findings {input.findings:q} --out {output.studies:q} {params.lenient} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_studies.output
