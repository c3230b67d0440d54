# Figures for `snakemake --report report.html`; logic in workflow/report.py, captions in workflow/report_captions/.


rule report_figures:
    input:
        unpack(report_inputs),
    output:
        counts=report(
            out("report", "stage_counts.png"),
            caption="../workflow/report_captions/stage_counts.rst",
            category="1. Pipeline",
        ),
        counts_table=report(
            out("report", "stage_counts.csv"),
            caption="../workflow/report_captions/stage_counts.rst",
            category="1. Pipeline",
        ),
        counts_html=report(
            out("report", "stage_counts.html"),
            caption="../workflow/report_captions/stage_counts.rst",
            category="1. Pipeline",
        ),
        reasons=report(
            out("report", "rejects_by_reason.csv"),
            caption="../workflow/report_captions/rejects.rst",
            category="1. Pipeline",
        ),
        reasons_html=report(
            out("report", "rejects_by_reason.html"),
            caption="../workflow/report_captions/rejects.rst",
            category="1. Pipeline",
        ),
        prevalence=report(
            out("report", "label_prevalence.png"),
            caption="../workflow/report_captions/label_prevalence.rst",
            category="2. Key information",
        ),
        prevalence_table=report(
            out("report", "label_prevalence.csv"),
            caption="../workflow/report_captions/label_prevalence.rst",
            category="2. Key information",
        ),
        prevalence_html=report(
            out("report", "label_prevalence.html"),
            caption="../workflow/report_captions/label_prevalence.rst",
            category="2. Key information",
        ),
        questions=report(
            out("report", "questions.png"),
            caption="../workflow/report_captions/questions.rst",
            category="3. Medical-CXR-VQA",
        ),
        answers=report(
            directory(out("report", "answers")),
            patterns=["{qtype}.png"],
            caption="../workflow/report_captions/answers.rst",
            category="3. Medical-CXR-VQA",
            subcategory="Answers per question type",
            labels={"question type": "{qtype}"},
        ),
        type_mix=report(
            out("report", "vqa_type_mix.png"),
            caption="../workflow/report_captions/vqa_type_mix.rst",
            category="3. Medical-CXR-VQA",
        ),
        type_mix_table=report(
            out("report", "vqa_type_mix.csv"),
            caption="../workflow/report_captions/vqa_type_mix.rst",
            category="3. Medical-CXR-VQA",
        ),
        type_mix_html=report(
            out("report", "vqa_type_mix.html"),
            caption="../workflow/report_captions/vqa_type_mix.rst",
            category="3. Medical-CXR-VQA",
        ),
        rg4=report(
            out("report", "rg4.png"),
            caption="../workflow/report_captions/rg4.rst",
            category="4. MIMIC-RG4",
        ),
    log:
        logfile("report_figures"),
    conda:
        "../envs/core.yaml"
    # one process: at the end of the DAG it runs beside release_vqa, which needs the other core (two
    # forked drawing processes took both cores and left release_vqa waiting). More threads
    # (--set-threads report_figures=N) draw the figures in N processes forked after the imports
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        stages=report_stage_args,
        outdir=first_output_dir,
    shell:
        "{params.py} -m workflow.report {params.stages} --findings {input.findings:q}"
        " --questions {input.questions:q} --vqa-stats {input.vqa_stats:q} --rg4-counts {input.rg4_counts:q} --rg4-stats {input.rg4_stats:q}"
        " --workers {threads} --outdir {params.outdir:q} 2> {log:q}"


ALL_TARGETS += rules.report_figures.output


if config["llm"]["backend"] == "llm":

    rule report_llm:
        input:
            requests=llm_report_requests(),
            followup=llm_round_table(config["llm"]["followup"]["rounds"], "stats"),
        output:
            figure=report(
                out("report", "llm", "llm.png"),
                caption="../workflow/report_captions/llm.rst",
                category="5. LLM usage",
            ),
            table=report(
                out("report", "llm", "llm_usage.csv"),
                caption="../workflow/report_captions/llm.rst",
                category="5. LLM usage",
            ),
            table_html=report(
                out("report", "llm", "llm_usage.html"),
                caption="../workflow/report_captions/llm.rst",
                category="5. LLM usage",
            ),
        log:
            logfile("report_llm"),
        conda:
            "../envs/core.yaml"
        resources:
            mem_mb=per_attempt(2000),
            runtime=per_attempt(30),
        params:
            py=PY,
            outdir=first_output_dir,
        shell:
            "{params.py} -m workflow.report --llm-requests {input.requests:q}"
            " --followup-stats {input.followup:q} --outdir {params.outdir:q} 2> {log:q}"

    ALL_TARGETS += rules.report_llm.output
