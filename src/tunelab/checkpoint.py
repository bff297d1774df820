"""Resumable training checkpoints: written every N steps and on SIGTERM/SIGUSR1, picked up by a rerun.

A checkpoint is a directory `results/runs/<run>/checkpoints/step-00000040/`:
  weights.pt     the trainable weights (the adapter, or every weight of a full fine-tune)
  optimizer.pt   the optimizer's state
    (a distributed run: DDP writes these two; DeepSpeed writes `deepspeed/`, its own format with every rank's
    partition, and FSDP `sharded/`, a torch.distributed.checkpoint of every rank's shards: runtime.save_state)
  trainer.pt     LR scheduler, GradScaler, AdaLoRA's rank allocator, RNG states (python, numpy, torch, cuda)
  progress.json  the step, the micro-batches consumed, the loss curves and the speed counters so far
  manifest.json  written last: the run's fingerprint and the size and SHA-256 of every file above
It is built in a temporary sibling and renamed into place (artifacts.atomic_dir); the newest `checkpoint_keep`
stay. `resume` loads the newest checkpoint whose manifest matches its files and whose fingerprint matches the
run (same config, base and training tokens); a partial, corrupt or foreign one is skipped with a warning.
The training batches are deterministic for a seed (batches.training_batches), so skipping the consumed
micro-batches puts the data where it was. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from tunelab.artifacts import atomic_dir, read_json, write_json
from tunelab.config import BOOKKEEPING, TrainConfig

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # scancel / preemption, and SLURM's `--signal=USR1@<seconds>`


def fingerprint(train: TrainConfig, base: str, tokens: Path) -> str:
    """What a checkpoint must share with the run that resumes it: the settings (checkpointing and
    logging aside), the base model and the training tokens' bytes."""
    settings = train.model_dump(exclude=BOOKKEEPING | {"profile"})
    digest = hashlib.sha256(json.dumps([settings, str(base)], sort_keys=True).encode())
    digest.update(_file_digest(tokens).encode())
    return digest.hexdigest()[:16]


