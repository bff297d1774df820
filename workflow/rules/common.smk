# The study, validated by tunelab's own schema before any job starts, and the input functions.
import re

from snakemake.exceptions import WorkflowError

from tunelab.config import check_runtime, load_study
from tunelab.errors import TunelabError

STUDY_FILE = config.get("study", "config.yaml")
try:
    STUDY = load_study(STUDY_FILE)
    check_runtime(STUDY)
except TunelabError as err:
    raise WorkflowError(f"invalid study config:\n{err}") from None

RUNS = [run.name for run in STUDY.runs]
REFERENCES = STUDY.reference_runs
MODELS = list(dict.fromkeys(run.model for run in STUDY.runs))


wildcard_constraints:
    run="|".join(map(re.escape, RUNS + REFERENCES)),
    model="|".join(map(re.escape, MODELS)),


def model_of(run):
    """The study model a run (or a reference row) belongs to."""
    for model in MODELS:
        if run == STUDY.reference_name(model):
            return model
    return STUDY.run(run).model


def of_model(pattern):
    """An input function: `pattern` (a rule's output) filled with the model of the job's run."""
    return lambda wildcards: pattern.format(model=model_of(wildcards.run))


def trained_model(wildcards):
    """A run's trained model directory; nothing for a reference row, which generates from its base."""
    if wildcards.run in REFERENCES:
        return []
    return rules.train.output.model.format(run=wildcards.run)


def train_settings(wildcards):
    """The run's resolved settings: a change reruns this run (and the report) only."""
    return STUDY.run(wildcards.run).train.model_dump_json()
