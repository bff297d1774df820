rule base:
    input:
        train=rules.data.output.train,
        lock=study_lock,
    output:
        directory("results/base/{model}"),
    params:
        settings=lambda wildcards: STUDY.models[wildcards.model].model_dump_json(),
        # a GGUF model is saved in the weights dtype of its runs (tunelab.base.storage_dtype): rerun when it may change
        dtypes=lambda wildcards: sorted({(r.train.precision, r.train.method == "full") for r in STUDY.runs
                                         if r.model == wildcards.model}) if STUDY.models[wildcards.model].is_gguf else [],
    log:
        "results/logs/base/{model}.log",
    threads: 2
    group:
        "prepare"
    container:
        CPU_IMAGE
    conda:
        CPU_ENV
    shell:
        "tunelab base --config {STUDY_FILE} --model {wildcards.model} --data $(dirname {input.train}) --out {output} > {log} 2>&1"
