rule base:
    input:
        train=rules.data.output.train,
        lock=study_lock,
    output:
        directory("results/base/{model}"),
    params:
        settings=lambda wildcards: STUDY.models[wildcards.model].model_dump_json(),
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
