rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        studies=out("ingest", "studies.parquet"),
        images=out("ingest", "images.parquet"),
        rejects=out("ingest", "rejects.parquet"),
    params:
        format=config["corpus"]["format"],
        args=ingest_args,
    log:
        logfile("ingest"),
    conda:
        "../envs/core.yaml"
    shell:
        "{PY} -m workflow.ingest {params.format} {params.args} --studies {output.studies:q}"
        " --images {output.images:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += rules.ingest.output
