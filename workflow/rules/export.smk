rule export:
    wildcard_constraints:
        run=one_of(list(EXPORTS)),
    input:
        merged=merged_source,
    output:
        model=directory("results/runs/{run}/model"),
        report="results/runs/{run}/export.json",
    params:
        settings=lambda wildcards: [EXPORTS[wildcards.run], STUDY.exports.prune_amount],
    log:
        "results/runs/{run}/logs/export.log",
    resources:
        gpu=sized("gpu"),
        mem_mb=sized("mem_mb"),
        runtime=sized("merge"),
    group:
        "evaluate"
    container:
        TRAIN_IMAGE
    conda:
        TRAIN_ENV
    shell:
        "tunelab export --config {STUDY_FILE} --run {wildcards.run} --merged {input.merged} "
        "--out results/runs/{wildcards.run} > {log} 2>&1"
