rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        studies=out("ingest", "studies.parquet"),
        images=out("ingest", "images.parquet"),
        rejects=out("ingest", "rejects.parquet"),
    log:
        logfile("ingest"),
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        python=PY,
        format=config["corpus"]["format"],
        args=ingest_args,
        max_bytes=config["ingest"]["max_report_bytes"],
    shell:
        "{params.python} -m workflow.ingest {params.format} {params.args} --studies {output.studies:q}"
        " --images {output.images:q} --rejects {output.rejects:q} --workers {threads}"
        " --max-report-bytes {params.max_bytes} 2> {log:q}"


ALL_TARGETS += rules.ingest.output
