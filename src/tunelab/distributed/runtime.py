"""What one training process does in a data-parallel run, against a single process.

`fit` calls the same hooks on every runtime; `Single` does exactly what one process always did.
With W processes, every rank draws the same seeded micro-batches of a step (the 1-GPU step's), keeps its
contiguous 1/W share, divides its loss by the label tokens of the whole step (all-reduced across ranks), and
the gradients are summed across ranks (DDP and ZeRO average them, so each rank's loss is scaled by W).
A 2-GPU step therefore computes the update of the 1-GPU step on the same examples.

Checkpoints (checkpoint.Checkpoints) hand each runtime the directory of the checkpoint being written or read:
one process and DDP keep `weights.pt` and `optimizer.pt` (rank 0 writes them, every rank holds the same),
DeepSpeed writes its own per-rank format (`deepspeed/`), FSDP a torch.distributed.checkpoint of every rank's
shards (`sharded/`, fsdp.FullyShard).
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tunelab.config import TrainConfig
from tunelab.distributed.zero import deepspeed_config

log = logging.getLogger(__name__)


def from_environment(train: TrainConfig) -> Single:
    """The runtime of this process: `Single` unless a launcher started it as one rank of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Single()
    strategy = train.distributed.strategy if train.distributed else "ddp"
    if strategy == "fsdp":
        from tunelab.distributed.fsdp import FullyShard

        return FullyShard(train)
    return DeepSpeed(train) if strategy == "deepspeed" else DataParallel(train)


class Single:
    """One process: the whole step, no communication."""

    rank, world_size, is_main = 0, 1, True
    local_gradients = True  # .grad holds this process's gradients after backward

    def load_model(self, path, train: TrainConfig):
        """The base model for training (`modeling.load_model`); under FSDP only rank 0 reads its weights."""
        from tunelab import modeling

        return modeling.load_model(path, train, for_training=True)

    def shard_model(self, model):
        """`model` as the optimizer must see it: FSDP replaces its weights by shards (before the optimizer exists)."""
        return model

    def grad_scaler(self, device: torch.device, enabled: bool) -> torch.amp.GradScaler:
        """fp16's loss scaler; it must skip a step on every rank alike when any rank's gradients overflow."""
        return torch.amp.GradScaler(device.type, enabled=enabled)

    def wrap(self, model, optimizer):
        """The module to call for the training forward (`model` itself, or its DDP/DeepSpeed wrapper)."""
        return model

    def shard(self, micro_batches: list) -> list:
        """This rank's share of a step's micro-batches."""
        return micro_batches

    def total(self, value):
        """`value` summed over ranks (a number, or a tensor on this rank's device)."""
        return value

    def maximum(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order."""
        return [obj]

    def barrier(self) -> None:
        pass

    def accumulating(self, wrapped, more_to_come: bool):
        """Context of a micro-batch's forward and backward; DDP skips its all-reduce until the last one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer, scaler, params: list[torch.Tensor], max_grad_norm: float) -> None:
        """The optimizer step after a step's micro-batches: unscale, clip, step."""
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()

    def gathered(self, model):
        """Context in which rank 0 can save `model` whole (ZeRO-3 and FSDP shard it); every rank enters it. It
        yields the state dict to save, or None for the model's own."""
        return contextlib.nullcontext()

    def save_state(self, directory: Path, model, optimizer) -> None:
        """Write the trainable weights and the optimizer state into a checkpoint's `directory` (every rank calls
        it; here rank 0 writes, as every rank holds the same)."""
        if self.is_main:
            torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                       directory / "weights.pt")
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path, model, optimizer) -> None:
        """Restore what `save_state` wrote into `model` and `optimizer` (in place)."""
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in torch.load(directory / "weights.pt", weights_only=True).items():
                parameters[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))

    def close(self) -> None:
        pass


class DataParallel(Single):
    """torch DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

    def __init__(self, train: TrainConfig):
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.is_main = self.rank == 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # before the model loads: modeling.device() is the current GPU
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        self._init_process_group()
        log.info("rank %d of %d on %s", self.rank, self.world_size, self.device)

    def _init_process_group(self) -> None:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=30))

    def wrap(self, model, optimizer):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard(self, micro_batches: list) -> list:
        share = len(micro_batches) // self.world_size
        return micro_batches[self.rank * share:(self.rank + 1) * share]

    def total(self, value):
        tensor = value if torch.is_tensor(value) else torch.tensor(value, device=self.device)
        tensor = tensor.to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def maximum(self, value: float) -> float:
        tensor = torch.tensor(float(value), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def any(self, flag: bool) -> bool:
        return self.maximum(1.0 if flag else 0.0) > 0

    def gather(self, obj) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()

    def accumulating(self, wrapped, more_to_come: bool):
        return wrapped.no_sync() if more_to_come else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world_size).backward()  # DDP averages over ranks; the step's gradient is their sum

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class DeepSpeed(DataParallel):
    """DeepSpeed ZeRO (stage 2 or 3) around tunelab's model and torch AdamW, config from `zero.deepspeed_config`."""

    local_gradients = False  # ZeRO keeps gradients in its own partitioned buffers: .grad stays None

    def __init__(self, train: TrainConfig):
        self.config = deepspeed_config(train)
        super().__init__(train)
        self.engine = None

    def _init_process_group(self) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=timedelta(minutes=30))

    def wrap(self, model, optimizer):
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        return self.engine

    def accumulating(self, wrapped, more_to_come: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO averages over ranks (not divided by accumulation here: the loss already is per step token)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()  # once per micro-batch: it updates (and clips) at the accumulation boundary only

    def step(self, optimizer, scaler, params, max_grad_norm) -> None:
        pass  # done by engine.step at the boundary

    def gathered(self, model):
        if self.config["zero_optimization"]["stage"] != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)

    def save_state(self, directory: Path, model, optimizer) -> None:
        # every rank writes its partition of the optimizer state (and of ZeRO-3's weights); frozen weights stay out
        self.engine.save_checkpoint(str(directory), tag="deepspeed", exclude_frozen_parameters=True,
                                    save_latest=False)  # tunelab's manifest says which checkpoint is good

    def load_state(self, directory: Path, model, optimizer) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}/deepspeed")

