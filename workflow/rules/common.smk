# The study, validated by tunelab's own schema before any job starts, and the input functions.
import functools
import re
import sys

from snakemake.exceptions import WorkflowError

from tunelab.config import BOOKKEEPING, check_runtime, load_study
from tunelab.errors import TunelabError
from tunelab.hub import lock_path
from tunelab.sizing import parameter_count

STUDY_FILE = config.get("study", "config.yaml")
try:
    STUDY = load_study(STUDY_FILE)
    if not workflow.deployment_settings.deployment_method:  # jobs run in this environment: check it now
        check_runtime(STUDY)  # (in an image or conda env, `tunelab train` checks it inside the job)
except TunelabError as err:
    raise WorkflowError(f"invalid study config:\n{err}") from None

RUNS = [run.name for run in STUDY.runs]
REFERENCES = STUDY.reference_runs
EXPORTS = STUDY.export_runs  # "<run>.<format>" -> (run, format)
MERGED = STUDY.merged_runs  # "<run>.merged" -> run: merged models generated and scored as rows of their own
MODELS = list(dict.fromkeys(run.model for run in STUDY.runs))


def study_lock(wildcards):
    """The study's lock file of Hub commits (tunelab lock), where it has one: a changed commit reruns data/base."""
    lock = lock_path(STUDY.path)
    return [str(lock)] if lock.is_file() else []


def one_of(names):
    return "|".join(map(re.escape, names)) or "(?!)"


wildcard_constraints:
    run=one_of(RUNS + REFERENCES + list(EXPORTS) + list(MERGED)),
    model=one_of(MODELS),


def model_of(run):
    """The study model a run, a reference row, a merged row or an export belongs to."""
    if run in STUDY.reference_rows:  # base-<model>, base-<model>.<nf4|int8>
        return STUDY.reference_rows[run][0]
    return STUDY.run(EXPORTS[run][0] if run in EXPORTS else MERGED.get(run, run)).model


def of_model(pattern):
    """An input function: `pattern` (a rule's output) filled with the model of the job's run."""
    return lambda wildcards: pattern.format(model=model_of(wildcards.run))


def trained_model(wildcards):
    """The model a job generates from: a run's trained model, its merged one or an export's quantized one;
    nothing for a reference row, which generates from its base."""
    if wildcards.run in REFERENCES:
        return []
    if wildcards.run in MERGED:
        return rules.merge.output.merged.format(run=MERGED[wildcards.run])
    if wildcards.run in EXPORTS:
        return rules.export.output.model.format(run=wildcards.run)
    return rules.train.output.model.format(run=wildcards.run)


def base_loading(wildcards):
    """How a quantized base row loads its base (its QLoRA run's quantization and precision): a change reruns it."""
    settings = STUDY.reference_settings(wildcards.run) if wildcards.run in REFERENCES else None
    return settings.model_dump_json(include={"quantization", "precision", "attention"}) if settings else ""


def merged_source(wildcards):
    """The merged model an export quantizes."""
    return rules.merge.output.merged.format(run=EXPORTS[wildcards.run][0])


def train_settings(wildcards):
    """The run's resolved settings: a change reruns this run (and the report) only."""
    return STUDY.run(wildcards.run).train.model_dump_json(exclude=BOOKKEEPING)


# What each job asks of a cluster (profiles/slurm) and of the local scheduler, by the parameter count of its run's
# model (read from its config: tunelab.sizing). gpu: GPUs (0: CPU only, so the tiny study runs on a CPU-only
# SLURM); mem_mb: host memory; train/merge/generate: time limits in minutes. A 7B LoRA run in bf16 takes about 3x
# the 1.5B one; leave headroom, a job past its limit is killed.
SIZES = {
    "tiny": {"gpu": 0, "mem_mb": 1500, "train": 30, "merge": 10, "generate": 10},
    "0.5B": {"gpu": 1, "mem_mb": 16000, "train": 120, "merge": 15, "generate": 30},
    "1.5B": {"gpu": 1, "mem_mb": 32000, "train": 240, "merge": 30, "generate": 60},
    "7B": {"gpu": 1, "mem_mb": 64000, "train": 720, "merge": 60, "generate": 120},
}
# The largest parameter count of each row (SmolLM2-135M and Qwen2.5-0.5B: 0.5B; Qwen2.5-1.5B: 1.5B); above: 7B.
SIZE_LIMITS = {"0.5B": 0.6e9, "1.5B": 2.5e9}
# Train jobs are preemptible: SLURM sends SIGUSR1 to the job's steps (so to `tunelab train`, which checkpoints and
# exits) 5 minutes before the time limit, and may requeue the job; the rerun resumes from the checkpoint. Not
# `B:USR1`: that signals only the plugin's batch script, which dies of it, and training then gets SIGTERM with
# KillWait (30 s) to save (measured on slurm 22.05, docs/cluster.md).
PREEMPTIBLE = "--signal=USR1@300 --requeue"

# Job groups: on a cluster (profiles/slurm) a group's connected jobs are one SLURM job, and so one queue wait; its
# single job step runs them with a snakemake of its own. Locally groups are ignored. "prepare" is data, base and
# tokenize (one job per study); "evaluate" is one run's [export,] generate and score (one job per run). The group
# asks for the sum of the runtimes of jobs that follow each other, and the most GPUs, memory and CPUs that its
# jobs use at once (jobs that can run side by side, as two models' base jobs, add up). train and merge stay
# alone: train is long and preemptible (its slurm_extra would have to be every member's), merge feeds exports.

# Apptainer images (containers/*.def, built with `apptainer build`); used under --sdm apptainer only.
TRAIN_IMAGE = "containers/train.sif"
CPU_IMAGE = "containers/cpu.sif"
# Their conda equivalents (envs/*.yaml, same locked versions), used under --sdm conda only.
TRAIN_ENV = "../../envs/tunelab-gpu.yaml"
CPU_ENV = "../../envs/tunelab-cpu.yaml"


@functools.cache
def model_size(model):
    """The SIZES row of a study model: 'tiny', else by its parameter count read from its config. Where no config is
    readable here (an hf: model neither cached nor reachable), by the `…B` in its name, else the largest row."""
    source = STUDY.models[model].source
    if source == "tiny":
        return "tiny"
    parameters, where = parameter_count(source)
    if parameters is None:
        billions = re.search(r"(\d+(?:\.\d+)?)B\b", source)
        row = "7B" if not billions or float(billions.group(1)) > 2 else "1.5B"
        print(f"tunelab: model {model}: no parameter count ({where}); resources of the {row} row, from "
              f"{'the ' + billions.group(0) + ' in its name' if billions else 'no size in its name'}", file=sys.stderr)
        return row
    return next((row for row, limit in SIZE_LIMITS.items() if parameters <= limit), "7B")


def sized(key):
    """A resource function: the SIZES entry `key` for the model of the job's run (or reference row)."""
    return lambda wildcards: SIZES[model_size(model_of(wildcards.run))][key]
