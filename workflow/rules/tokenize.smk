rule tokenize:
    input:
        base=rules.base.output,
        train=rules.data.output.train,
        validation=rules.data.output.validation,
        test=rules.data.output.test,
    output:
        train="results/tokens/{model}/train.jsonl",
        validation="results/tokens/{model}/validation.jsonl",
        test="results/tokens/{model}/test.jsonl",
        stats="results/tokens/{model}/stats.json",
    params:
        settings=STUDY.data.model_dump_json(),
    log:
        "results/logs/tokenize/{model}.log",
    group:
        "prepare"
    container:
        CPU_IMAGE
    conda:
        CPU_ENV
    shell:
        "tunelab tokenize --config {STUDY_FILE} --base {input.base} --data $(dirname {input.train}) "
        "--out $(dirname {output.train}) > {log} 2>&1"
