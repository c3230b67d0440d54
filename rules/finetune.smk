# Fine-tuning the student: gold -> LLaMA-Factory SFT data -> LoRA training (DeepSpeed, N GPUs) -> evaluation
# against the teacher on held-out gold. Logic in workflow/finetune/. The rules are only reached when an LLM
# stage asks the student (see student_needed() in common.smk); LLM stages take the adapter through
# student_inputs().


rule finetune_data:
    input:
        sample=rules.llm_gold.output.sample,
        gold=rules.llm_gold.output.findings,
        sft=rules.llm_gold.output.sft,
        sections=rules.sections.output.sections,
    output:
        data=out("finetune", "data", "keyinfo_sft.json"),
        info=out("finetune", "data", "dataset_info.json"),
        split=out("finetune", "data", "split.parquet"),
        rejects=out("finetune", "data", "rejects.parquet"),
    log:
        logfile("finetune_data"),
    conda:
        "../envs/core.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        python=PY,
        outdir=first_output_dir,
        heldout=config["finetune"]["heldout_fraction"],
        seed=config["finetune"]["seed"],
        target=config["finetune"]["target"],
    shell:
        "{params.python} -m workflow.finetune.data --sample {input.sample:q} --gold {input.gold:q} --sft {input.sft:q}"
        " --sections {input.sections:q} --outdir {params.outdir:q} --heldout-fraction {params.heldout}"
        " --seed {params.seed} --target {params.target} 2> {log:q}"


rule finetune:
    input:
        data=rules.finetune_data.output.data,
        info=rules.finetune_data.output.info,
    output:
        adapter=out("finetune", "adapter", "adapter_config.json"),
        weights=out("finetune", "adapter", "adapter_model.safetensors"),
        loss=out("finetune", "adapter", "loss.tsv"),
        yaml=out("finetune", "adapter", "train.yaml"),
    log:
        logfile("finetune"),
    conda:
        "../envs/llamafactory.yaml"
    threads: 8
    resources:
        gpu=config["finetune"]["gpus"] * config["finetune"]["nodes"],
        gpu_model=config["finetune"]["gpu_model"],
        nodes=config["finetune"]["nodes"],
    params:
        python=PY,
        settings=finetune_settings,
        datadir=first_input_dir,
        adapter_dir=first_output_dir,
    shell:
        "{params.python} -m workflow.finetune.train --dataset-dir {params.datadir:q}"
        " --output-dir {params.adapter_dir:q}"
        " --settings {params.settings:q} 2> {log:q}"


rule finetune_merge:
    input:
        adapter=rules.finetune.output.adapter,
    output:
        merged=out("finetune", "merged", "config.json"),
    log:
        logfile("finetune_merge"),
    conda:
        "../envs/llamafactory.yaml"
    threads: 8
    params:
        python=PY,
        settings=finetune_settings,
        adapter_dir=first_input_dir,
        merged_dir=first_output_dir,
    shell:
        "{params.python} -m workflow.finetune.train --merge-only"
        " --output-dir {params.adapter_dir:q} --merged-dir {params.merged_dir:q}"
        " --settings {params.settings:q} 2> {log:q}"


rule finetune_eval:
    input:
        adapter=rules.finetune.output.adapter,
        split=rules.finetune_data.output.split,
        gold=rules.llm_gold.output.findings,
        sections=rules.sections.output.sections,
        studies=rules.ingest.output.studies,
        rules_findings=rules.keyinfo_rules.output.findings,
    output:
        table=out("finetune", "eval.parquet"),
        markdown=out("finetune", "eval.md"),
    log:
        logfile("finetune_eval"),
    conda:
        llm_conda_env(config["llm"]["keyinfo"]["endpoint"])
    resources:
        **llm_resources(config["finetune"]["endpoint"]),
    params:
        python=PY,
        # the student answers the very requests bulk keyinfo sends: that stage's settings and identity
        settings=llm_settings_file("keyinfo"),
        identity=llm_stage_identity("keyinfo"),
        cache=llm_cache,
    shell:
        "{params.python} -m workflow.finetune.evaluate --gold {input.gold:q} --split {input.split:q}"
        " --sections {input.sections:q} --studies {input.studies:q} --config {params.settings:q}"
        " --cache {params.cache:q} --compare rules={input.rules_findings:q} --out {output.table:q} 2> {log:q}"


ALL_TARGETS += finetune_targets()
