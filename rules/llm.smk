# The LLM layer: gold (teacher) -> keyinfo (bulk, shards) -> follow-up rounds. Only built when
# `llm.backend: llm`; logic in workflow/llm/. All stages share one response cache (params.cache).


envvars:
    *LLM_ENVVARS,


onstart:
    write_llm_settings()


wildcard_constraints:
    round="[1-9][0-9]*",
    shard="[0-9]+",


rule llm_gold:
    input:
        sections=rules.sections.output.sections,
        studies=rules.ingest.output.studies,
        rules_findings=rules.keyinfo_rules.output.findings,
    output:
        sample=out("llm", "gold", "sample.parquet"),
        findings=out("llm", "gold", "findings.parquet"),
        requests=out("llm", "gold", "requests.parquet"),
        sft=out("llm", "gold", "sft.jsonl"),
        rejects=out("llm", "gold", "rejects.parquet"),
    log:
        logfile("llm_gold"),
    conda:
        llm_conda_env(config["llm"]["gold"]["endpoint"])
    resources:
        **llm_resources(config["llm"]["gold"]["endpoint"]),
    params:
        py=PY,
        settings=llm_settings_file("gold"),
        identity=llm_stage_identity("gold"),
        cache=llm_cache,
    shell:
        "{params.py} -m workflow.llm.gold --config {params.settings:q} --cache {params.cache:q}"
        " --sections {input.sections:q} --studies {input.studies:q} --rules-findings {input.rules_findings:q}"
        " --sample {output.sample:q} --findings {output.findings:q} --requests {output.requests:q}"
        " --sft {output.sft:q} --rejects {output.rejects:q} 2> {log:q}"


rule llm_keyinfo_shard:
    input:
        unpack(student_inputs),
        sections=rules.sections.output.sections,
        studies=rules.ingest.output.studies,
    output:
        findings=out("llm", "keyinfo", "shard{shard}", "findings.parquet"),
        requests=out("llm", "keyinfo", "shard{shard}", "requests.parquet"),
        rejects=out("llm", "keyinfo", "shard{shard}", "rejects.parquet"),
        audit=out("llm", "keyinfo", "shard{shard}", "audit.parquet"),
    log:
        logfile("llm_keyinfo_shard{shard}"),
    conda:
        llm_conda_env(config["llm"]["keyinfo"]["endpoint"])
    resources:
        **llm_resources(config["llm"]["keyinfo"]["endpoint"]),
    params:
        py=PY,
        settings=llm_settings_file("keyinfo"),
        identity=llm_stage_identity("keyinfo"),
        cache=llm_cache,
        shards=config["llm"]["keyinfo"]["shards"],
    shell:
        "{params.py} -m workflow.llm.keyinfo shard --config {params.settings:q} --cache {params.cache:q}"
        " --sections {input.sections:q} --studies {input.studies:q}"
        " --shard {wildcards.shard} --shards {params.shards}"
        " --findings {output.findings:q} --requests {output.requests:q} --rejects {output.rejects:q}"
        " --audit {output.audit:q} 2> {log:q}"


rule llm_keyinfo_merge:
    input:
        findings=expand(
            rules.llm_keyinfo_shard.output.findings,
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        requests=expand(
            rules.llm_keyinfo_shard.output.requests,
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        rejects=expand(
            rules.llm_keyinfo_shard.output.rejects,
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        audit=expand(
            rules.llm_keyinfo_shard.output.audit,
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        rules_findings=rules.keyinfo_rules.output.findings,
        sections=rules.sections.output.sections,
    output:
        findings=out("llm", "followup", "round0", "findings.parquet"),
        requests=out("llm", "followup", "round0", "requests.parquet"),
        rejects=out("llm", "followup", "round0", "rejects.parquet"),
        asked=out("llm", "followup", "round0", "asked.parquet"),
        stats=out("llm", "followup", "round0", "stats.parquet"),
        audit=out("llm", "keyinfo", "audit.parquet"),
        unknown_terms=out("llm", "keyinfo", "unknown_terms.parquet"),
    log:
        logfile("llm_keyinfo_merge"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
    params:
        py=PY,
        settings=llm_settings_file("keyinfo"),
        cutoffs=lambda wc: json.dumps(keyinfo_cutoffs(), sort_keys=True),  # grounding: re-run when they change
    shell:
        "{params.py} -m workflow.llm.keyinfo merge --config {params.settings:q} --shard-findings {input.findings:q}"
        " --shard-requests {input.requests:q} --shard-rejects {input.rejects:q} --shard-audit {input.audit:q}"
        " --rules-findings {input.rules_findings:q} --sections {input.sections:q} --findings {output.findings:q}"
        " --requests {output.requests:q} --rejects {output.rejects:q} --asked {output.asked:q}"
        " --stats {output.stats:q} --audit {output.audit:q} --unknown-terms {output.unknown_terms:q} 2> {log:q}"


rule llm_followup:
    input:
        unpack(followup_previous),
        unpack(student_inputs),
        sections=rules.sections.output.sections,
        studies=rules.ingest.output.studies,
        rules_findings=rules.keyinfo_rules.output.findings,
    output:
        findings=out("llm", "followup", "round{round}", "findings.parquet"),
        asked=out("llm", "followup", "round{round}", "asked.parquet"),
        stats=out("llm", "followup", "round{round}", "stats.parquet"),
        requests=out("llm", "followup", "round{round}", "requests.parquet"),
        rejects=out("llm", "followup", "round{round}", "rejects.parquet"),
    log:
        logfile("llm_followup_round{round}"),
    conda:
        llm_conda_env(config["llm"]["followup"]["endpoint"])
    resources:
        **llm_resources(config["llm"]["followup"]["endpoint"]),
    params:
        py=PY,
        settings=llm_settings_file("followup"),
        identity=llm_stage_identity("followup"),
        cache=llm_cache,
    shell:
        "{params.py} -m workflow.llm.followup --config {params.settings:q} --cache {params.cache:q}"
        " --round {wildcards.round} --sections {input.sections:q} --studies {input.studies:q}"
        " --rules-findings {input.rules_findings:q} --previous {input.previous:q}"
        " --previous-asked {input.previous_asked:q} --previous-stats {input.previous_stats:q}"
        " --keyinfo-requests {input.keyinfo_requests:q} --previous-rejects {input.previous_rejects:q}"
        " --findings {output.findings:q} --asked {output.asked:q} --stats {output.stats:q}"
        " --requests {output.requests:q} --rejects {output.rejects:q} 2> {log:q}"


ALL_TARGETS += llm_targets()
