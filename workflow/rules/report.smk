rule report:
    input:
        scores=expand(rules.score.output.scores, run=REFERENCES + RUNS + list(MERGED) + list(EXPORTS)),
        samples=expand(rules.score.output.samples, run=REFERENCES + RUNS + list(MERGED) + list(EXPORTS)),
        evaluations=expand(rules.generate.output.evaluation, run=REFERENCES + RUNS + list(MERGED) + list(EXPORTS)),
        metrics=expand(rules.train.output.metrics, run=RUNS),
        merges=expand(rules.merge.output.report, run=RUNS),
        exports=expand(rules.export.output.report, run=list(EXPORTS)),
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
    conda:
        CPU_ENV
    shell:
        "tunelab report --config {STUDY_FILE} --runs results/runs --out results/report > {log} 2>&1"
