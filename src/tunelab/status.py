"""`tunelab status`: where every run of a study stands, read from its results folder alone.

Needs only the core install (no torch), so it runs on a login node while SLURM runs the jobs. Per run: the stage
it is in (train, export, generate, score), step / max steps, current loss, tokens/s and an ETA from the progress
the tracker writes (`results/runs/<run>/dvclive/`), and its state:
- running: progress written within 3x the log interval (or, outside training, a job marked incomplete by
  Snakemake whose log is being written);
- finished: scores written;
- failed: the stage's log ends in a traceback or a `tunelab` error (its last line shown), or Snakemake's
  incomplete marker stays with nothing being written (a killed job);
- queued: nothing written yet.
Run: `tunelab status --config config.yaml [--results results] [--watch [SECONDS]]`.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import Study

STALE_FACTOR = 3  # progress older than this many log intervals is not running any more
LOG_ACTIVE_SECONDS = 120  # a non-training job whose log changed this recently is taken as running


@dataclass
class RunStatus:
    name: str
    stage: str
    state: str
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    note: str = ""


def study_status(study: Study, results: Path, now: float | None = None) -> list[RunStatus]:
    """The status of every run, reference row and export of `study` under `results`."""
    now = time.time() if now is None else now
    incomplete = _incomplete_runs(results.parent / ".snakemake" / "incomplete")
    rows = []
    for name, stages in _pipelines(study).items():
        rows.append(_run_status(study, name, stages, results / "runs" / name, incomplete.get(name, set()), now))
    return rows


def _pipelines(study: Study) -> dict[str, list[str]]:
    """Each row of the report and the stages that produce it, in order."""
    pipelines = {name: ["generate", "score"] for name in study.reference_runs}
    pipelines.update({run.name: ["train", "generate", "score"] for run in study.runs})
    pipelines.update({name: ["generate", "score"] for name in study.merged_runs})  # merged by its run's merge job
    pipelines.update({name: ["export", "generate", "score"] for name in study.export_runs})
    return pipelines


STAGE_OUTPUT = {"train": "train_metrics.json", "export": "export.json", "generate": "eval.json",
                "score": "scores.json"}


def _run_status(study: Study, name: str, stages: list[str], run_dir: Path, incomplete: set[str],
                now: float) -> RunStatus:
    done = [stage for stage in stages if (run_dir / STAGE_OUTPUT[stage]).is_file()]
    if "score" in done:
        return RunStatus(name, "score", "finished", **_final_training(run_dir))
    stage = next(stage for stage in stages if stage not in done)
    status = RunStatus(name, stage, "queued")
    progress = _training_progress(run_dir / "dvclive") if stage == "train" else None
    if progress:
        status.step, status.loss, status.tokens_per_second = progress["step"], progress["loss"], progress["tok_s"]
        status.max_steps = study.run(name).train.max_steps
        interval = study.run(name).train.log_every * progress["seconds_per_step"]
        if now - progress["written"] <= max(STALE_FACTOR * interval, 1.0):
            status.state = "running"
            status.eta_seconds = (status.max_steps - status.step) * progress["seconds_per_step"]
            return status
    log = run_dir / "logs" / f"{stage}.log"
    failure = _failure(log)
    if failure:
        status.state, status.note = "failed", failure
    elif stage != "train" and log.is_file() and now - log.stat().st_mtime <= LOG_ACTIVE_SECONDS and (
            incomplete or not done):
        status.state = "running"
    elif incomplete or progress:
        status.state, status.note = "failed", "interrupted: Snakemake marked its output incomplete and nothing " \
                                              "is being written (killed or preempted; a rerun resumes)"
    return status


def _final_training(run_dir: Path) -> dict:
    metrics_file = run_dir / "train_metrics.json"
    if not metrics_file.is_file():
        return {}
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    return {"step": metrics.get("steps"), "max_steps": metrics.get("steps"), "loss": metrics.get("final_loss"),
            "tokens_per_second": metrics.get("tokens_per_second")}


def _training_progress(dvclive: Path) -> dict | None:
    """The newest step the tracker logged: step, loss, tokens/s, when, and seconds per step so far."""
    summary_file = dvclive / "metrics.json"
    if not summary_file.is_file():
        return None
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except ValueError:  # being rewritten this instant
        return None
    train = summary.get("train", summary)
    times = _step_times(dvclive / "plots" / "metrics" / "train" / "loss.tsv")
    seconds_per_step = (times[-1][1] - times[0][1]) / max(times[-1][0] - times[0][0], 1) if len(times) > 1 else 0.0
    return {"step": summary.get("step", times[-1][0] if times else 0), "loss": train.get("loss"),
            "tok_s": train.get("tokens_per_second"), "written": summary_file.stat().st_mtime,
            "seconds_per_step": seconds_per_step}


def _step_times(tsv: Path) -> list[tuple[int, float]]:
    """(step, seconds since the epoch) of each logged step in a DVCLive metric file."""
    if not tsv.is_file():
        return []
    with tsv.open(encoding="utf-8", newline="") as handle:
        return [(int(row["step"]), int(row["timestamp"]) / 1000) for row in csv.DictReader(handle, delimiter="\t")]


def _failure(log: Path) -> str:
    """The last line of a log that ends in a traceback or a tunelab error; '' otherwise."""
    if not log.is_file():
        return ""
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:] if line.strip()]
    if not lines:
        return ""
    last = lines[-1].strip()
    traceback = any(line.startswith("Traceback (most recent call last)") for line in lines)
    if re.match(r"tunelab \w+: error: ", last) or (traceback and re.match(r"[\w.]+(Error|Exception|Interrupt)\b", last)):
        return last
    return ""


def _incomplete_runs(markers: Path) -> dict[str, set[str]]:
    """Run name -> outputs Snakemake marked incomplete (a job started and not finished), from its markers."""
    found: dict[str, set[str]] = {}
    if not markers.is_dir():
        return found
    for marker in markers.rglob("*"):
        if marker.is_dir() or marker.name.startswith("@"):
            continue
        parts = [p.name.removeprefix("@") for p in reversed(marker.relative_to(markers).parents) if p.name]
        try:
            path = base64.urlsafe_b64decode("".join(parts + [marker.name])).decode()
        except ValueError:
            continue
        match = re.search(r"results/runs/([^/]+)/", path)
        if match:
            found.setdefault(match.group(1), set()).add(path)
    return found


def render(rows: list[RunStatus]) -> str:
    """A fixed-width table of `rows`."""
    header = ["run", "stage", "state", "step", "loss", "tok/s", "ETA", "note"]
    table = [header] + [[r.name, r.stage, r.state,
                         f"{r.step}/{r.max_steps}" if r.step is not None and r.max_steps else "-",
                         f"{r.loss:.4f}" if r.loss is not None else "-",
                         f"{r.tokens_per_second:,.0f}" if r.tokens_per_second is not None else "-",
                         _duration(r.eta_seconds), r.note] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in table).rstrip() + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_status(study: Study, results: Path, watch: float | None = None) -> list[RunStatus]:
    """Print the study's status table (every `watch` seconds until every row is finished or failed)."""
    while True:
        rows = study_status(study, results)
        counts = {state: sum(r.state == state for r in rows) for state in ("running", "queued", "finished", "failed")}
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        text = f"{study.name}: {summary} ({time.strftime('%H:%M:%S')})\n" + render(rows)
        if watch is None:
            print(text, end="")
            return rows
        print("\033[2J\033[H" + text, end="", flush=True)
        if not counts["running"] and not counts["queued"]:
            return rows
        time.sleep(watch)
