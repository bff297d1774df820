"""Experiment tracking of one training run: DVCLive by default, TensorBoard on request (`train.tracking`).

Each tracker's package is imported only when a run chooses it. Tracking settings are bookkeeping
(`config.BOOKKEEPING`): changing them reruns no training. Only the main process of a distributed run logs.
  dvclive      `results/runs/<run>/dvclive/`: params.yaml, metrics.json (the final figures), plots/metrics/train/*.tsv
               (one row per step). Offline: no DVC experiment and no dvc.yaml of its own (save_dvc_exp=False,
               dvcyaml=None), so concurrent jobs never touch the repository; the study's dvc.yaml declares the files.
  tensorboard  `results/runs/<run>/tensorboard/`: event files (`tensorboard --logdir results/runs`).
A resumed run continues the same step axis: rows the killed attempt logged after its checkpoint are dropped first.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import os
import subprocess
from pathlib import Path

import torch

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


TRACKERS = {"dvclive": _DVCLive, "tensorboard": _TensorBoard}
