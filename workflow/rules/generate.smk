rule generate:
    input:
        model=trained_model,
        base=of_model(rules.base.output[0]),
        tokens=of_model(rules.tokenize.output.test),
        test=rules.data.output.test,
    output:
        generations="results/runs/{run}/generations.jsonl",
        evaluation="results/runs/{run}/eval.json",
    params:
        settings=STUDY.generation.model_dump_json(),
        base_loading=base_loading,
    log:
        "results/runs/{run}/logs/generate.log",
    resources:
        gpu=sized("gpu"),
        mem_mb=sized("mem_mb"),
        runtime=sized("generate"),
    group:
        "evaluate"
    container:
        TRAIN_IMAGE
    conda:
        TRAIN_ENV
    shell:
        "tunelab generate --config {STUDY_FILE} --run {wildcards.run} --base {input.base} --data $(dirname {input.test}) "
        "--tokens $(dirname {input.tokens}) --out results/runs/{wildcards.run} > {log} 2>&1"
