# The LLM layer: gold (teacher) -> keyinfo (bulk, shards) -> follow-up rounds. Only built when
# `llm.backend: llm`; logic in workflow/llm/. All stages share one response cache (params.cache).


envvars:
    *LLM_ENVVARS,


wildcard_constraints:
    round="[1-9][0-9]*",
    shard="[0-9]+",


rule llm_gold:
    input:
        sections=out("sections", "sections.parquet"),
        studies=out("ingest", "studies.parquet"),
        rules_findings=out("keyinfo", "rules", "findings.parquet"),
    output:
        sample=out("llm", "gold", "sample.parquet"),
        findings=out("llm", "gold", "findings.parquet"),
        requests=out("llm", "gold", "requests.parquet"),
        sft=out("llm", "gold", "sft.jsonl"),
        rejects=out("llm", "gold", "rejects.parquet"),
    log:
        logfile("llm_gold"),
    conda:
        "../envs/core.yaml"
    resources:
        llm_endpoint=1,
    params:
        py=PY,
        config=llm_config_json,
        cache=llm_cache,
    shell:
        "{params.py} -m workflow.llm.gold --config {params.config:q} --cache {params.cache:q}"
        " --sections {input.sections:q} --studies {input.studies:q} --rules-findings {input.rules_findings:q}"
        " --sample {output.sample:q} --findings {output.findings:q} --requests {output.requests:q}"
        " --sft {output.sft:q} --rejects {output.rejects:q} 2> {log:q}"


rule llm_keyinfo_shard:
    input:
        unpack(student_inputs),
        sections=out("sections", "sections.parquet"),
        studies=out("ingest", "studies.parquet"),
    output:
        findings=out("llm", "keyinfo", "shard{shard}", "findings.parquet"),
        requests=out("llm", "keyinfo", "shard{shard}", "requests.parquet"),
        rejects=out("llm", "keyinfo", "shard{shard}", "rejects.parquet"),
        audit=out("llm", "keyinfo", "shard{shard}", "audit.parquet"),
    log:
        logfile("llm_keyinfo_shard{shard}"),
    conda:
        "../envs/core.yaml"
    resources:
        llm_endpoint=1,
    params:
        py=PY,
        config=llm_config_json,
        cache=llm_cache,
        shards=config["llm"]["keyinfo"]["shards"],
    shell:
        "{params.py} -m workflow.llm.keyinfo shard --config {params.config:q} --cache {params.cache:q}"
        " --sections {input.sections:q} --studies {input.studies:q}"
        " --shard {wildcards.shard} --shards {params.shards}"
        " --findings {output.findings:q} --requests {output.requests:q} --rejects {output.rejects:q}"
        " --audit {output.audit:q} 2> {log:q}"


rule llm_keyinfo_merge:
    input:
        findings=expand(
            out("llm", "keyinfo", "shard{shard}", "findings.parquet"),
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        requests=expand(
            out("llm", "keyinfo", "shard{shard}", "requests.parquet"),
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        rejects=expand(
            out("llm", "keyinfo", "shard{shard}", "rejects.parquet"),
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        audit=expand(
            out("llm", "keyinfo", "shard{shard}", "audit.parquet"),
            shard=range(config["llm"]["keyinfo"]["shards"]),
        ),
        rules_findings=out("keyinfo", "rules", "findings.parquet"),
        sections=out("sections", "sections.parquet"),
    output:
        findings=llm_round_dir(0, "findings.parquet"),
        requests=llm_round_dir(0, "requests.parquet"),
        rejects=llm_round_dir(0, "rejects.parquet"),
        asked=llm_round_dir(0, "asked.parquet"),
        stats=llm_round_dir(0, "stats.parquet"),
        audit=out("llm", "keyinfo", "audit.parquet"),
        unknown_terms=out("llm", "keyinfo", "unknown_terms.parquet"),
    log:
        logfile("llm_keyinfo_merge"),
    conda:
        "../envs/core.yaml"
    params:
        py=PY,
        config=llm_config_json,
    shell:
        "{params.py} -m workflow.llm.keyinfo merge --config {params.config:q} --shard-findings {input.findings:q}"
        " --shard-requests {input.requests:q} --shard-rejects {input.rejects:q} --shard-audit {input.audit:q}"
        " --rules-findings {input.rules_findings:q} --sections {input.sections:q} --findings {output.findings:q}"
        " --requests {output.requests:q} --rejects {output.rejects:q} --asked {output.asked:q}"
        " --stats {output.stats:q} --audit {output.audit:q} --unknown-terms {output.unknown_terms:q} 2> {log:q}"


rule llm_followup:
    input:
        unpack(followup_previous),
        unpack(student_inputs),
        sections=out("sections", "sections.parquet"),
        studies=out("ingest", "studies.parquet"),
        rules_findings=out("keyinfo", "rules", "findings.parquet"),
    output:
        findings=out("llm", "followup", "round{round}", "findings.parquet"),
        asked=out("llm", "followup", "round{round}", "asked.parquet"),
        stats=out("llm", "followup", "round{round}", "stats.parquet"),
        requests=out("llm", "followup", "round{round}", "requests.parquet"),
    log:
        logfile("llm_followup_round{round}"),
    conda:
        "../envs/core.yaml"
    resources:
        llm_endpoint=1,
    params:
        py=PY,
        config=llm_config_json,
        cache=llm_cache,
    shell:
        "{params.py} -m workflow.llm.followup --config {params.config:q} --cache {params.cache:q}"
        " --round {wildcards.round} --sections {input.sections:q} --studies {input.studies:q}"
        " --rules-findings {input.rules_findings:q} --previous {input.previous:q}"
        " --previous-asked {input.previous_asked:q} --previous-stats {input.previous_stats:q}"
        " --previous-requests {input.previous_requests:q} --findings {output.findings:q}"
        " --asked {output.asked:q} --stats {output.stats:q} --requests {output.requests:q} 2> {log:q}"


ALL_TARGETS += llm_targets()
