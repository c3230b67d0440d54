# MIMIC-RG4 scenario splits (sn / sw / mn / mw) with input-agnostic rewriting; logic in workflow/rg4/.


rule rg4:
    input:
        studies=rules.ingest.output.studies,
        images=rules.ingest.output.images,
        sections=rules.sections.output.sections,
        rewrite_rules=packaged("libs", "rg4_rules.yaml"),
    output:
        sn=out("rg4", "rg4_sn.parquet"),
        sw=out("rg4", "rg4_sw.parquet"),
        mn=out("rg4", "rg4_mn.parquet"),
        mw=out("rg4", "rg4_mw.parquet"),
        json_sn=out("rg4", "final_single_view_no_long_add1score_sentence_level.json"),
        json_sw=out("rg4", "final_single_view_with_long_add1score_sentence_level.json"),
        json_mn=out("rg4", "final_multi_view_no_long_add1score_sentence_level.json"),
        json_mw=out("rg4", "final_multi_view_with_long_add1score_sentence_level.json"),
        counts=out("rg4", "counts.parquet"),
        stats=out("rg4", "rewrite_stats.parquet"),
        rejects=out("rg4", "rejects.parquet"),
        notes=out("rg4", "build_notes.json"),
        # the llm rewriter's requests (empty with the rules rewriter), counted in the report
        llm_requests=out("rg4", "llm_requests.parquet"),
    log:
        logfile("rg4"),
    conda:
        rg4_conda_env()
    threads: 2
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
        " --sections {input.sections:q}"
        " --tables {output.sn:q} {output.sw:q} {output.mn:q} {output.mw:q}"
        " --json {output.json_sn:q} {output.json_sw:q} {output.json_mn:q} {output.json_mw:q}"
        " --counts {output.counts:q} --stats {output.stats:q} --rejects {output.rejects:q} --notes {output.notes:q}"
        " --llm-requests {output.llm_requests:q}"
        " --rewriter {params.rewriter} {params.label_sections} {params.llm}"
        " {params.scores} --workers {threads} 2> {log:q}"


ALL_TARGETS += rules.rg4.output
