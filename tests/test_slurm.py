"""The tiny study through a real SLURM: scripts/slurm-up.sh brings up a single-node cluster (munge, MariaDB,
slurmdbd, slurmctld, slurmd; two stand-in GPUs), then `snakemake --profile profiles/slurm` runs studies/tiny.yaml
in a copy of the repository. Each job or job group that snakemake's dry run plans must have run as one sbatch job
(its SLURM log lists exactly the planned jobs), completed according to sacct, and got the summed time limit and
the largest memory and GPU count of its jobs; and the report must have the rows and columns of the suite's local
run of the same study (conftest.py's tiny_study). Needs root (it installs Debian packages and starts daemons);
skipped only without root or when apt cannot reach its mirror. About 4 minutes on a quiet 2-CPU machine besides
the shared local run (apt adds about 20 s the first time).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDY = "studies/tiny.yaml"
QUALITY = ("exact_match", "rouge_l", "bertscore_f1")  # the tiny study turns BLEU off
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


# snakemake's listing of a job (dry run, SLURM job log): a group job's header, then each job's rule and fields.
GROUP_HEADER = re.compile(r"^\[[^]]+\] Group job (\S+) ")
RULE_HEADER = re.compile(r"^( *)(?:local)?rule (\S+):$")
JOB_FIELD = re.compile(r"^ +(wildcards|resources): (.*)$")


def listed_jobs(listing: str) -> list[tuple[str | None, list[dict]]]:
    """The submissions in a snakemake listing, in order: (group name, its jobs), or (None, [the job]) for a job on
    its own. Each job is {"rule", "wildcards", "resources"}."""
    submissions: list[tuple[str | None, list[dict]]] = []
    for line in listing.splitlines():
        if group := GROUP_HEADER.match(line):
            submissions.append((group.group(1), []))
        elif rule := RULE_HEADER.match(line):
            if not rule.group(1):  # a rule at the margin is a job of its own
                submissions.append((None, []))
            submissions[-1][1].append({"rule": rule.group(2), "wildcards": "", "resources": {}})
        elif (field := JOB_FIELD.match(line)) and submissions and submissions[-1][1]:
            name, value = field.groups()
            job = submissions[-1][1][-1]
            job[name] = value if name == "wildcards" else dict(item.split("=", 1) for item in value.split(", "))
    return submissions


def planned_submissions(repo: Path, *arguments: str) -> list[tuple[str | None, list[dict]]]:
    """What `snakemake *arguments` submits with sbatch, from its dry run (`rule all` runs nothing)."""
    plan = run(["snakemake", *arguments, "--dry-run"], repo, timeout=120).stdout
    return [(group, jobs) for group, jobs in listed_jobs(plan) if jobs[0]["rule"] != "all"]


def job_keys(jobs: Iterable[dict]) -> frozenset[tuple[str, str]]:
    return frozenset((job["rule"], job["wildcards"]) for job in jobs)


def minutes(time_limit: str) -> int:
    """sacct's Timelimit, [days-]hours:minutes:seconds, in minutes."""
    days, _, clock = time_limit.rpartition("-")
    hours, mins, _ = clock.split(":")
    return int(days or 0) * 1440 + int(hours) * 60 + int(mins)


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


def test_tiny_study_runs_through_slurm_in_groups(cluster, tiny_study, tmp_path):
    on_slurm = copy_repo(tmp_path / "slurm")
    # This machine has no Apptainer (neither Debian 12 nor PyPI has one): env-modules replaces the profile's
    # deployment method with one no rule uses, so each command runs in this environment. generate asks for a GPU,
    # as it does for a real model, so that its groups must get one of the cluster's two stand-in GPUs.
    snakemake = ["snakemake", "--profile", "profiles/slurm", "--software-deployment-method", "env-modules",
                 "--set-resources", "generate:gpu=1", "--config", f"study={STUDY}"]
    plan = planned_submissions(on_slurm, *snakemake[1:])
    groups = [jobs for group, jobs in plan if group]
    assert sorted({frozenset(job["rule"] for job in jobs) for jobs in groups}, key=sorted) == [
        {"base", "data", "tokenize"}, {"export", "generate", "score"}, {"generate", "score"}]
    assert all(len({job["wildcards"] for job in jobs}) == 1 for group, jobs in plan if group == "evaluate")

    # SIGINT, not SIGTERM: snakemake ignores SIGTERM while it waits for SLURM jobs (slurm-snakemake-dvc.md).
    run(["timeout", "-s", "INT", "-k", "30", "900", *snakemake], on_slurm, timeout=960)

    # .snakemake/slurm_logs/<rule_X or group_Y>/<wildcards>/<SLURM job id>.log: what snakemake ran in that job
    ran = {log.stem: job_keys(job for _, jobs in listed_jobs(log.read_text()) for job in jobs)
           for log in (on_slurm / ".snakemake/slurm_logs").rglob("*.log")}
    assert all(job_id.isdigit() for job_id in ran), sorted(ran)
    assert len(ran) == len(plan) < sum(len(jobs) for _, jobs in plan), "groups should need fewer sbatch jobs"
    assert sorted(ran.values(), key=sorted) == sorted((job_keys(jobs) for _, jobs in plan), key=sorted), \
        "each planned job or group should have run as one SLURM job"

    accounting = subprocess.run(["sacct", "-X", "--noheader", "--parsable2", "--jobs", ",".join(ran),
                                 "--format=JobIDRaw,State,JobName,Timelimit,ReqMem,AllocTRES"],
                                capture_output=True, text=True, check=True).stdout
    jobs = {fields[0]: fields[1:] for fields in (line.split("|") for line in accounting.split("\n") if line)}
    assert jobs.keys() == ran.keys(), f"sacct knows {sorted(jobs)}, the logs name {sorted(ran)}"
    assert {state for state, *_ in jobs.values()} == {"COMPLETED"}, jobs
    assert len({name for _, name, *_ in jobs.values()}) == 1, "all jobs should carry the one run's job name"
    planned = {job_keys(jobs): jobs for _, jobs in plan}
    for job_id, (_, _, time_limit, memory, resources) in jobs.items():
        members = [job["resources"] for job in planned[ran[job_id]]]  # each group here is a chain: times add up
        assert minutes(time_limit) == sum(int(job["runtime"]) for job in members), (job_id, time_limit)
        assert memory == f"{max(int(job['mem_mb']) for job in members)}M", (job_id, memory)
        gpus = re.search(r"gres/gpu=(\d+)", resources)
        assert int(gpus.group(1) if gpus else 0) == max(int(job.get("gpu", 0)) for job in members), (job_id, resources)

    local_columns, local_rows = read_summary(tiny_study)  # the suite's local run of the tiny study (conftest)
    slurm_columns, slurm_rows = read_summary(on_slurm)
    assert slurm_columns == local_columns
    assert [row["run"] for row in slurm_rows] == [row["run"] for row in local_rows]
    for local_row, slurm_row in zip(local_rows, slurm_rows):
        assert all(slurm_row[column] for column in QUALITY), slurm_row
        filled = {column for column, value in local_row.items() if value}
        assert {column for column, value in slurm_row.items() if value} == filled, slurm_row["run"]
