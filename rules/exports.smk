# Training files of the other seeds: R2GenGPT/MeGPT annotation.json, RaDialog RG/INS; logic in workflow/exports/.
# Two jobs build them side by side (R2Gen needs no findings: it starts once the sections exist), each
# with its part of the summary; the exports rule writes the stage's summary, card, rejects and LLM
# requests from the parts.

from workflow.exports import llm_tasks, prompt_source


rule exports_r2gen:
    input:
        studies=rules.ingest.output.studies,
        images=rules.ingest.output.images,
        sections=rules.sections.output.sections,
    output:
        r2gen=out("exports", "r2gen", "annotation.json"),
        r2gen_part=out("exports", "parts", "r2gen.json"),
        # every RaDialog image is an R2Gen item: the R2Gen export decides which studies are in none
        r2gen_rejects=out("exports", "parts", "rejects.parquet"),
    log:
        logfile("exports_r2gen"),
    priority: 2  # after the rg4 shards (the report waits on it)
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        dataset=config["corpus"]["format"],
        report_sections=(
            f"--report-sections {config['exports']['report_sections']}"
            if config["exports"]["report_sections"]
            else ""
        ),
        clean="--clean" if config["exports"]["clean"] else "",
        iu_images=config["exports"]["iu_images"],
    shell:
        "{params.py} -m workflow.exports r2gen --studies {input.studies:q} --images {input.images:q}"
        " --sections {input.sections:q} --r2gen {output.r2gen:q} --part {output.r2gen_part:q}"
        " --rejects {output.r2gen_rejects:q} --dataset {params.dataset}"
        " {params.report_sections} {params.clean} --iu-images {params.iu_images} 2> {log:q}"


rule exports_radialog:
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
        radialog_rg=out("exports", "radialog", "mimic_cxr_reports_stratified.json"),
        radialog_ins=out("exports", "radialog", "mimic_cxr_instruct_stratified.json"),
        radialog_part=out("exports", "parts", "radialog.json"),
        # the language tasks' LLM requests (empty with the rules backend)
        radialog_llm_requests=out("exports", "parts", "llm_requests.parquet"),
    log:
        logfile("exports_radialog"),
    priority: 2  # after the rg4 shards (the report waits on it)
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        # with llm.backend: llm the two language tasks talk to their endpoint
        **llm_resources(
            config["exports"]["radialog"]["llm"]["endpoint"]
            if config["llm"]["backend"] == "llm"
            else None
        ),
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
    params:
        py=PY,
        prompts_from=(
            f"--radialog-prompts-from {shlex.quote(config['exports']['radialog']['prompts_from'])}"
            if config["exports"]["radialog"]["prompts_from"]
            else ""
        ),
        prompt_key=config["exports"]["radialog"]["prompt_key"],
        llm=llm_tasks.rule_args(config, llm_settings_file("all"), llm_cache()),
        seed=config["exports"]["seed"],
    shell:
        "{params.py} -m workflow.exports radialog --studies {input.studies:q} --images {input.images:q}"
        " --sections {input.sections:q} --findings {input.findings:q}"
        " --radialog-rg {output.radialog_rg:q} --radialog-ins {output.radialog_ins:q}"
        " --part {output.radialog_part:q} --llm-requests {output.radialog_llm_requests:q}"
        " {params.prompts_from} --radialog-prompt-key {params.prompt_key:q}"
        " {params.llm} --seed {params.seed} 2> {log:q}"


rule exports:
    input:
        # the files the summary describes, and the parts it is made of
        rules.exports_r2gen.output.r2gen,
        rules.exports_radialog.output.radialog_rg,
        rules.exports_radialog.output.radialog_ins,
        r2gen_part=rules.exports_r2gen.output.r2gen_part,
        r2gen_rejects=rules.exports_r2gen.output.r2gen_rejects,
        radialog_part=rules.exports_radialog.output.radialog_part,
        radialog_llm_requests=rules.exports_radialog.output.radialog_llm_requests,
    output:
        summary=out("exports", "summary.json"),
        card=out("exports", "README.md"),
        rejects=out("exports", "rejects.parquet"),
        # the language tasks' LLM requests (empty with the rules backend), counted in the report
        llm_requests=out("exports", "llm_requests.parquet"),
    log:
        logfile("exports"),
    priority: 1  # the report waits on it
    conda:
        "../envs/core.yaml"
    threads: 1
    resources:
        mem_mb=per_attempt(500),
        runtime=per_attempt(10),
    params:
        py=PY,
    shell:
        "{params.py} -m workflow.exports summary --r2gen-part {input.r2gen_part:q}"
        " --r2gen-rejects {input.r2gen_rejects:q} --radialog-part {input.radialog_part:q}"
        " --radialog-llm-requests {input.radialog_llm_requests:q} --summary {output.summary:q}"
        " --card {output.card:q} --rejects {output.rejects:q} --llm-requests {output.llm_requests:q}"
        " 2> {log:q}"


ALL_TARGETS += rules.exports.output
