rule export:
    wildcard_constraints:
        run=one_of(list(EXPORTS)),
    input:
        merged=merged_source,
        tokens=of_model(rules.tokenize.output.train),  # calibration and recovery of pruned_int8; test prompts
    output:
        model=directory("results/runs/{run}/model"),
        report="results/runs/{run}/export.json",
    params:
        settings=lambda wildcards: [EXPORTS[wildcards.run], STUDY.exports.model_dump_json(exclude={"formats", "runs"})],
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
        "--tokens $(dirname {input.tokens}) --out results/runs/{wildcards.run} > {log} 2>&1"
