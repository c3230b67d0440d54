VQA_TEMPLATES = vqa_templates_path()
VQA_NAMES = vqa_names_path()


rule vqa_shard:
    input:
        findings=findings_table(),
        images=rules.ingest.output.images,
        studies=rules.ingest.output.studies,
        keyinfo_studies=rules.keyinfo_studies.output.studies,
        templates=VQA_TEMPLATES,
        vocabulary=packaged("libs", "vocabulary.yaml"),
        levels=packaged("libs", "levels.csv"),
    output:
        questions=out("vqa", "shard{shard}", "questions.parquet"),
        rejects=out("vqa", "shard{shard}", "rejects.parquet"),
    log:
        logfile("vqa_shard{shard}"),
    # as soon as keyinfo is done, ahead of the second rg4 shard: the vqa chain (shards -> merge ->
    # release_vqa and the report) is the DAG's longest tail, the rg4 and exports jobs fill around it
    priority: 5
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        shards=config["vqa"]["shards"],
        style=config["vqa"]["style"],
        names=VQA_NAMES,
        seed=config["vqa"]["seed"],
        level_min=config["vqa"]["level_word_min_count"],
        exclude=config["vqa"]["exclude_names"],
        no_finding_rate=config["vqa"]["abnormality_no_finding_rate"],
        negative_weight=config["vqa"]["explicit_negative_weight"],
        flip_share=config["vqa"]["laterality_flip_share"],
        view_balance=config["vqa"]["view_balance"],
    shell:
        "{params.py} -m workflow.vqa shard --findings {input.findings:q} --images {input.images:q}"
        " --studies {input.studies:q} --keyinfo-studies {input.keyinfo_studies:q} --style {params.style}"
        " --templates {input.templates:q} --vocabulary {input.vocabulary:q} --levels {input.levels:q}"
        " --names {params.names:q} --seed {params.seed} --level-word-min-count {params.level_min}"
        " --exclude-names {params.exclude:q}"
        " --abnormality-no-finding-rate {params.no_finding_rate}"
        " --explicit-negative-weight {params.negative_weight}"
        " --laterality-flip-share {params.flip_share} --view-balance {params.view_balance}"
        " --shard {wildcards.shard} --shards {params.shards}"
        " --questions {output.questions:q} --rejects {output.rejects:q} 2> {log:q}"


rule vqa:
    input:
        questions=expand(
            rules.vqa_shard.output.questions, shard=range(config["vqa"]["shards"])
        ),
        rejects=expand(
            rules.vqa_shard.output.rejects, shard=range(config["vqa"]["shards"])
        ),
    output:
        questions=out("vqa", "questions.parquet"),
        csv=out("vqa", "questions.csv"),
        stats=out("vqa", "stats.parquet"),
        stats_csv=out("vqa", "stats.csv"),
        leak=out("vqa", "leak.csv"),
        rejects=out("vqa", "rejects.parquet"),
    log:
        logfile("vqa"),
    priority: 5  # as vqa_shard
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        seed=config["vqa"]["seed"],
        leak_probe_max=config["vqa"]["leak_probe_max"],
    shell:
        "{params.py} -m workflow.vqa merge --shard-questions {input.questions:q}"
        " --shard-rejects {input.rejects:q} --seed {params.seed} --leak-probe-max {params.leak_probe_max}"
        " --questions {output.questions:q} --csv {output.csv:q} --stats {output.stats:q}"
        " --stats-csv {output.stats_csv:q} --leak {output.leak:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += rules.vqa.output
