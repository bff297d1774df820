"""Experiment tracking (DVCLive, TensorBoard, W&B offline, an MLflow store) and provenance of a training run, read
back from the files written."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys

import pytest
import yaml

from tunelab import modeling
from tunelab.artifacts import read_json, read_jsonl
from tunelab.checkpoint import Checkpoints, fingerprint
from tunelab.config import BOOKKEEPING, Run, TrainConfig, load_study
from tunelab.errors import TunelabError
from tunelab.train import attach_method, fit, run_train
from conftest import REPO

TRACKED = dict(max_steps=6, eval_every=3, micro_batch_size=4, learning_rate=3e-3, warmup_steps=0,
               profile={"steps": 0}, tracking=["dvclive", "tensorboard", "wandb", "mlflow"])


def dvclive_table(out, name: str) -> list[tuple[int, float]]:
    with open(out / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv", newline="") as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]


def tensorboard_scalars(out, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def wandb_records(path):
    """The records of one offline W&B run file (`run-<id>.wandb`): a header, then protobuf `Record`s in blocks of
    32 KiB, each chunk with a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_run(out) -> dict:
    """The W&B run as `wandb sync` makes it of the run's offline attempts: its id, config, summary and per-step
    history, each resumed attempt rewinding the history to its `resume_from` step first."""
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, "an offline W&B run was written"
    run = {"ids": set(), "config": {}, "summary": {}, "history": {}, "attempts": []}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["ids"].add(record.run.run_id)
                rewind = record.run.branch_point.value if record.run.HasField("branch_point") else None
                if rewind is not None:
                    assert record.run.branch_point.metric == "_step"
                    run["history"] = {s: row for s, row in run["history"].items() if s <= rewind}
                run["attempts"].append({"rewind_to": rewind, "steps": []})
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                run["attempts"][-1]["steps"].append(record.history.step.num)
                if record.history.step.num > max(run["history"], default=0):  # W&B drops a step not after the last
                    run["history"][record.history.step.num] = {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
    return run


def wandb_series(out, name: str) -> list[tuple[int, float]]:
    return [(step, row[name]) for step, row in sorted(wandb_run(out)["history"].items()) if name in row]


def mlflow_run(uri: str, out):
    """The MLflow run the tracker recorded, read through MLflow's client from the store at `uri`."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(read_json(out / "mlflow.json")["run_id"])


def mlflow_series(uri: str, out, name: str) -> list[tuple[int, float]]:
    client, run = mlflow_run(uri, out)
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]


def test_a_run_logs_params_steps_and_final_figures_to_each_tracker(tiny_base, tiny_tokens, tmp_path):
    run = Run(name="tracked", model="tiny", train=TrainConfig(**TRACKED))
    metrics = run_train(run, tiny_base, tiny_tokens / "tokens", tmp_path)
    losses = [(step, pytest.approx(loss, rel=1e-6)) for step, loss in metrics["loss_curve"]]

    params = yaml.safe_load((tmp_path / "dvclive" / "params.yaml").read_text())
    assert params["run"] == "tracked" and params["learning_rate"] == 3e-3 and params["lora"]["r"] == 16
    assert dvclive_table(tmp_path, "loss") == losses
    assert [step for step, _ in dvclive_table(tmp_path, "validation_loss")] == [3, 6]
    assert [step for step, _ in dvclive_table(tmp_path, "tokens_per_second")] == [2, 3, 4, 5, 6]  # step 1 is warm-up
    assert all(memory > 0 for _, memory in dvclive_table(tmp_path, "peak_memory_gib"))
    final = read_json(tmp_path / "dvclive" / "metrics.json")
    assert final["final_loss"] == pytest.approx(metrics["final_loss"], rel=1e-6)
    assert final["final_validation_loss"] == pytest.approx(metrics["final_validation_loss"], rel=1e-6)
    assert not (tmp_path / "dvclive" / "dvc.yaml").exists() and not (tmp_path / "dvc.yaml").exists()

    assert tensorboard_scalars(tmp_path, "train/loss") == losses
    assert tensorboard_scalars(tmp_path, "final/final_loss")[0][1] == pytest.approx(metrics["final_loss"], rel=1e-6)

    wandb = wandb_run(tmp_path)
    assert len(wandb["ids"]) == 1 and wandb["config"]["run"] == "tracked"
    assert wandb["config"]["learning_rate"] == 3e-3 and wandb["config"]["lora"]["r"] == 16
    assert wandb_series(tmp_path, "train/loss") == losses
    assert [step for step, _ in wandb_series(tmp_path, "train/validation_loss")] == [3, 6]
    assert [step for step, _ in wandb_series(tmp_path, "train/tokens_per_second")] == [2, 3, 4, 5, 6]
    assert wandb["summary"]["final_loss"] == pytest.approx(metrics["final_loss"], rel=1e-6)

    store = (tmp_path / "mlruns").as_uri()  # the default store: a file store in the run's folder
    client, mlflow = mlflow_run(store, tmp_path)
    assert mlflow.info.run_name == "tracked" and mlflow.info.status == "FINISHED"
    assert client.get_experiment(mlflow.info.experiment_id).name == "tunelab"
    assert mlflow.data.params["learning_rate"] == "0.003" and mlflow.data.params["lora.r"] == "16"
    assert mlflow_series(store, tmp_path, "train/loss") == losses
    assert [step for step, _ in mlflow_series(store, tmp_path, "train/validation_loss")] == [3, 6]
    assert [step for step, _ in mlflow_series(store, tmp_path, "train/learning_rate")] == [1, 2, 3, 4, 5, 6]
    assert mlflow.data.metrics["final_loss"] == pytest.approx(metrics["final_loss"], rel=1e-6)


def test_a_resumed_run_continues_the_same_step_axis(tiny_base, tiny_tokens, tmp_path):
    """Killed hard at step 5 after a checkpoint at step 3: steps 4 and 5 were logged twice, once by each attempt;
    the tables keep each step once, with the values of the run that finished."""
    store = (tmp_path / "store").as_uri()  # a configured MLflow store (here a shared file store outside the run)
    train = TrainConfig(**{**TRACKED, "checkpoint_every": 3, "mlflow": {"tracking_uri": store, "experiment": "s"}})
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    pad = modeling.load_tokenizer(tiny_base).pad_token_id

    def attempt(checkpoints):
        model = attach_method(modeling.load_model(tiny_base, train, for_training=True), train)
        return fit(model, examples, examples[:8], train, pad, checkpoints=checkpoints, tracking_dir=tmp_path,
                   label="tracked")

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        killed = Checkpoints(tmp_path / "checkpoints", train, "test")
        after_step = killed.after_step

        def die_at_step_5(step):
            after_step(step)
            if step == 5:
                raise KeyboardInterrupt("killed")

        killed.after_step = die_at_step_5
        with pytest.raises(KeyboardInterrupt):
            attempt(killed)
        assert [step for step, _ in dvclive_table(tmp_path, "loss")] == [1, 2, 3, 4, 5]
        assert [step for step, _ in mlflow_series(store, tmp_path, "train/loss")] == [1, 2, 3, 4, 5]
        resumed = Checkpoints(tmp_path / "checkpoints", train, "test")
        metrics = attempt(resumed)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert resumed.resumed_step == 3
    expected = [(step, pytest.approx(loss, rel=1e-6)) for step, loss in metrics["loss_curve"]]
    assert dvclive_table(tmp_path, "loss") == expected
    assert tensorboard_scalars(tmp_path, "train/loss") == expected
    wandb = wandb_run(tmp_path)  # one W&B run; the resumed attempt rewinds it to the checkpoint's step
    assert len(wandb["ids"]) == 1
    assert wandb["attempts"] == [{"rewind_to": None, "steps": [1, 2, 3, 4, 5]}, {"rewind_to": 3, "steps": [4, 5, 6]}]
    assert wandb_series(tmp_path, "train/loss") == expected
    assert mlflow_series(store, tmp_path, "train/loss") == expected
    assert not (tmp_path / "mlruns").exists(), "the configured store, not the run's folder"


def test_tracking_is_bookkeeping_and_each_tracker_is_imported_only_when_chosen(tiny_base, tiny_tokens):
    assert "tracking" in BOOKKEEPING, "changing trackers reruns no training (workflow/rules/common.smk)"
    tokens = tiny_tokens / "tokens" / "train.jsonl"
    assert {"wandb", "mlflow"} <= BOOKKEEPING
    assert fingerprint(TrainConfig(tracking=[]), str(tiny_base), tokens) == fingerprint(
        TrainConfig(tracking=["dvclive", "tensorboard", "wandb", "mlflow"], wandb={"project": "p"},
                    mlflow={"tracking_uri": "http://127.0.0.1:5000", "experiment": "e"}), str(tiny_base), tokens)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, tunelab.train; print(sorted(m for m in sys.modules if m in "
                               "('dvclive', 'torch.utils.tensorboard', 'tensorboard', 'wandb', 'mlflow')))"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert imported == "[]"


def test_train_metrics_record_provenance(tiny_base, tiny_tokens, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("APPTAINER_NAME", "train.sif")
    run = Run(name="p", model="tiny", train=TrainConfig(**{**TRACKED, "max_steps": 2, "eval_every": 2,
                                                           "tracking": []}))
    run_train(run, tiny_base, tiny_tokens / "tokens", tmp_path)
    provenance = read_json(tmp_path / "train_metrics.json")["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert provenance["git_commit"] == head and isinstance(provenance["git_dirty"], bool)
    assert provenance["versions"]["torch"] == torch.__version__
    assert provenance["versions"]["peft"] and "bitsandbytes" in provenance["versions"]
    assert provenance["container"] == {"APPTAINER_NAME": "train.sif"}
    assert not (tmp_path / "dvclive").exists() and not (tmp_path / "tensorboard").exists(), "tracking: [] logs nothing"
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlruns").exists()


def test_an_mlflow_uri_holding_a_password_is_refused(tmp_path):
    study = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    study["train"]["mlflow"] = {"tracking_uri": "https://me:s3cret@mlflow.example.org"}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    refusal = r"mlflow\.tracking_uri: .*MLFLOW_TRACKING_TOKEN.*https://me:\*\*\*@"  # the error hides the password
    with pytest.raises(TunelabError, match=refusal) as refused:
        load_study(tmp_path / "study.yaml")
    assert "s3cret" not in str(refused.value)


def _declared_metrics() -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["metrics"]


def test_dvc_yaml_declares_the_tracker_files_of_every_run_once():
    from tunelab.config import load_study

    expected = [f"{root}/{run.name}/dvclive/metrics.json" for root, study in (
        ("tiny/results/runs", "studies/tiny.yaml"), ("results/runs", "config.yaml"))
        for run in load_study(REPO / study).runs]
    assert _declared_metrics() == expected
    plots = {name: spec for plot in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
             for name, spec in plot.items()}
    declared_series = [path for spec in plots.values() for path in spec["y"]]
    assert declared_series == [path.replace("metrics.json", "plots/metrics/train/loss.tsv") for path in expected]


def test_dvc_shows_each_runs_final_loss_and_loss_series(tiny_study, tmp_path):
    """The tiny study's tracker files where `dvc repro tiny` puts them, in a repository with this dvc.yaml."""
    import json
    import shutil

    from tunelab.config import load_study

    from test_dvc import sh

    runs = [run.name for run in load_study(REPO / "studies" / "tiny.yaml").runs]
    for run in runs:
        shutil.copytree(tiny_study / "results" / "runs" / run / "dvclive", tmp_path / "tiny/results/runs" / run / "dvclive")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    sh("git init -q && dvc init -q && git add -A && git commit -qm 'tracker files'", tmp_path)

    shown = json.loads(sh("dvc metrics show --json 2>/dev/null", tmp_path))[""]["data"]
    for run in runs:
        final_loss = read_json(tiny_study / "results" / "runs" / run / "train_metrics.json")["final_loss"]
        assert shown[f"tiny/results/runs/{run}/dvclive/metrics.json"]["data"]["final_loss"] == pytest.approx(final_loss)

    plots = json.loads(sh("dvc plots show --json 2>/dev/null", tmp_path))["data"]["tiny_training_loss"][0]
    series = {}
    for point in plots["content"]["data"]["values"]:
        series.setdefault(point["filename"].split("/")[0], []).append(int(point["step"]))
    steps = {run: read_json(tiny_study / "results" / "runs" / run / "train_metrics.json")["steps"] for run in runs}
    assert series == {run: list(range(1, steps[run] + 1)) for run in runs}, "one loss series per run, every step once"

    diff = json.loads(sh("dvc plots diff HEAD --json 2>/dev/null", tmp_path))["data"]["tiny_training_loss"][0]
    assert set(diff["revisions"]) == {"HEAD", "workspace"}


def test_a_tracker_that_is_not_installed_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from tunelab.config import check_runtime

    study = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    study["runs"][1]["tracking"] = ["dvclive", "mlflow"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    check_runtime(load_study(tmp_path / "study.yaml"))  # installed here (the mlflow extra)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TunelabError, match=r"runs tiny-qlora need tracking mlflow, but mlflow is not installed "
                                           r"\(pip install -e \.\[mlflow\]\)"):
        check_runtime(load_study(tmp_path / "study.yaml"))
