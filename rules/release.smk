# Release folders (one Parquet per config and split + a dataset card) for the VQA and RG4 datasets, loadable
# with `datasets.load_dataset(<folder>, <config>)`; logic in workflow/cards.py.


rule release_vqa:
    input:
        default=rules.vqa.output.questions,
    output:
        card=out("release", "medical_cxr_vqa", "README.md"),
    log:
        logfile("release_vqa"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        spec="medical_cxr_vqa",
        tables=release_args,
        config=card_config("medical_cxr_vqa"),
        format=config["corpus"]["format"],
        demo="--demo" if corpus_is_demo() else "",
        outdir=first_output_dir,
    shell:
        "{params.py} -m workflow.cards {params.tables} --spec {params.spec} --config-json {params.config:q}"
        " --corpus-format {params.format} {params.demo} --out {params.outdir:q} 2> {log:q}"


rule release_rg4:
    input:
        sn=rules.rg4.output.sn,
        sw=rules.rg4.output.sw,
        mn=rules.rg4.output.mn,
        mw=rules.rg4.output.mw,
        notes=rules.rg4.output.notes,
    output:
        card=out("release", "mimic_rg4", "README.md"),
    log:
        logfile("release_rg4"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        py=PY,
        spec="mimic_rg4",
        tables=lambda wildcards, input: " ".join(
            f"--table {s}={input[s]}" for s in ("sn", "sw", "mn", "mw")
        ),
        config=card_config("mimic_rg4"),
        format=config["corpus"]["format"],
        demo="--demo" if corpus_is_demo() else "",
        outdir=first_output_dir,
    shell:
        "{params.py} -m workflow.cards {params.tables} --spec {params.spec} --config-json {params.config:q}"
        " --corpus-format {params.format} {params.demo} --notes {input.notes:q} --out {params.outdir:q}"
        " 2> {log:q}"


ALL_TARGETS += rules.release_vqa.output
ALL_TARGETS += rules.release_rg4.output
