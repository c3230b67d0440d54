rule sections:
    input:
        studies=rules.ingest.output.studies,
    output:
        sections=out("sections", "sections.parquet"),
        mit_csv=out("sections", "mimic_cxr_sectioned.csv"),
        rejects=out("sections", "rejects.parquet"),
    log:
        logfile("sections"),
    conda:
        "../envs/core.yaml"
    shell:
        "{PY} -m workflow.sections --studies {input.studies:q} --sections {output.sections:q}"
        " --mit-csv {output.mit_csv:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += rules.sections.output
