"""Experiment tracking of one training run (`train.tracking`): DVCLive by default; TensorBoard, W&B, MLflow on request.

Each tracker's package is imported only when a run chooses it. Tracking settings are bookkeeping
(`config.BOOKKEEPING`): changing them reruns no training. Only the main process of a distributed run logs.
  dvclive      `results/runs/<run>/dvclive/`: params.yaml, metrics.json (the final figures), plots/metrics/train/*.tsv
               (one row per step). Offline: no DVC experiment and no dvc.yaml of its own (save_dvc_exp=False,
               dvcyaml=None), so concurrent jobs never touch the repository; the study's dvc.yaml declares the files.
  tensorboard  `results/runs/<run>/tensorboard/`: event files (`tensorboard --logdir results/runs`).
  wandb        `results/runs/<run>/wandb/offline-run-*/`: offline W&B runs, no account; `wandb sync` uploads them.
  mlflow       an MLflow file store `results/runs/<run>/mlruns/`, or `train.mlflow.tracking_uri`; the run's id is
               kept in `results/runs/<run>/mlflow.json`.
A resumed run continues the same step axis: rows the killed attempt logged after its checkpoint are dropped first
(TensorBoard hides them; a resumed W&B run rewinds to the checkpoint's step when synced; a store at another URI
than `file:` keeps them, as MLflow's metric history is append-only). Credentials (WANDB_API_KEY,
MLFLOW_TRACKING_TOKEN) are read by the trackers' own libraries from the environment, never by tunelab.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import os
import subprocess
import time
import urllib.parse
from pathlib import Path

import torch

from tunelab.artifacts import read_json, write_json, write_text

log = logging.getLogger(__name__)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "kernels", "liger-kernel",
            "flash-attn", "deepspeed", "dvclive")
# Set by Apptainer/Singularity inside a container: the image's name and path. Not secrets; the only variables
# tunelab reads itself (tests/test_secrets.py holds the list).
CONTAINER_VARIABLES = ("APPTAINER_NAME", "APPTAINER_CONTAINER", "SINGULARITY_NAME", "SINGULARITY_CONTAINER")


def provenance() -> dict:
    """What produced a run: the project's git commit (and whether the tree had changes), the versions of the
    packages that shape training (None: not installed), and the container image, where known."""
    source = Path(__file__).resolve().parent
    commit = _git(source, "rev-parse", "HEAD")
    changes = _git(source, "status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    container = {name: os.environ[name] for name in CONTAINER_VARIABLES if os.environ.get(name)}
    return {"git_commit": commit, "git_dirty": bool(changes) if commit else None, "versions": versions,
            "container": container or None}


def _git(directory: Path, *args: str) -> str | None:
    """The output of a git command in `directory`, or None where git or a repository is missing."""
    try:
        result = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


class Trackers:
    """The trackers a run chose. `fit` calls `log_step` after every optimizer step and `finish` once at the end."""

    def __init__(self, names: list[str], out: Path, run: str, params: dict, first_step: int = 1):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        main_process = not distributed or torch.distributed.get_rank() == 0
        self.trackers = [TRACKERS[name](Path(out), run, params, first_step) for name in names] if main_process else []

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_step(step, metrics)

    def finish(self, final: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.finish(final)


class _DVCLive:
    def __init__(self, out: Path, run: str, params: dict, first_step: int):
        from dvclive import Live

        directory = out / "dvclive"
        resume = first_step > 1 and directory.is_dir()
        if resume:
            for table in (directory / "plots" / "metrics").rglob("*.tsv"):
                _drop_rows_from(table, first_step)
        self.live = Live(str(directory), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None,
                         monitor_system=False)
        self.live.log_params({"run": run, **params})

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(f"train/{name}", value, timestamp=True)  # tunelab status reads the times
        self.live.make_summary()  # metrics.json: the latest figures, for a reader while the run goes on

    def finish(self, final: dict[str, float]) -> None:
        self.live.summary.update(final)
        self.live.end()


def _drop_rows_from(table: Path, first_step: int) -> None:
    """Keep the rows of a DVCLive table logged before `first_step` (the resumed run logs the rest again)."""
    with open(table, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    step = rows[0].index("step")
    kept = [rows[0]] + [row for row in rows[1:] if int(row[step]) < first_step]
    with open(table, "w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows(kept)


class _TensorBoard:
    def __init__(self, out: Path, run: str, params: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events the killed attempt wrote from `first_step` on are hidden
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_step if first_step > 1 else None)
        self.writer.add_text("params", f"```\n{json.dumps({'run': run, **params}, indent=2)}\n```", first_step)
        self.step = first_step

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def finish(self, final: dict[str, float]) -> None:
        for name, value in final.items():
            self.writer.add_scalar(f"final/{name}", value, self.step)
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, run: str, params: dict, first_step: int):
        import wandb

        previous = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
        resume = first_step > 1 and bool(previous)
        self.run = wandb.init(
            mode="offline", dir=out, project=params["wandb"]["project"], name=run, config={"run": run, **params},
            reinit="finish_previous",  # a run left open in this process (a failed attempt) is closed first
            # each attempt is one offline run; a resumed one rewinds the W&B run to its checkpoint when synced
            resume_from=f"{previous[-1].stem.removeprefix('run-')}?_step={first_step - 1}" if resume else None,
            settings=wandb.Settings(console="off", disable_git=True, save_code=False, x_disable_stats=True, quiet=True))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({f"train/{name}": value for name, value in metrics.items()}, step=step)

    def finish(self, final: dict[str, float]) -> None:
        self.run.summary.update(final)
        self.run.finish()


class _Mlflow:
    def __init__(self, out: Path, run: str, params: dict, first_step: int):
        settings = params["mlflow"]
        uri = settings["tracking_uri"] or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3.7+ opens its file store (plain files, one folder per run) on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self.client, self.Metric, self.step = MlflowClient(tracking_uri=uri), Metric, first_step
        self.record = out / "mlflow.json"
        self.run_id = self._resumed(first_step, uri) or self._created(settings["experiment"], run)
        write_json(self.record, {"run_id": self.run_id})
        logged = self.client.get_run(self.run_id).data.params
        # a param can't change in MLflow: a resumed run keeps the first attempt's (only bookkeeping may differ)
        new = [Param(key, value) for key, value in _flat({"run": run, **params}).items() if key not in logged]
        for start in range(0, len(new), 100):  # MLflow's largest batch of params
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def _created(self, experiment: str, run: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = self.client.create_experiment(experiment)
            except MlflowException:  # another run's job created it first
                experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        return self.client.create_run(experiment_id, run_name=run, tags={"tunelab.run": run}).info.run_id

    def _resumed(self, first_step: int, uri: str) -> str | None:
        """The MLflow run of the killed attempt, its history from `first_step` on dropped (in a file store), or None."""
        if first_step == 1 or not self.record.is_file():
            return None
        from mlflow.exceptions import MlflowException

        run_id = read_json(self.record)["run_id"]
        try:
            info = self.client.get_run(run_id).info
        except MlflowException:
            return None
        if uri.startswith("file:"):
            store = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
            for history in (p for p in (store / info.experiment_id / run_id / "metrics").rglob("*") if p.is_file()):
                lines = history.read_text().splitlines(keepends=True)  # "<timestamp ms> <value> <step>"
                write_text(history, "".join(line for line in lines if int(line.split()[2]) < first_step))
        return run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step, now = step, int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(f"train/{name}", value, now, step)
                                                    for name, value in metrics.items()])

    def finish(self, final: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(name, value, now, self.step)
                                                    for name, value in final.items()])
        self.client.set_terminated(self.run_id)


def _flat(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow's flat strings: {"lora": {"r": 16}} -> {"lora.r": "16"}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


TRACKERS = {"dvclive": _DVCLive, "tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
