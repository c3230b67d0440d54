rule vqa:
    input:
        findings=findings_table(),
        images=rules.ingest.output.images,
        studies=rules.ingest.output.studies,
        templates=config_path(config["vqa"]["templates"]),
        vocabulary=packaged("libs", "vocabulary.yaml"),
    output:
        questions=out("vqa", "questions.parquet"),
        csv=out("vqa", "questions.csv"),
        stats=out("vqa", "stats.parquet"),
        stats_csv=out("vqa", "stats.csv"),
        leak=out("vqa", "leak.csv"),
        rejects=out("vqa", "rejects.parquet"),
    log:
        logfile("vqa"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        names=config_path(config["vqa"]["names"]),
        seed=config["vqa"]["seed"],
        exclude=config["vqa"]["exclude_names"],
        no_finding_rate=config["vqa"]["abnormality_no_finding_rate"],
        negative_weight=config["vqa"]["explicit_negative_weight"],
        flip_share=config["vqa"]["laterality_flip_share"],
        view_balance=config["vqa"]["view_balance"],
        leak_probe_max=config["vqa"]["leak_probe_max"],
    shell:
        "{params.py} -m workflow.vqa --findings {input.findings:q} --images {input.images:q}"
        " --studies {input.studies:q} --templates {input.templates:q} --vocabulary {input.vocabulary:q}"
        " --names {params.names:q} --seed {params.seed} --exclude-names {params.exclude:q}"
        " --abnormality-no-finding-rate {params.no_finding_rate}"
        " --explicit-negative-weight {params.negative_weight}"
        " --laterality-flip-share {params.flip_share} --view-balance {params.view_balance}"
        " --leak-probe-max {params.leak_probe_max}"
        " --questions {output.questions:q} --csv {output.csv:q} --stats {output.stats:q}"
        " --stats-csv {output.stats_csv:q} --leak {output.leak:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += rules.vqa.output
