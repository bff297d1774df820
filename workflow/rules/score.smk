rule score:
    input:
        generations=rules.generate.output.generations,
        test=rules.data.output.test,
    output:
        scores="results/runs/{run}/scores.json",
        samples="results/runs/{run}/sample_scores.jsonl",
    params:
        settings=STUDY.metrics.model_dump_json(),
    log:
        "results/runs/{run}/logs/score.log",
    group:
        "evaluate"
    container:
        CPU_IMAGE
    conda:
        CPU_ENV
    shell:
        "tunelab score --config {STUDY_FILE} --generations {input.generations} "
        "--data $(dirname {input.test}) --out results/runs/{wildcards.run} > {log} 2>&1"
