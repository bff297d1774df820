rule report:
    input:
        scores=expand(rules.score.output.scores, run=REFERENCES + RUNS),
        evaluations=expand(rules.generate.output.evaluation, run=REFERENCES + RUNS),
        metrics=expand(rules.train.output.metrics, run=RUNS),
    output:
        summary="results/report/summary.csv",
        markdown="results/report/report.md",
        html="results/report/report.html",
        plots=expand("results/report/{plot}.png", plot=("loss_curves", "quality_vs_memory", "quality_vs_speed", "latency")),
    params:
        study=STUDY.name,
    log:
        "results/logs/report.log",
    container:
        CPU_IMAGE
    shell:
        "tunelab report --config {STUDY_FILE} --runs results/runs --out results/report > {log} 2>&1"
