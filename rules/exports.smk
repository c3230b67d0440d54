# Training files of the other seeds: R2GenGPT/MeGPT annotation.json, RaDialog RG/INS; logic in workflow/exports/.

from workflow.exports import llm_tasks, prompt_source


rule exports:
    input:
        studies=rules.ingest.output.studies,
        images=rules.ingest.output.images,
        sections=rules.sections.output.sections,
        findings=findings_table(),
        prompts=packaged("libs", "radialog_prompts.yaml"),
        # the user's RaDialog prompt files (exports.radialog.prompts_from): a change rebuilds
        radialog_prompts=prompt_source.source_files(
            config["exports"]["radialog"]["prompts_from"]
        ),
    output:
        r2gen=out("exports", "r2gen", "annotation.json"),
        radialog_rg=out("exports", "radialog", "mimic_cxr_reports_stratified.json"),
        radialog_ins=out("exports", "radialog", "mimic_cxr_instruct_stratified.json"),
        summary=out("exports", "summary.json"),
        card=out("exports", "README.md"),
        rejects=out("exports", "rejects.parquet"),
        # the language tasks' LLM requests (empty with the rules backend), counted in the report
        llm_requests=out("exports", "llm_requests.parquet"),
    log:
        logfile("exports"),
    priority: 2  # after the rg4 shards, before the short vqa jobs (the report waits on it)
    conda:
        "../envs/core.yaml"
    # one process: on a laptop's cores it runs beside the rg4 and vqa shards (its --workers 2 overlap of
    # R2Gen and RaDialog saves less than it blocks)
    threads: 1
    resources:
        **llm_resources(
            config["exports"]["radialog"]["llm"]["endpoint"]
            if config["llm"]["backend"] == "llm"
            else None
        ),
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
        # with llm.backend: llm the two language tasks talk to their endpoint
    params:
        py=PY,
        dataset=config["corpus"]["format"],
        report_sections=(
            f"--report-sections {config['exports']['report_sections']}"
            if config["exports"]["report_sections"]
            else ""
        ),
        prompts_from=(
            f"--radialog-prompts-from {shlex.quote(config['exports']['radialog']['prompts_from'])}"
            if config["exports"]["radialog"]["prompts_from"]
            else ""
        ),
        prompt_key=config["exports"]["radialog"]["prompt_key"],
        llm=llm_tasks.rule_args(config, llm_settings_file("all"), llm_cache()),
        clean="--clean" if config["exports"]["clean"] else "",
        iu_images=config["exports"]["iu_images"],
        seed=config["exports"]["seed"],
    shell:
        "{params.py} -m workflow.exports --studies {input.studies:q} --images {input.images:q}"
        " --sections {input.sections:q} --findings {input.findings:q} --r2gen {output.r2gen:q}"
        " --radialog-rg {output.radialog_rg:q} --radialog-ins {output.radialog_ins:q}"
        " --summary {output.summary:q} --card {output.card:q} --rejects {output.rejects:q} --dataset {params.dataset}"
        " --llm-requests {output.llm_requests:q}"
        " {params.report_sections} {params.clean} --iu-images {params.iu_images}"
        " {params.prompts_from} --radialog-prompt-key {params.prompt_key:q}"
        " {params.llm}"
        " --seed {params.seed} --workers {threads} 2> {log:q}"


ALL_TARGETS += rules.exports.output
