"""DVC around the study, as docs/cluster.md describes it: in a git clone of this repository, `dvc repro tiny` runs
the tiny study through snakemake and `dvc push` uploads its results to the default local remote; a fresh clone
then fetches just the report and the per-run results with the laptop command (`dvc pull` of results/report and
the runs' JSON files, no weights) and `tunelab report` renders them. A second `dvc repro` with nothing changed
runs no stage. About 2 minutes on 2 CPUs (the tiny study itself). The committed dvc.lock must record each stage it
holds as dvc.yaml declares it now.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = "tiny/results"  # the tiny stage's out (dvc.yaml)
REMOTE = "tunelab-dvc-remote"  # .dvc/config's default remote: ../tunelab-dvc-remote, beside the clone


def _declared(items: list) -> list[str]:
    """The paths of a dvc.yaml deps/outs list, whose entries are a path or {path: options}."""
    return [item if isinstance(item, str) else next(iter(item)) for item in items]


def _declared_params(items: list) -> dict[str, list[str]]:
    """A dvc.yaml params list as file: keys (a bare key belongs to params.yaml)."""
    params: dict[str, list[str]] = {}
    for item in items:
        for file, keys in ({"params.yaml": [item]} if isinstance(item, str) else item).items():
            params.setdefault(file, []).extend(keys)
    return params


def lock_mismatches(pipeline: dict, lock: dict) -> list[str]:
    """Where dvc.lock does not record a stage as dvc.yaml declares it: its cmd, deps and outs paths and params keys.
    Hashes are left out: an edit of src/ changes them, and `dvc repro` refreshes them."""
    mismatches = []
    for name, locked in lock["stages"].items():
        stage = pipeline["stages"].get(name)
        if stage is None:
            mismatches.append(f"stage {name}: in dvc.lock but not in dvc.yaml")
            continue
        declared = {"cmd": stage["cmd"], "deps": sorted(_declared(stage.get("deps", []))),
                    "outs": sorted(_declared(stage.get("outs", []))),
                    "params": {file: sorted(keys) for file, keys in _declared_params(stage.get("params", [])).items()}}
        recorded = {"cmd": locked["cmd"], "deps": sorted(dep["path"] for dep in locked.get("deps", [])),
                    "outs": sorted(out["path"] for out in locked.get("outs", [])),
                    "params": {file: sorted(values) for file, values in locked.get("params", {}).items()}}
        mismatches += [f"stage {name}: {key} is {declared[key]!r} in dvc.yaml but {recorded[key]!r} in dvc.lock"
                       for key in declared if declared[key] != recorded[key]]
    return mismatches


def _environment(repo: Path) -> dict[str, str]:
    """This interpreter's bin directory first (snakemake, dvc, tunelab), the clone's own tunelab (not the
    editable install's), offline Hugging Face, a git identity for the commits."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(repo / "src"),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@localhost")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def sh(command: str, cwd: Path, timeout: int = 120) -> str:
    """Run a shell command (as a user types it) in a clone; its stdout and stderr, after asserting it succeeded."""
    result = subprocess.run(command, shell=True, cwd=cwd, env=_environment(cwd), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{output[-6000:]}"
    return output


def summary(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_committed_lock_records_the_stages_of_dvc_yaml():
    assert subprocess.run(["git", "ls-files", "--error-unmatch", "dvc.lock"], cwd=REPO, capture_output=True
                          ).returncode == 0, "dvc.lock should be committed (dvc repro tiny && git add dvc.lock)"
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    assert "tiny" in lock["stages"], "the tiny stage is reproduced wherever the repository is (dvc repro tiny)"
    assert all(out.get("md5") for stage in lock["stages"].values() for out in stage["outs"]), "outs without a hash"
    assert lock_mismatches(pipeline, lock) == []


def test_a_dvc_yaml_edit_without_a_fresh_lock_is_named():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    pipeline["stages"]["tiny"]["cmd"] += " --forceall"
    pipeline["stages"]["tiny"]["params"][0]["studies/tiny.yaml"].remove("exports")
    mismatches = lock_mismatches(pipeline, lock)
    assert [mismatch.split(" is ")[0] for mismatch in mismatches] == ["stage tiny: cmd", "stage tiny: params"]


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """A git repository holding this working tree (tracked and untracked, not ignored files) in one commit."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    origin = tmp_path_factory.mktemp("dvc") / "origin"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, origin / name)
    sh("git init -q -b main && git add -A && git commit -qm 'the working tree'", origin)
    return origin


def test_repro_push_then_pull_and_report_in_a_fresh_clone(origin):
    parent = origin.parent
    cluster = parent / "cluster"
    sh(f"git clone -q {origin} {cluster}", parent)
    first = sh("dvc repro tiny", cluster, timeout=1500)
    assert "Running stage 'tiny'" in first
    assert (cluster / RESULTS / "report/summary.csv").is_file()
    assert any((cluster / RESULTS / "runs").glob("*/model/*.safetensors")), "trained weights should be an out"

    again = sh("dvc repro tiny", cluster)
    assert "Running stage" not in again and "didn't change, skipping" in again, again
    assert "up to date" in sh("dvc status tiny", cluster)

    sh("dvc push tiny && git add dvc.lock tiny/.gitignore && git commit -qm 'tiny study results'", cluster)
    assert (parent / REMOTE / "files/md5").is_dir(), "the default remote should sit beside the clone"
    assert sh(f"git ls-files {RESULTS}", cluster) == "", "results belong to DVC, not to git"
    assert f"!! {RESULTS}/" in sh("git status --porcelain --ignored", cluster)

    laptop = parent / "laptop"
    sh(f"git clone -q {cluster} {laptop}", parent)
    # The laptop command of docs/cluster.md: the report, each run's JSON files and per-record scores, not the weights.
    sh(f"dvc pull {RESULTS}/report $(dvc ls --dvc-only -R . {RESULTS}/runs "
       f"| grep -Ex '[^/]+/([^/]+\\.json|sample_scores\\.jsonl)' | sed 's|^|{RESULTS}/runs/|')", laptop)
    runs = laptop / RESULTS / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(p.name for p in (cluster / RESULTS / "runs").iterdir())
    for run in runs.iterdir():
        assert (run / "scores.json").read_bytes() == (cluster / RESULTS / "runs" / run.name / "scores.json").read_bytes()
    assert not any(runs.glob("*/model")), "the laptop pull should not fetch weights"

    sh(f"tunelab report --config studies/tiny.yaml --runs {RESULTS}/runs --out rendered", laptop)
    pulled_columns, pulled_rows = summary(laptop / RESULTS / "report/summary.csv")
    rendered_columns, rendered_rows = summary(laptop / "rendered/summary.csv")
    assert rendered_columns == pulled_columns
    assert rendered_rows == pulled_rows, "the laptop's report should equal the one computed where the study ran"
    assert (laptop / "rendered/report.html").stat().st_size > 0
