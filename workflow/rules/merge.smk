rule merge:
    wildcard_constraints:
        run=one_of(RUNS),
    input:
        model=rules.train.output.model,
        tokens=of_model(rules.tokenize.output.test),
    output:
        merged=directory("results/runs/{run}/merged"),
        report="results/runs/{run}/merge.json",
    params:
        settings=STUDY.merge.base,
    log:
        "results/runs/{run}/logs/merge.log",
    resources:
        gpu=sized("gpu"),
        mem_mb=sized("mem_mb"),
        runtime=sized("merge"),
    container:
        TRAIN_IMAGE
    conda:
        TRAIN_ENV
    shell:
        "tunelab merge --config {STUDY_FILE} --run {wildcards.run} --tokens $(dirname {input.tokens}) "
        "--out results/runs/{wildcards.run} > {log} 2>&1"
