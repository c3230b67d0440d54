rule keyinfo_rules:
    input:
        sections=rules.sections.output.sections,
        reports=rules.ingest.output.studies,
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
    threads: 2
    conda:
        "../envs/core.yaml"
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
        libs="libs/triggers.yaml",
    output:
        studies=out("keyinfo", "studies.parquet"),
    log:
        logfile("keyinfo_studies"),
    conda:
        "../envs/core.yaml"
    params:
        py=PY,
        lenient=lambda wc: "" if config["keyinfo"]["lenient_sections"] else "--no-lenient",
    shell:
        "{params.py} -m workflow.keyinfo.studies --sections {input.sections:q} --reports {input.reports:q}"
        " --findings {input.findings:q} --out {output.studies:q} {params.lenient} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_studies.output
