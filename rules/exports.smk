# Training files of the other seeds: R2GenGPT/MeGPT annotation.json, RaDialog RG/INS; logic in workflow/exports/.


rule exports:
    input:
        studies=rules.ingest.output.studies,
        images=rules.ingest.output.images,
        sections=rules.sections.output.sections,
        findings=findings_table(),
        prompts=packaged("libs", "radialog_prompts.yaml"),
    output:
        r2gen=out("exports", "r2gen", "annotation.json"),
        radialog_rg=out("exports", "radialog", "mimic_cxr_reports_stratified.json"),
        radialog_ins=out("exports", "radialog", "mimic_cxr_instruct_stratified.json"),
        summary=out("exports", "summary.json"),
        rejects=out("exports", "rejects.parquet"),
    log:
        logfile("exports"),
    conda:
        "../envs/core.yaml"
    threads: 2
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(60),
    params:
        py=PY,
        dataset=config["corpus"]["format"],
        report_sections=config["exports"]["report_sections"],
        clean="--clean" if config["exports"]["clean"] else "",
        iu_images=config["exports"]["iu_images"],
        seed=config["exports"]["seed"],
    shell:
        "{params.py} -m workflow.exports --studies {input.studies:q} --images {input.images:q}"
        " --sections {input.sections:q} --findings {input.findings:q} --r2gen {output.r2gen:q}"
        " --radialog-rg {output.radialog_rg:q} --radialog-ins {output.radialog_ins:q}"
        " --summary {output.summary:q} --rejects {output.rejects:q} --dataset {params.dataset}"
        " --report-sections {params.report_sections} {params.clean} --iu-images {params.iu_images}"
        " --seed {params.seed} --workers {threads} 2> {log:q}"


ALL_TARGETS += rules.exports.output
