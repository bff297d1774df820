"""Which GPUs a job uses on one machine that several jobs share without SLURM.

`snakemake --resources gpu=N` keeps the GPUs of the jobs running at once within N, but it does not say which
GPUs: every job would see all of them and start on cuda:0. So a GPU job (`tunelab train`, `merge`, `export`,
`generate`, `serve`) claims as many GPUs as it uses before CUDA starts: one lock file per GPU in a directory every
job on the machine shares, locked with flock for the life of the process, and CUDA_VISIBLE_DEVICES set to the
GPUs it got (a distributed run's ranks inherit it: they take cuda:0..N-1 of what they see). The kernel releases
a flock when its process dies, however it dies, so a killed job's GPUs are free again at once; the file keeps
the last holder's pid and command only to say who holds a GPU. The choice of GPUs is made under one more lock
(`claim.lock`), so two jobs never each take part of what both need.

Nothing is claimed where something else already decides: inside a SLURM job (its GPUs are the job's alone), in
a rank that a launcher started (its launcher claimed them), and on a machine without `nvidia-smi` or GPUs. A
CUDA_VISIBLE_DEVICES set before the job is the pool it claims from.

Settings of the machine, in the environment: TUNELAB_GPU_LOCKS (the lock directory, default
/tmp/tunelab-gpu-locks) and TUNELAB_GPU_WAIT (seconds a job waits for busy GPUs before it stops with an error
naming their holders, default 3600).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
CLAIMED = "TUNELAB_GPUS_CLAIMED"  # set by a claim: the processes this one starts claim nothing again
LOCKS = "TUNELAB_GPU_LOCKS"
WAIT = "TUNELAB_GPU_WAIT"
DEFAULT_LOCKS = "/tmp/tunelab-gpu-locks"
DEFAULT_WAIT = 3600.0
POLL_SECONDS = 2.0
UNSAFE = re.compile(r"[^\w.-]")  # characters kept out of a lock file's name (ids are indices or UUIDs)
_held: list[int] = []  # this process's lock files, open (and locked) until it exits


def machine_gpus() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES's entries where it is set, else one per GPU that
    `nvidia-smi -L` lists; none without nvidia-smi (a CPU machine)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError) as err:
        log.warning("nvidia-smi -L failed (%s): no GPU claimed", err)
        return []
    count = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(index) for index in range(count)]
    return [] if not count else [entry.strip() for entry in visible.split(",") if entry.strip() not in ("", "-1")]


def claim(count: int, label: str) -> list[str]:
    """Take `count` GPUs of this machine for the life of this process and make them the only ones CUDA shows it;
    return their ids (none where nothing is claimed: see the module docstring). Waits up to TUNELAB_GPU_WAIT
    seconds while they are busy."""
    if count < 1 or CLAIMED in os.environ or "SLURM_JOB_ID" in os.environ or _is_rank():
        return []
    pool = machine_gpus()
    if not pool:
        return []
    if count > len(pool):
        where = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in os.environ
                 else "nvidia-smi -L")
        raise TunelabError(f"{label} needs {count} GPUs and this machine has {len(pool)} ({where}): lower "
                           "train.distributed.gpus, or run it where there are more")
    directory = Path(os.environ.get(LOCKS, DEFAULT_LOCKS))
    wait = float(os.environ.get(WAIT, DEFAULT_WAIT))
    deadline, waiting = time.monotonic() + wait, False
    while True:
        with _choosing(directory):
            taken, busy = _take(directory, pool, count, label)
        if taken:
            break
        if time.monotonic() >= deadline:
            raise TunelabError(f"{label} waited {wait:g} s for {count} free GPUs of {len(pool)}; busy: "
                               f"{_describe(busy)} (lock files in {directory}); wait for them, stop them, or set "
                               f"{WAIT}=<seconds> to wait longer")
        if not waiting:
            log.warning("%s: waiting for %d free GPUs of %d; busy: %s", label, count, len(pool), _describe(busy))
            waiting = True
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[CLAIMED] = ",".join(taken)
    log.info("%s: GPUs %s (CUDA_VISIBLE_DEVICES)", label, ",".join(taken))
    return taken


def held_files() -> tuple[int, ...]:
    """The open lock files of this process's claim, for a launched child to keep (subprocess pass_fds): the GPUs
    stay taken while the child lives, even if this process is killed first."""
    return tuple(_held)


def _is_rank() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun started it: its launcher claimed


@contextlib.contextmanager
def _choosing(directory: Path):
    """One job at a time chooses its GPUs on this machine (a blocking flock on claim.lock)."""
    descriptor = _open(directory, "claim.lock")
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the flock


def _take(directory: Path, pool: list[str], count: int, label: str) -> tuple[list[str], dict[str, str]]:
    """Lock `count` free GPUs of `pool`; all or none. Returns the GPUs taken, and the busy ones' holders."""
    taken, descriptors, busy = [], [], {}
    for gpu in pool:
        descriptor = _open(directory, f"gpu-{UNSAFE.sub('_', gpu)}.lock")
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy[gpu] = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(descriptor)
            continue
        if len(taken) < count:
            taken.append(gpu)
            descriptors.append(descriptor)
        else:
            os.close(descriptor)
    if len(taken) < count:
        for descriptor in descriptors:
            os.close(descriptor)
        return [], busy
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    for descriptor in descriptors:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} ({label}) since {since}\n".encode(), 0)
    _held.extend(descriptors)
    return taken, busy


def _open(directory: Path, name: str) -> int:
    """A lock file that any user's job on the machine can open (the directory is shared like /tmp)."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            directory.chmod(0o1777)
    descriptor = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(PermissionError):
        os.fchmod(descriptor, 0o666)
    return descriptor


def _describe(busy: dict[str, str]) -> str:
    return "; ".join(f"GPU {gpu}: {holder}" for gpu, holder in busy.items()) or "none"
