rule train:
    wildcard_constraints:
        run=one_of(RUNS),
    input:
        base=of_model(rules.base.output[0]),
        tokens=of_model(rules.tokenize.output.train),
    output:
        model=directory("results/runs/{run}/model"),
        metrics="results/runs/{run}/train_metrics.json",
    params:
        settings=train_settings,
    log:
        "results/runs/{run}/logs/train.log",
    threads: 2
    resources:
        gpu=sized("gpu"),
        mem_mb=sized("mem_mb"),
        runtime=sized("train"),
        slurm_extra=PREEMPTIBLE,
    container:
        TRAIN_IMAGE
    conda:
        TRAIN_ENV
    # `>>`: a job resumed from its checkpoints keeps the log of the interrupted attempt
    shell:
        "tunelab train --config {STUDY_FILE} --run {wildcards.run} --base {input.base} "
        "--tokens $(dirname {input.tokens}) --out results/runs/{wildcards.run} >> {log} 2>&1"