class Checkpoints:
    """The checkpoints of one run. `fit` calls `resume` once before its loop and `after_step` after each step."""

    def __init__(self, root: Path, train: TrainConfig, run_fingerprint: str, runtime=None):
        from tunelab.distributed.runtime import Single

        self.root, self.train, self.fingerprint = Path(root), train, run_fingerprint
        self.runtime = runtime or Single()  # several ranks: rank 0 writes, every rank's RNG state is kept
        self.signalled: int | None = None
        self.resumed_step, self.resumed_wall_seconds = 0, 0.0
        self._started = time.perf_counter()
        self._objects: dict = {}
        self._previous_handlers: dict = {}

    def resume(self, model, optimizer, scheduler, scaler, batches, curves: dict, counted: dict) -> int:
        """Restore the newest good checkpoint into the given objects (in place); return the first step to run.

        Also installs the SIGTERM/SIGUSR1 handlers: from here on a signal ends the run after the current step
        with a checkpoint."""
        self._objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, curves=curves,
                             counted=counted)
        self._started = time.perf_counter()
        for number in SIGNALS:
            self._previous_handlers[number] = signal.signal(number, self._on_signal)
        for directory in self._candidates():
            problem = self._problem(directory)
            if problem:
                log.warning("skipping checkpoint %s: %s", directory, problem)
                continue
            self._load(directory, batches)
            return self.resumed_step + 1
        return 1

    def after_step(self, step: int) -> None:
        """Write a checkpoint when one is due or a signal came; after a signal, exit non-zero."""
        every = self.train.checkpoint_every
        due = every and step % every == 0 and step < self.train.max_steps  # the last step saves the outputs
        stop = self.signalled
        if self.runtime.world_size > 1:  # a signal to any rank stops every rank after the same step
            # read into `stop`, never written back: a signal handled while the all-reduce blocked (its handler runs
            # as the call returns) would be overwritten by the value reduced before it, and lost
            stop = int(self.runtime.maximum(stop or 0)) or None
        if due or stop:
            self.save(step)
        if stop:
            name = signal.Signals(stop).name
            log.warning("stopped by %s after step %d/%d; rerun the same command to resume from %s",
                        name, step, self.train.max_steps, self.root / _name(step))
            raise SystemExit(128 + stop)

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (after the step's update), then drop the oldest beyond checkpoint_keep."""
        objects, runtime = self._objects, self.runtime
        path = self.root / _name(step)
        rng = runtime.gather(_rng_bytes())  # a collective: every rank calls save
        with atomic_dir(path) if runtime.is_main else contextlib.nullcontext() as tmp:
            # rank 0's temporary directory, where every rank writes its part (one file system for all nodes)
            tmp = Path(runtime.gather(str(tmp))[0])
            runtime.save_state(tmp, objects["model"], objects["optimizer"])
            runtime.barrier()  # every rank's part is written before rank 0 hashes it and renames the directory
            if runtime.is_main:
                torch.save({"scheduler": objects["scheduler"].state_dict(), "scaler": objects["scaler"].state_dict(),
                            "adalora": _adalora_state(objects["model"]), "rng": _rng_state(),
                            "rng_of_ranks": [torch.load(io.BytesIO(state), weights_only=True) for state in rng]},
                           tmp / "trainer.pt")
                write_json(tmp / "progress.json", {
                    "step": step, "micro_batches": step * self.train.gradient_accumulation_steps,
                    "curves": objects["curves"], "counted": objects["counted"],
                    "wall_seconds": self.wall_seconds})
                files = sorted(file.relative_to(tmp).as_posix() for file in tmp.rglob("*") if file.is_file())
                write_json(tmp / "manifest.json", {  # last: a checkpoint without it is incomplete
                    "step": step, "fingerprint": self.fingerprint,
                    "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _file_digest(tmp / name)}
                              for name in files}})
        if runtime.is_main:
            self._prune(keep=path)
            log.info("checkpoint %s written (step %d/%d)", path, step, self.train.max_steps)
        runtime.barrier()  # rank 0 has renamed it before any rank exits after a signal
        return path

    @property
    def wall_seconds(self) -> float:
        """Seconds of training so far, the attempts before a resume included."""
        return self.resumed_wall_seconds + time.perf_counter() - self._started

    def finish(self) -> None:
        """The run's outputs are saved: drop its checkpoints and give the signals their old handlers back."""
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        if self.root.exists() and self.runtime.is_main:
            shutil.rmtree(self.root)

    def _on_signal(self, number: int, frame) -> None:
        log.warning("received %s: finishing the current step, then writing a checkpoint",
                    signal.Signals(number).name)
        self.signalled = number

    def _candidates(self) -> list[Path]:
        """Checkpoint directories, newest first (temporary `.step-*` siblings are never candidates)."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("step-*"), key=lambda p: p.name, reverse=True)

    def _problem(self, directory: Path) -> str | None:
        """Why `directory` can't be resumed from, or None."""
        if not (directory / "manifest.json").is_file():
            return "no manifest.json (it was not finished)"
        try:
            manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"unreadable manifest.json ({err})"
        if manifest.get("fingerprint") != self.fingerprint:
            return "written by a run with other settings, base or tokens"
        for name, expected in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
            if _file_digest(file) != expected["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
        return None

    def _load(self, directory: Path, batches) -> None:
        objects = self._objects
        progress = read_json(directory / "progress.json")
        self.runtime.load_state(directory, objects["model"], objects["optimizer"])
        trainer = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)  # RNG states: CPU
        objects["scheduler"].load_state_dict(trainer["scheduler"])
        objects["scaler"].load_state_dict(trainer["scaler"])
        _set_adalora_state(objects["model"], trainer["adalora"])
        for _ in range(progress["micro_batches"]):  # before the RNG restore: a new epoch draws from torch's RNG
            next(batches)
        _set_rng_state(trainer.get("rng_of_ranks", [trainer["rng"]])[self.runtime.rank])  # same world: fingerprint
        for key, value in progress["curves"].items():
            objects["curves"][key][:] = value
        objects["counted"].update(progress["counted"])
        self.resumed_step, self.resumed_wall_seconds = progress["step"], progress["wall_seconds"]
        log.info("resumed from %s (step %d/%d)", directory, self.resumed_step, self.train.max_steps)

    def _prune(self, keep: Path) -> None:
        """Keep `keep` and the newest older checkpoints of this run, `checkpoint_keep` in all; drop the rest
        (newer ones were skipped as corrupt or foreign, or `keep` would not have been written)."""
        older = [p for p in self._candidates() if p.name < keep.name and _fingerprint_of(p) == self.fingerprint]
        kept = {keep, *older[:self.train.checkpoint_keep - 1]}
        for directory in self._candidates():
            if directory not in kept:
                shutil.rmtree(directory, ignore_errors=True)


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _fingerprint_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / "manifest.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state() -> dict:
    """Every RNG the step touches (dropout, sampling), as tensors and plain lists (loadable with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_bytes() -> bytes:
    """This rank's RNG state, serialized: all_gather_object can't carry the tensors in it on gloo."""
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    return buffer.getvalue()


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _adalora_state(model) -> dict:
    """AdaLoRA's importance averages and rank pattern, which live outside the weights (PEFT RankAllocator)."""
    allocator = getattr(getattr(model, "base_model", None), "rankallocator", None)
    if allocator is None:
        return {}
    config = model.peft_config["default"]
    return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": config.rank_pattern}


def _set_adalora_state(model, state: dict) -> None:
    if not state:
        return
    allocator, device = model.base_model.rankallocator, next(model.parameters()).device
    for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, name, {key: value.to(device) for key, value in state[name].items()})
    model.peft_config["default"].rank_pattern = state["rank_pattern"]
