"""`tunelab status`: a study's runs read from the results folder alone, as the jobs leave it.

The results are written here the way the stages and the tracker write them (train_metrics/eval/scores files,
DVCLive's summary and step files, Snakemake's incomplete markers, a log ending in a traceback)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from tunelab.config import load_study
from tunelab.status import render, study_status

STUDY = REPO / "studies" / "tiny.yaml"


def _write(path: Path, text: str, age: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def _progress(run_dir: Path, steps: int, seconds_per_step: float, age: float) -> None:
    """What the tracker leaves after `steps` logged steps, the newest `age` seconds ago."""
    now = time.time() - age
    rows = [(s, now - (steps - s) * seconds_per_step) for s in range(1, steps + 1)]
    tsv = "timestamp\tstep\tloss\n" + "".join(f"{int(t * 1000)}\t{s}\t{3 - s / 100}\n" for s, t in rows)
    _write(run_dir / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv", tsv, age)
    summary = {"step": steps, "train": {"loss": 3 - steps / 100, "tokens_per_second": 1234.0}}
    _write(run_dir / "dvclive" / "metrics.json", json.dumps(summary), age)


def _mark_incomplete(workdir: Path, output: str) -> None:
    _write(workdir / ".snakemake" / "incomplete" / base64.urlsafe_b64encode(output.encode()).decode(), "{}")


@pytest.fixture()
def results(tmp_path) -> Path:
    runs = tmp_path / "results" / "runs"
    for name in ("base-tiny", "tiny-full"):  # finished
        for output in ("eval.json", "scores.json"):
            _write(runs / name / output, "{}")
    _write(runs / "tiny-full" / "train_metrics.json",
           json.dumps({"steps": 150, "final_loss": 0.5, "tokens_per_second": 900.0}))
    _progress(runs / "tiny-lora", steps=40, seconds_per_step=0.5, age=1)  # running, at 0.5 s a step
    _mark_incomplete(tmp_path, "results/runs/tiny-lora/train_metrics.json")
    _progress(runs / "tiny-adalora", steps=20, seconds_per_step=0.5, age=3600)  # killed an hour ago
    _mark_incomplete(tmp_path, "results/runs/tiny-adalora/train_metrics.json")
    _write(runs / "tiny-lora.nf4" / "logs" / "export.log", "loading\nTraceback (most recent call last):\n"
           '  File "x.py", line 1\nRuntimeError: bitsandbytes could not quantize\n')
    return tmp_path / "results"


def test_each_state_is_read_from_the_results(results):
    study = load_study(STUDY)
    steps = study.run("tiny-lora").train.max_steps
    rows = {r.name: r for r in study_status(study, results)}
    assert {n: (r.stage, r.state) for n, r in rows.items()} == {
        "base-tiny": ("score", "finished"), "base-tiny.nf4": ("generate", "queued"), "tiny-full": ("score", "finished"),
        "tiny-lora": ("train", "running"), "tiny-qlora": ("train", "queued"), "tiny-adalora": ("train", "failed"),
        **{f"{run}.merged": ("generate", "queued") for run in ("tiny-lora", "tiny-qlora", "tiny-adalora", "tiny-full")},
        "tiny-lora.nf4": ("export", "failed"), "tiny-lora.int8": ("export", "queued"),
        "tiny-lora.pruned_int8": ("export", "queued")}
    running = rows["tiny-lora"]
    assert (running.step, running.max_steps, running.loss, running.tokens_per_second) == (40, steps, 2.6, 1234.0)
    assert running.eta_seconds == pytest.approx((steps - 40) * 0.5, rel=0.01)
    assert rows["tiny-lora.nf4"].note == "RuntimeError: bitsandbytes could not quantize"
    assert "interrupted" in rows["tiny-adalora"].note
    assert rows["tiny-full"].loss == 0.5
    table = render(list(rows.values()))
    eta = int((steps - 40) * 0.5)
    assert f"40/{steps}" in table and f"{eta // 60}m{eta % 60:02d}s" in table and "RuntimeError: bitsandbytes" in table


def test_progress_older_than_three_log_intervals_is_not_running(results):
    study = load_study(STUDY)
    interval = study.run("tiny-lora").train.log_every * 0.5
    _progress(results / "runs" / "tiny-lora", steps=40, seconds_per_step=0.5, age=3 * interval + 5)
    assert {r.name: r.state for r in study_status(study, results)}["tiny-lora"] == "failed"
    _progress(results / "runs" / "tiny-lora", steps=40, seconds_per_step=0.5, age=3 * interval - 5)
    assert {r.name: r.state for r in study_status(study, results)}["tiny-lora"] == "running"


def test_status_runs_with_the_core_install_only(results):
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'transformers', 'peft', 'bitsandbytes')]"
    command = [sys.executable, "-c", f"{blocked}; from tunelab.cli import main; sys.exit(main(sys.argv[1:]))",
               "status", "--config", str(STUDY), "--results", str(results)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny: 1 running, 8 queued, 2 finished, 2 failed")
    steps = load_study(STUDY).run("tiny-lora").train.max_steps
    assert "tiny-lora " in result.stdout and f"40/{steps}" in result.stdout
