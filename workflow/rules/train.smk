def distributed_of(wildcards):
    """The run's `train.distributed` (None: one GPU)."""
    return STUDY.run(wildcards.run).train.distributed


def per_node(key):
    """A resource function: SIZES' one-GPU `key` times the run's GPUs per node (1 without `distributed`)."""
    return lambda wildcards: sized(key)(wildcards) * (distributed_of(wildcards).gpus if distributed_of(wildcards) else 1)


def train_gpus(wildcards):
    """GPUs of a one-node job (--gpus on SLURM, and what `--resources gpu=N` counts locally); a multi-node job asks
    for its GPUs per node through gres instead, as --gpus would not spread them."""
    distributed = distributed_of(wildcards)
    return 0 if distributed and distributed.nodes > 1 else per_node("gpu")(wildcards)


def train_gres(wildcards):
    distributed = distributed_of(wildcards)
    if distributed and distributed.nodes > 1 and sized("gpu")(wildcards):
        return f"gpu:{distributed.gpus}"
    return ""


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
    # several GPUs/nodes (train.distributed): per node, the GPUs, 2 CPUs and SIZES' memory for each GPU; sbatch
    # starts one task per node, and `tunelab train` starts one launcher per node in it with srun (docs/cluster.md)
    threads: lambda wildcards: 2 * (distributed_of(wildcards).gpus if distributed_of(wildcards) else 1)
    resources:
        gpu=train_gpus,
        gres=train_gres,
        nodes=lambda wildcards: distributed_of(wildcards).nodes if distributed_of(wildcards) else 1,
        mem_mb=per_node("mem_mb"),
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
