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
    # Two reader/parser processes: 2.3 s instead of 3.4 s for 227k studies when both cores are free
    # (bench/RESULTS.md, "## Sections"); Snakemake scales this down when fewer cores are given.
    threads: 2
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        python=PY,
    shell:
        "{params.python} -m workflow.sections --studies {input.studies:q} --sections {output.sections:q}"
        " --mit-csv {output.mit_csv:q} --rejects {output.rejects:q} --workers {threads} 2> {log:q}"


ALL_TARGETS += rules.sections.output
