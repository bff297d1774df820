"""GPUs per job on one machine without SLURM (tunelab.gpus): concurrent jobs get disjoint GPUs, a job waits for
busy ones and then stops with the holders named, a killed job's GPUs are free again, a preset
CUDA_VISIBLE_DEVICES is the pool. A stand-in `nvidia-smi` lists the GPUs; each job is `tunelab.cli.main` as the
rule runs it, with the stage's work replaced by printing what CUDA would see and holding on until told to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab import gpus

# the CLI as the rule calls it; the stage itself prints CUDA_VISIBLE_DEVICES and holds its GPUs until stdin closes
JOB = ("import os, sys; from tunelab import cli; "
       "hold = lambda study, args: (print('visible', os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True), "
       "sys.stdin.read()); "
       "cli.STAGES[sys.argv[1]] = (hold, *cli.STAGES[sys.argv[1]][1:]); "
       "sys.exit(cli.main([sys.argv[1], '--config', sys.argv[2], '--run', sys.argv[3], '--tokens', 't', '--out', 'o']"
       " + (['--base', 'b'] if sys.argv[1] == 'train' else [])))")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine with 4 GPUs (a stand-in nvidia-smi), a lock directory of its own, and a study whose run `two`
    trains on 2 GPUs and `one` on one."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text('#!/bin/sh\n[ "$1" = -L ] || exit 9\n'
                                      'for i in $(seq 0 $((${FAKE_GPUS:-4} - 1))); do '
                                      'echo "GPU $i: NVIDIA H200 (UUID: GPU-fake-$i)"; done\n')
    (tools / "nvidia-smi").chmod(0o755)
    study = {"name": "gpus", "data": {"source": "synthetic:100"}, "models": {"tiny": {"source": "tiny"}},
             "train": {"gradient_accumulation_steps": 4},
             "runs": [{"name": "one", "model": "tiny"},
                      {"name": "two", "model": "tiny", "distributed": {"strategy": "ddp", "gpus": 2}},
                      {"name": "four", "model": "tiny", "distributed": {"strategy": "ddp", "gpus": 4}}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    monkeypatch.setenv(gpus.LOCKS, str(tmp_path / "locks"))
    for name in ("CUDA_VISIBLE_DEVICES", gpus.CLAIMED, "SLURM_JOB_ID", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so that what a claim in this process sets is undone after the test
        monkeypatch.delenv(name)
    return tmp_path


def _start(machine: Path, stage: str, run: str, **environment) -> subprocess.Popen:
    env = {**os.environ, **environment}
    return subprocess.Popen([sys.executable, "-c", JOB, stage, str(machine / "study.yaml"), run], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _visible(job: subprocess.Popen) -> list[str]:
    """The GPUs the job's stage sees (it prints them once its claim is through)."""
    line = job.stdout.readline()
    assert line.startswith("visible "), (line, job.stderr.read() if job.poll() is not None else "")
    return line.split()[1].split(",")


def _refused(machine: Path, stage: str, run: str, **environment) -> str:
    """Run a job that must not get its GPUs: it exits 2 and says why on stderr."""
    job = _start(machine, stage, run, **environment)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 2 and "visible" not in out, (job.returncode, out, err)
    return err


def _end(job: subprocess.Popen) -> None:
    job.stdin.close()
    assert job.wait(timeout=60) == 0, job.stderr.read()


