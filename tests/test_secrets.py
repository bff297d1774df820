"""Credentials live in the environment only (HF_TOKEN, read by huggingface_hub itself; a tracker's WANDB_API_KEY or
MLFLOW_TRACKING_TOKEN, read by its own library): running the tiny study with them set writes them nowhere, neither
into results/ (logs, metrics, trackers' files, reports) nor into .snakemake/; nor does a run logging to every
tracker (W&B and MLflow included), in its folder, its output or the trackers' files in the home directory.

The suite runs the tiny study once (conftest's session fixture `tiny_study`). It runs with these fake tokens: the
variables are set here, when pytest collects this module, which is before any fixture runs. A token already in the
environment is kept and searched for instead."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys

import yaml

from conftest import REPO

from tunelab.tracking import CONTAINER_VARIABLES

TOKENS = {name: os.environ.setdefault(name, prefix + secrets.token_hex(16)) for name, prefix in (
    ("HF_TOKEN", "hf_fake"), ("WANDB_API_KEY", "wandb_fake"), ("MLFLOW_TRACKING_TOKEN", "mlflow_fake"))}


def test_tokens_are_written_nowhere(tiny_study):
    assert all(os.environ[name] == token for name, token in TOKENS.items()), "the study ran with the tokens set"
    files = [p for p in tiny_study.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.match(".snakemake/log/*.log") for p in files), "the study ran and logged"
    assert (tiny_study / "results/report/report.html").is_file()
    assert any(tiny_study.glob("results/runs/*/dvclive/params.yaml")), "the tracker's files are searched too"
    leaks = [f"{name} in {p.relative_to(tiny_study)}" for p in files for name, token in TOKENS.items()
             if token.encode() in p.read_bytes()]
    assert not leaks, f"a token was written: {leaks}"


def test_tracker_tokens_are_written_nowhere(tiny_base, tiny_tokens, tmp_path):
    """`tunelab train` of a run logging to every tracker, as the train rule runs it, in a fresh process whose home
    directory is searched too (W&B's service keeps its logs and settings in ~/.cache/wandb and ~/.config/wandb)."""
    home = tmp_path / "home"
    home.mkdir()
    study = {"name": "secrets", "data": {"source": "synthetic:60", "test_size": 5},
             "models": {"tiny": {"source": "tiny"}},
             "train": {"max_steps": 2, "eval_every": 2, "micro_batch_size": 4, "profile": {"steps": 0},
                       "tracking": ["dvclive", "tensorboard", "wandb", "mlflow"]},
             "runs": [{"name": "tracked", "model": "tiny"}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "PYTHONPATH": str(REPO / "src")}
    env.pop("WANDB_SERVICE", None)  # the address of a W&B service this pytest started: the job starts its own
    assert all(env[name] == token for name, token in TOKENS.items())
    trained = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", "--config", str(tmp_path / "study.yaml"), "--run", "tracked",
         "--base", str(tiny_base), "--tokens", str(tiny_tokens / "tokens"), "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    written = {folder: [p for p in files if folder in p.parts] for folder in ("wandb", "mlruns", "dvclive")}
    assert all(written.values()), f"every tracker wrote: {written}"
    assert list(home.rglob("core-debug-*.log")), "the W&B service's own log is searched too"
    output = trained.stdout + trained.stderr
    assert "wandb" in output, "the trackers' console output is searched too"
    leaks = [f"{name} in {p.relative_to(tmp_path)}" for p in files for name, token in TOKENS.items()
             if token.encode() in p.read_bytes()] + [f"{name} in the output" for name, token in TOKENS.items()
                                                    if token in output]
    assert not leaks, f"a token was written: {leaks}"


# What tunelab reads from the environment itself: the container's name and path (provenance), torchrun's rank
# variables and the launcher's own hand-over, the Hub's offline switch, and one credential: the server's own API
# key (TUNELAB_API_KEY, which tests/test_serve.py checks never reaches a log or a response). It sets one: MLflow's
# switch that opens a file store (MLFLOW_ALLOW_FILE_STORE).
READ_NAMES = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "TUNELAB_TRAIN_ARGS", "TUNELAB_LAUNCH_ROLE", "HF_HUB_OFFLINE",
              "TUNELAB_API_KEY", "MLFLOW_ALLOW_FILE_STORE",
              # a job's GPUs (tunelab.gpus): the ids it may use and claims, where the locks live, how long it waits
              "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "TUNELAB_GPUS_CLAIMED", "TUNELAB_GPU_LOCKS", "TUNELAB_GPU_WAIT"}
ALIASES = {"ROLE": "TUNELAB_LAUNCH_ROLE", "TRAIN_ARGS": "TUNELAB_TRAIN_ARGS", "CLAIMED": "TUNELAB_GPUS_CLAIMED",
           "LOCKS": "TUNELAB_GPU_LOCKS", "WAIT": "TUNELAB_GPU_WAIT"}  # module constants naming a variable
PASSED_ON = ("distributed/launch.py",)  # hands the whole environment to the processes it starts, reads nothing else


def test_no_stage_reads_a_credential_from_the_environment():
    """tunelab reads no credential but its own server's key, so it can't pass a token on to a file; the libraries
    that need a credential read it themselves."""
    readers = [(p.relative_to(REPO / "src" / "tunelab").as_posix(), n, line.strip())
               for p in sorted((REPO / "src" / "tunelab").rglob("*.py"))
               for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"os\.environ|getenv\(", line)]
    unexpected = []
    for path, number, line in readers:
        names = set(re.findall(r"""["']([A-Z][A-Z0-9_]+)["']""", line)) | set(
            re.findall(rf"\b({'|'.join(ALIASES)})\b", line))
        names = {ALIASES.get(n, n) for n in names}
        allowed = "in CONTAINER_VARIABLES" in line or (names and names <= READ_NAMES) or (
            not names and path in PASSED_ON)
        if not allowed:
            unexpected.append(f"{path}:{number}: {line}")
    assert not unexpected, unexpected
    assert all(name.startswith(("APPTAINER_", "SINGULARITY_")) for name in CONTAINER_VARIABLES)
