rule merge:
    input:
        model=rules.train.output.model,
        tokens=of_model(rules.tokenize.output.test),
    output:
        merged=directory("results/runs/{run}/merged"),
        report="results/runs/{run}/merge.json",
    log:
        "results/runs/{run}/logs/merge.log",
    shell:
        "tunelab merge --config {STUDY_FILE} --run {wildcards.run} --tokens $(dirname {input.tokens}) "
        "--out results/runs/{wildcards.run} > {log} 2>&1"
