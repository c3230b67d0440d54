# MIMIC-RG4 scenario splits (sn / sw / mn / mw) with input-agnostic rewriting; logic in workflow/rg4/.
# rg4.shards jobs each build the patients with subject_id % shards == shard (priors stay within a
# patient); the rg4 rule merges them into the stage's outputs, in the order one job writes them.

RG4_SHARDS = range(config["rg4"]["shards"])


rule rg4_shard:
    input:
        studies=rules.ingest.output.studies,
        images=rules.ingest.output.images,
        sections=rules.sections.output.sections,
        rewrite_rules=packaged("libs", "rg4_rules.yaml"),
    output:
        # the names workflow.rg4.build.ShardPaths gives them
        sn=out("rg4", "shard{shard}", "rg4_sn.parquet"),
        sw=out("rg4", "shard{shard}", "rg4_sw.parquet"),
        mn=out("rg4", "shard{shard}", "rg4_mn.parquet"),
        mw=out("rg4", "shard{shard}", "rg4_mw.parquet"),
        json_sn=out("rg4", "shard{shard}", "rg4_sn.jsonl.zst"),
        json_sw=out("rg4", "shard{shard}", "rg4_sw.jsonl.zst"),
        json_mn=out("rg4", "shard{shard}", "rg4_mn.jsonl.zst"),
        json_mw=out("rg4", "shard{shard}", "rg4_mw.jsonl.zst"),
        counts=out("rg4", "shard{shard}", "counts.parquet"),
        stats=out("rg4", "shard{shard}", "rewrite_stats.parquet"),
        rejects=out("rg4", "shard{shard}", "rejects_to_merge.parquet"),
        llm_requests=out("rg4", "shard{shard}", "llm_requests.parquet"),
        facts=out("rg4", "shard{shard}", "facts.json"),
    log:
        logfile("rg4_shard{shard}"),
    priority: 3  # the longest jobs: started first, the short ones fill around them
    conda:
        rg4_conda_env()
    # one process: the shards are the parallelism
    threads: 1
    resources:
        **llm_resources(
            config["rg4"]["llm"]["endpoint"]
            if config["rg4"]["rewriter"] == "llm"
            else None
        ),
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
        # the rules rewriter asks no LLM: no endpoint resource, rg4 runs beside the LLM stages
    params:
        py=PY,
        shards=config["rg4"]["shards"],
        folder=lambda wildcards, output: str(Path(output.facts).parent),
        rewriter=config["rg4"]["rewriter"],
        label_sections=(
            "--label-sections"
            if config["rg4"]["label_sections"]
            else "--no-label-sections"
        ),
        llm=rg4_llm_args,
        scores=lambda wildcards: rg4_scores_args(),
    shell:
        "{params.py} -m workflow.rg4 --studies {input.studies:q} --images {input.images:q}"
        " --sections {input.sections:q} --shard {wildcards.shard} --shards {params.shards}"
        " --shard-dir {params.folder:q} --rewriter {params.rewriter} {params.label_sections} {params.llm}"
        " {params.scores} --workers {threads} 2> {log:q}"


rule rg4:
    input:
        facts=expand(rules.rg4_shard.output.facts, shard=RG4_SHARDS),
        tables=expand(
            [rules.rg4_shard.output[s] for s in ("sn", "sw", "mn", "mw")],
            shard=RG4_SHARDS,
        ),
        counts=expand(rules.rg4_shard.output.counts, shard=RG4_SHARDS),
        stats=expand(rules.rg4_shard.output.stats, shard=RG4_SHARDS),
        rejects=expand(rules.rg4_shard.output.rejects, shard=RG4_SHARDS),
        llm_requests=expand(rules.rg4_shard.output.llm_requests, shard=RG4_SHARDS),
    output:
        sn=out("rg4", "rg4_sn.parquet"),
        sw=out("rg4", "rg4_sw.parquet"),
        mn=out("rg4", "rg4_mn.parquet"),
        mw=out("rg4", "rg4_mw.parquet"),
        counts=out("rg4", "counts.parquet"),
        stats=out("rg4", "rewrite_stats.parquet"),
        rejects=out("rg4", "rejects.parquet"),
        notes=out("rg4", "build_notes.json"),
        # the llm rewriter's requests (empty with the rules rewriter), counted in the report
        llm_requests=out("rg4", "llm_requests.parquet"),
    log:
        logfile("rg4"),
    priority: 1  # the report waits on it; release_rg4 (priority 0) does not hold anything up
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        folders=input_dirs,
    shell:
        "{params.py} -m workflow.rg4.merge --shard-dirs {params.folders:q}"
        " --tables {output.sn:q} {output.sw:q} {output.mn:q} {output.mw:q}"
        " --counts {output.counts:q} --stats {output.stats:q} --rejects {output.rejects:q} --notes {output.notes:q}"
        " --llm-requests {output.llm_requests:q} 2> {log:q}"


# the loader's JSON files: nothing downstream reads them, so they are merged beside the release and the
# report rather than before them
rule rg4_loader:
    input:
        expand(
            [rules.rg4_shard.output[f"json_{s}"] for s in ("sn", "sw", "mn", "mw")],
            shard=RG4_SHARDS,
        ),
    output:
        json_sn=out("rg4", "final_single_view_no_long_add1score_sentence_level.json"),
        json_sw=out("rg4", "final_single_view_with_long_add1score_sentence_level.json"),
        json_mn=out("rg4", "final_multi_view_no_long_add1score_sentence_level.json"),
        json_mw=out("rg4", "final_multi_view_with_long_add1score_sentence_level.json"),
    log:
        logfile("rg4_loader"),
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(1000),
        runtime=per_attempt(30),
    params:
        py=PY,
        folders=input_dirs,
    shell:
        "{params.py} -m workflow.rg4.merge --shard-dirs {params.folders:q}"
        " --json {output.json_sn:q} {output.json_sw:q} {output.json_mn:q} {output.json_mw:q} 2> {log:q}"


ALL_TARGETS += rules.rg4.output
ALL_TARGETS += rules.rg4_loader.output
