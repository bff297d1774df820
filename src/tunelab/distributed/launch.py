"""The launcher command lines of a distributed run, and the process that starts them and forwards signals.

`tunelab train` of a run with `distributed.gpus x nodes > 1` does not train itself: on one node it starts
torchrun (`--standalone`, one process per GPU), each process running `tunelab train` again as one rank. With
several nodes it must run inside a SLURM job: it starts one task per node with `srun` (the rule's own step is
`srun -n1` with the SLURM_* variables stripped, so the job id is all it has), and each task starts torchrun with
c10d rendezvous on the first host of the job's node list (`scontrol show hostnames`).

Signals: SLURM's `--signal=USR1@<s>` and scancel's SIGTERM must reach every rank, which then checkpoints after
the current step. torchrun's agent forwards SIGTERM only with a 30 s grace before SIGKILL, and USR1 not at all
(its default action would kill the agent, then the ranks). So the agent runs with USR1 ignored
(`tunelab.distributed.agent`), and the process here sends each signal straight to the agent's children, the
ranks; when the child is srun, srun forwards it to the node tasks, which do the same on their node.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from tunelab import gpus
from tunelab.config import DistributedConfig
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
TRAIN_ARGS = "TUNELAB_TRAIN_ARGS"  # the ranks' `tunelab train` arguments, JSON (distributed.rank)
ROLE = "TUNELAB_LAUNCH_ROLE"  # "node": a per-node task started by srun; "rank": a training process
PORT_BASE = 29500


def is_rank() -> bool:
    """This process is one rank that a launcher started (torchrun sets these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def node_command(distributed: DistributedConfig, *, master: str = "127.0.0.1", port: int = PORT_BASE,
                 rendezvous_id: str = "tunelab", entry: list[str] | None = None) -> list[str]:
    """torchrun on one node: `gpus` ranks, each running `tunelab train` with the arguments in TRAIN_ARGS (or the
    script `entry`)."""
    command = [sys.executable, "-m", "tunelab.distributed.agent", "--nproc_per_node", str(distributed.gpus)]
    if distributed.nodes == 1:
        command += ["--standalone"]  # a free port of its own: several runs may share a machine
    else:
        # c10d rendezvous numbers the nodes as they join (torchrun ignores --node_rank with it)
        command += ["--nnodes", str(distributed.nodes), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"{master}:{port}", "--rdzv_id", rendezvous_id]
    return command + (entry or ["-m", "tunelab.distributed.rank"])


def srun_command(distributed: DistributedConfig, worker_args: list[str], job_id: str, *, gpus: bool) -> list[str]:
    """One task per node of SLURM job `job_id`, each running `tunelab train` as that node's launcher.

    `--overlap`: the rule's own step (the executor plugin's `srun -n1`) still holds its share of the job."""
    command = ["srun", f"--jobid={job_id}", "--overlap", f"--nodes={distributed.nodes}",
               f"--ntasks={distributed.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if gpus:
        command.append(f"--gpus-per-node={distributed.gpus}")
    return command + [sys.executable, "-m", "tunelab.cli", "train", *worker_args]


def slurm_node_command(distributed: DistributedConfig, environ: dict | None = None) -> list[str]:
    """This SLURM node task's torchrun, rendezvous on the first host of the job's node list."""
    environ = os.environ if environ is None else environ
    try:
        job_id, nodelist = environ["SLURM_JOB_ID"], environ["SLURM_JOB_NODELIST"]
    except KeyError as missing:
        raise TunelabError(f"a node launcher of a multi-node run needs {missing} (it runs under srun)") from None
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    master = hosts.stdout.split()[0]
    return node_command(distributed, master=master,
                        port=PORT_BASE + int(job_id) % 1000, rendezvous_id=f"tunelab-{job_id}")


def launch(distributed: DistributedConfig, worker_args: list[str], *, gpus: bool) -> int:
    """Start the run's launcher(s) from `tunelab train`; return the exit status to exit with."""
    role = os.environ.get(ROLE)
    environment = {**os.environ, TRAIN_ARGS: json.dumps(worker_args)}
    if distributed.nodes > 1 and role != "node":
        job_id = environment.get("SLURM_JOB_ID")
        if not job_id:
            raise TunelabError(f"distributed.nodes {distributed.nodes} needs a SLURM job (snakemake --profile "
                               "profiles/slurm): nodes are started with srun; on one machine set nodes: 1")
        environment[ROLE] = "node"
        return run_forwarding(srun_command(distributed, worker_args, job_id, gpus=gpus), environment,
                              to_children=False)
    command = slurm_node_command(distributed) if distributed.nodes > 1 else node_command(distributed)
    environment[ROLE] = "rank"
    return run_forwarding(command, environment, to_children=True)


def run_forwarding(command: list[str], environment: dict, *, to_children: bool) -> int:
    """Run `command`, forwarding SIGTERM/SIGUSR1/SIGINT to its children (the agent's ranks) or to it (srun)."""
    log.info("launching: %s", " ".join(command))
    # the launcher keeps this job's GPU locks (tunelab.gpus) open while it lives, should this process be killed first
    process = subprocess.Popen(command, env=environment, start_new_session=True, pass_fds=gpus.held_files())

    def forward(number, frame):
        targets = _children(process.pid) if to_children else [process.pid]
        log.warning("received %s: forwarding it to %s", signal.Signals(number).name, targets)
        for pid in targets:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass

    previous = {number: signal.signal(number, forward) for number in FORWARDED}
    try:
        return process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children
