# The clinicians' review (not part of `all`): `snakemake review` writes <outdir>/review/index.html, one
# self-contained offline page; `snakemake review_score` turns the exported verdicts.csv files
# (config `review.verdicts`) into precision.csv, agreement.csv and a report figure. Logic in workflow/review/.


rule review:
    input:
        unpack(review_inputs),
    output:
        page=out("review", "index.html"),
        sample=out("review", "sample.csv"),
    log:
        logfile("review"),
    conda:
        "../envs/core.yaml"
    params:
        py=PY,
        n=config["review"]["n"],
        seed=config["review"]["seed"],
        args=review_args,
    shell:
        "{params.py} -m workflow.review.build --sections {input.sections:q} --images {input.images:q}"
        " --findings {input.findings:q} --questions {input.questions:q} {params.args}"
        " --n {params.n} --seed {params.seed} --page {output.page:q} --sample {output.sample:q} 2> {log:q}"


rule review_score:
    input:
        verdicts=review_verdicts,
    output:
        precision=report(
            out("review", "precision.csv"),
            caption="../workflow/report_captions/review.rst",
            category="6. Clinicians' review",
        ),
        agreement=report(
            out("review", "agreement.csv"),
            caption="../workflow/report_captions/review.rst",
            category="6. Clinicians' review",
        ),
        figure=report(
            out("review", "precision.png"),
            caption="../workflow/report_captions/review.rst",
            category="6. Clinicians' review",
        ),
    log:
        logfile("review_score"),
    conda:
        "../envs/core.yaml"
    params:
        py=PY,
    shell:
        "{params.py} -m workflow.review.score {input.verdicts:q} --precision {output.precision:q}"
        " --agreement {output.agreement:q} --figure {output.figure:q} 2> {log:q}"
