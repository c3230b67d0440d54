# one process per shard (the studies with study_id % keyinfo.shards == shard): the shards are the parallelism
rule keyinfo_rules_shard:
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
        findings=out("keyinfo", "rules", "shard{shard}", "findings.parquet"),
        stats=out("keyinfo", "rules", "shard{shard}", "stats.parquet"),
        rejects=out("keyinfo", "rules", "shard{shard}", "rejects.parquet"),
        normal_statements=out(
            "keyinfo", "rules", "shard{shard}", "normal_statements.parquet"
        ),
    log:
        logfile("keyinfo_rules_shard{shard}"),
    wildcard_constraints:
        shard="[0-9]+",
    # first when cores are short: exports and vqa wait on this chain, rg4 does not
    priority: 4
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(3000),
        runtime=per_attempt(60),
    params:
        py=PY,
        shards=config["keyinfo"]["shards"],
        conventions=lambda wc: (
            f"--alternatives {config['keyinfo']['alternatives']} --hedges {config['keyinfo']['hedges']}"
            + ("" if config["keyinfo"]["lenient_sections"] else " --no-lenient")
        ),
    shell:
        "{params.py} -m workflow.keyinfo.run_rules --sections {input.sections:q} --reports {input.reports:q}"
        " --shard {wildcards.shard} --shards {params.shards} --workers 1 --findings {output.findings:q}"
        " --stats {output.stats:q} --rejects {output.rejects:q}"
        " --normal-statements {output.normal_statements:q} {params.conventions} 2> {log:q}"


# the shards' tables in the sections table's order: the files an unsharded run writes, byte for byte
rule keyinfo_rules:
    input:
        sections=rules.sections.output.sections,
        findings=expand(
            rules.keyinfo_rules_shard.output.findings,
            shard=range(config["keyinfo"]["shards"]),
        ),
        stats=expand(
            rules.keyinfo_rules_shard.output.stats,
            shard=range(config["keyinfo"]["shards"]),
        ),
        rejects=expand(
            rules.keyinfo_rules_shard.output.rejects,
            shard=range(config["keyinfo"]["shards"]),
        ),
        normal_statements=expand(
            rules.keyinfo_rules_shard.output.normal_statements,
            shard=range(config["keyinfo"]["shards"]),
        ),
    output:
        findings=out("keyinfo", "rules", "findings.parquet"),
        stats=out("keyinfo", "rules", "stats.parquet"),
        rejects=out("keyinfo", "rules", "rejects.parquet"),
        normal_statements=out("keyinfo", "rules", "normal_statements.parquet"),
    log:
        logfile("keyinfo_rules"),
    priority: 4  # as keyinfo_rules_shard
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
    shell:
        "{params.py} -m workflow.keyinfo.run_rules merge --sections {input.sections:q}"
        " --shard-findings {input.findings:q} --shard-stats {input.stats:q} --shard-rejects {input.rejects:q}"
        " --shard-normal-statements {input.normal_statements:q} --findings {output.findings:q}"
        " --stats {output.stats:q} --rejects {output.rejects:q}"
        " --normal-statements {output.normal_statements:q} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_rules.output


# normal / abnormal / unknown per study: the findings downstream stages read (either backend) counted per
# study read, with the normal statements the rules shards found in its text
rule keyinfo_studies:
    input:
        sections=rules.sections.output.sections,
        normal_statements=rules.keyinfo_rules.output.normal_statements,
        findings=findings_table,
    output:
        studies=out("keyinfo", "studies.parquet"),
    log:
        logfile("keyinfo_studies"),
    priority: 4  # as keyinfo_rules_shard
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
    shell:
        "{params.py} -m workflow.keyinfo.studies --sections {input.sections:q}"
        " --normal-statements {input.normal_statements:q} --findings {input.findings:q}"
        " --out {output.studies:q} 2> {log:q}"


ALL_TARGETS += rules.keyinfo_studies.output