def test_concurrent_jobs_get_disjoint_gpus_wait_and_reclaim_a_dead_jobs(machine):
    trainer = _start(machine, "train", "two")
    merger, generator = _start(machine, "merge", "one"), _start(machine, "generate", "one")
    held = {job: _visible(job) for job in (trainer, merger, generator)}
    assert len(held[trainer]) == 2 and len(held[merger]) == len(held[generator]) == 1
    assert sorted(sum(held.values(), [])) == ["0", "1", "2", "3"]  # disjoint, every GPU in use

    # a fifth job finds no free GPU: it waits, then stops naming the holders
    error = _refused(machine, "merge", "one", TUNELAB_GPU_WAIT="0.5")
    assert "tunelab merge one waited 0.5 s for 1 free GPUs of 4" in error
    assert f"GPU {held[trainer][0]}: pid {trainer.pid} (tunelab train two) since " in error
    assert f"GPU {held[merger][0]}: pid {merger.pid} (tunelab merge one)" in error

    # a job killed outright leaves its lock file behind, naming it, yet its GPU is free at once
    merger.send_signal(signal.SIGKILL)
    merger.wait()
    lock = machine / "locks" / f"gpu-{held[merger][0]}.lock"
    assert f"pid {merger.pid} " in lock.read_text()
    successor = _start(machine, "merge", "one", TUNELAB_GPU_WAIT="0.5")
    assert _visible(successor) == held[merger]
    assert f"pid {successor.pid} " in lock.read_text()

    # a 2-GPU job waits while only the trainer's pair could serve it, and takes it once the trainer ends
    waiting = _start(machine, "train", "two", TUNELAB_GPU_WAIT="120")
    line = ""
    while "waiting for" not in line and (line := waiting.stderr.readline()):
        pass
    assert "tunelab train two: waiting for 2 free GPUs of 4; busy: GPU" in line, line
    _end(trainer)
    assert sorted(_visible(waiting)) == sorted(held[trainer])
    for job in (waiting, successor, generator):
        _end(job)


def test_a_job_needing_more_gpus_than_the_machine_has_is_refused(machine):
    error = _refused(machine, "train", "four", FAKE_GPUS="2")
    assert "tunelab train four needs 4 GPUs and this machine has 2 (nvidia-smi -L): lower train.distributed.gpus" \
        in error


def test_a_preset_cuda_visible_devices_is_the_pool(machine):
    first, second = (_start(machine, "merge", "one", CUDA_VISIBLE_DEVICES="3,1") for _ in range(2))
    assert sorted(_visible(first) + _visible(second)) == ["1", "3"]
    error = _refused(machine, "train", "two", CUDA_VISIBLE_DEVICES="3,1", TUNELAB_GPU_WAIT="0")
    assert "waited 0 s for 2 free GPUs of 2" in error
    for job in (first, second):
        _end(job)


@pytest.mark.parametrize("environment", [{"SLURM_JOB_ID": "4711", "CUDA_VISIBLE_DEVICES": "2"},  # SLURM assigned
                                         {gpus.CLAIMED: "1", "CUDA_VISIBLE_DEVICES": "1"},  # the launcher claimed
                                         {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1"},  # a rank
                                         {"FAKE_GPUS": "0"}])  # no GPU on this machine
def test_nothing_is_claimed_where_the_gpus_are_already_decided(machine, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert gpus.claim(2, "tunelab train two") == []
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == environment.get("CUDA_VISIBLE_DEVICES")
    assert not (machine / "locks").exists()


def test_the_launcher_passes_its_locks_to_the_ranks_launcher(machine, monkeypatch):
    """A distributed run's launcher (torchrun) keeps the job's GPU locks open: they outlive a killed `tunelab
    train` as long as its ranks run."""
    from tunelab.distributed import launch

    assert gpus.claim(1, "tunelab train one") == ["0"]
    try:
        probe = [sys.executable, "-c", "import os, sys; print(sorted(os.listdir('/proc/self/fd')))"]
        monkeypatch.setattr(subprocess, "Popen", _Recording(subprocess.Popen))
        launch.run_forwarding(probe, dict(os.environ), to_children=True)
        assert subprocess.Popen.kwargs["pass_fds"] == gpus.held_files() and len(gpus.held_files()) == 1
    finally:
        for descriptor in gpus.held_files():
            os.close(descriptor)
        gpus._held.clear()


class _Recording:
    """Popen that remembers its keyword arguments."""

    def __init__(self, popen):
        self.popen, self.kwargs = popen, None

    def __call__(self, *args, **kwargs):
        self.kwargs = kwargs
        return self.popen(*args, **kwargs)


def test_a_preset_pool_may_name_gpus_by_uuid(machine):
    job = _start(machine, "merge", "one", CUDA_VISIBLE_DEVICES="GPU-fake-2")
    assert _visible(job) == ["GPU-fake-2"]
    assert (machine / "locks" / "gpu-GPU-fake-2.lock").is_file()
    _end(job)
