"""The tiny study through a real SLURM: scripts/slurm-up.sh brings up a single-node cluster (munge, MariaDB,
slurmdbd, slurmctld, slurmd), then `snakemake --profile profiles/slurm` runs studies/tiny.yaml in a copy of the
repository. Every job must have gone through sbatch and completed according to sacct, and the report must have
the rows and columns of the suite's local run of the same study (conftest.py's tiny_study). Needs root (it
installs Debian packages and starts daemons); skipped only without root or when apt cannot reach its mirror.
About 5 minutes on a quiet 2-CPU machine besides the shared local run (apt adds about 20 s the first time).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDY = "studies/tiny.yaml"
QUALITY = ("bleu", "rouge_l", "bertscore_f1")
APT_UNREACHABLE = 75  # scripts/slurm-up.sh: packages missing and apt could not install them


def _environment(repo: Path) -> dict[str, str]:
    """This interpreter's bin directory first (snakemake, tunelab), the copy's own tunelab (not the editable
    install's), offline Hugging Face."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(repo / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def copy_repo(dest: Path) -> Path:
    """The repository's working tree (tracked and untracked, not ignored files) at `dest`, without results."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run(command: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_environment(cwd), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-6000:]}"
    return result


def planned_jobs(repo: Path) -> Counter:
    """Jobs per rule of the tiny study, from snakemake's dry run (`rule all` runs nothing)."""
    plan = run(["snakemake", "--dry-run", "--config", f"study={STUDY}"], repo, timeout=120).stdout
    table = plan[plan.index("Job stats:"):].split("\n")[3:]
    jobs = Counter()
    for line in table:
        rule, count = line.split()
        if rule == "total":
            return jobs
        if rule != "all":
            jobs[rule] = int(count)
    raise AssertionError(f"no job stats in the dry run:\n{plan}")


def read_summary(repo: Path) -> tuple[list[str], list[dict]]:
    with open(repo / "results/report/summary.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def cluster():
    """The single-node cluster of scripts/slurm-up.sh; stopped afterwards unless it was already running."""
    if os.geteuid() != 0:
        pytest.skip("SLURM bring-up needs root (apt-get install, daemons)")
    was_running = shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", "scripts/slurm-up.sh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    if up.returncode == APT_UNREACHABLE:
        pytest.skip(f"apt unreachable: {up.stderr.strip().splitlines()[-1]}")
    assert up.returncode == 0, f"scripts/slurm-up.sh exited {up.returncode}:\n{up.stderr[-4000:]}"
    yield
    if not was_running:
        subprocess.run(["bash", "scripts/slurm-down.sh"], cwd=REPO, check=True, timeout=120)


def test_tiny_study_runs_through_slurm(cluster, tiny_study, tmp_path):
    on_slurm = copy_repo(tmp_path / "slurm")
    expected_jobs = planned_jobs(on_slurm)
    # SIGINT, not SIGTERM: snakemake ignores SIGTERM while it waits for SLURM jobs (slurm-snakemake-dvc.md).
    # This machine has no Apptainer (neither Debian 12 nor PyPI has one): env-modules replaces the profile's
    # deployment method with one no rule uses, so each command runs in this environment.
    run(["timeout", "-s", "INT", "-k", "30", "900", "snakemake", "--profile", "profiles/slurm",
         "--software-deployment-method", "env-modules", "--config", f"study={STUDY}"], on_slurm, timeout=960)

    logs = sorted((on_slurm / ".snakemake/slurm_logs").rglob("*.log"))
    jobs = {log.stem: log.relative_to(on_slurm / ".snakemake/slurm_logs").parts[0].removeprefix("rule_")
            for log in logs}
    assert Counter(jobs.values()) == expected_jobs, f"SLURM logs per rule: {Counter(jobs.values())}"
    assert all(job_id.isdigit() for job_id in jobs), sorted(jobs)

    accounting = subprocess.run(["sacct", "-X", "--noheader", "--parsable2", "--format=JobIDRaw,State,JobName",
                                 "--jobs", ",".join(jobs)], capture_output=True, text=True, check=True).stdout
    states = {job_id: (state, name) for job_id, state, name in (line.split("|") for line in accounting.split())}
    assert states.keys() == jobs.keys(), f"sacct knows {sorted(states)}, the logs name {sorted(jobs)}"
    assert {state for state, _ in states.values()} == {"COMPLETED"}, states
    assert len({name for _, name in states.values()}) == 1, "all jobs should carry the one run's job name"

    local_columns, local_rows = read_summary(tiny_study)  # the suite's local run of the tiny study (conftest)
    slurm_columns, slurm_rows = read_summary(on_slurm)
    assert slurm_columns == local_columns
    assert [row["run"] for row in slurm_rows] == [row["run"] for row in local_rows]
    for local_row, slurm_row in zip(local_rows, slurm_rows):
        assert all(slurm_row[column] for column in QUALITY), slurm_row
        filled = {column for column, value in local_row.items() if value}
        assert {column for column, value in slurm_row.items() if value} == filled, slurm_row["run"]
