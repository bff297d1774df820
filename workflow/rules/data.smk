rule data:
    input:
        lock=study_lock,
    output:
        train="results/data/train.jsonl",
        validation="results/data/validation.jsonl",
        test="results/data/test.jsonl",
        stats="results/data/stats.json",
    params:
        settings=STUDY.data.model_dump_json(),
    log:
        "results/logs/data.log",
    group:
        "prepare"
    container:
        CPU_IMAGE
    conda:
        CPU_ENV
    shell:
        "tunelab data --config {STUDY_FILE} --out $(dirname {output.train}) > {log} 2>&1"
