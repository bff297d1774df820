"""FSDP2 (`distributed.strategy: fsdp`): torch's `fully_shard` on every decoder layer and on the whole model.

Each rank keeps 1/W of every weight, gradient and optimizer state (like ZeRO-3); a layer's weights are
all-gathered for its forward and backward and dropped after. torch's own API is used rather than accelerate's
FSDP plugin: tunelab's loop (runtime.Single's hooks) already does what the plugin's Accelerator would take over
(accumulation, loss scaling, clipping), and the plugin's FSDP2 path calls the same `fully_shard` per layer.

Only rank 0 reads the base weights. The other ranks build the model from its config on the meta device (no
memory), attach the method there, shard it, allocate their shards and receive them from rank 0
(`set_model_state_dict(broadcast_from_rank0=True)`, the adapters' initial values included; the buffers, such as
the rotary frequencies that no state dict holds, by broadcast), so the host never holds a copy of the model per
rank. QLoRA keeps loading on every rank: bitsandbytes quantizes while it loads and keeps each 4-bit weight's
quantization state on the weight object, which a state-dict broadcast into sharded parameters does not rebuild.

Precision stays tunelab's, as under DeepSpeed: weights keep the dtype `modeling.load_model` gave them (fp32
master weights for full fine-tuning) and autocast computes in the run's precision. QLoRA works because
bitsandbytes' 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`, modeling.quantization_config),
so FSDP shards them like any weight, and a Linear4bit restores its quantization state from the module after the
all-gather. What FSDP2 can't take is refused at validation (config.UNSUPPORTED_DISTRIBUTED).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from tunelab.config import TrainConfig
from tunelab.distributed.runtime import DataParallel

log = logging.getLogger(__name__)
SHARDED = "sharded"  # a checkpoint's torch.distributed.checkpoint directory: every rank's shards


class FullyShard(DataParallel):
    """torch FSDP2 around tunelab's model: weights, gradients and AdamW states sharded over the ranks."""

    local_gradients = False  # each rank's .grad is its shard (a DTensor): the step-1 zero check would need them all
    mesh = None  # the ranks a weight is sharded over: all of them (torch's default mesh)

    def __init__(self, train: TrainConfig):
        super().__init__(train)
        self.from_rank0 = train.quantization == "none"  # see the module docstring (QLoRA loads on every rank)

    def load_model(self, path, train: TrainConfig):
        from tunelab import modeling

        return modeling.load_model(path, train, for_training=True, on_meta=self.from_rank0 and not self.is_main)

    def shard_model(self, model):
        from torch.distributed.fsdp import fully_shard

        # rank 0's whole weights (references: they are freed once every rank has its shards)
        whole = model.state_dict() if self.from_rank0 and self.is_main else {}
        layer_names = set(_transformers_model(model)._no_split_modules or ())
        layers = [module for module in model.modules() if type(module).__name__ in layer_names]
        if not layers:
            raise RuntimeError(f"FSDP: no decoder layer ({', '.join(sorted(layer_names)) or 'none named'}) in the model")
        for layer in layers:  # one all-gather per layer; embeddings, final norm and output layer go with the root
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        log.info("FSDP2: %d layers and the root sharded over %d ranks", len(layers), self.world_size)
        if self.from_rank0:
            self._receive_from_rank0(model, whole)
        return model

    def _receive_from_rank0(self, model, whole: dict) -> None:
        """Allocate this rank's shards (the other ranks' models are on the meta device) and fill them with rank 0's
        weights; every rank takes part."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not self.is_main:
            model.to_empty(device=self.device)
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # persistent or not: non-persistent ones (rotary inv_freq) are in no state dict
            dist.broadcast(buffer, src=0)
        log.info("FSDP2: weights read on rank 0 only, %d tensors sent to the shards of %d ranks", len(whole) or 0,
                 self.world_size)

    def grad_scaler(self, device: torch.device, enabled: bool):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # each rank sees only its gradient shards: the overflow check is all-reduced, so every rank skips alike
        return ShardedGradScaler(device.type, enabled=enabled)

    def wrap(self, model, optimizer):
        return model  # fully_shard changed the model in place

    def accumulating(self, wrapped, more_to_come: bool):
        # each micro-batch's gradients are reduce-scattered into the shards: no rank ever holds a whole gradient
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # whole tensors on rank 0's CPU, one weight at a time (an empty dict on the other ranks)
        yield get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_state(self, directory: Path, model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(_trainable_state(model, optimizer), checkpoint_id=directory / SHARDED)

    def load_state(self, directory: Path, model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = _trainable_state(model, optimizer)  # the shards' shapes to read into
        dcp.load(state, checkpoint_id=directory / SHARDED)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=False))  # frozen weights are the base's, not saved


def _trainable_state(model, optimizer) -> dict:
    """The trainable weights' shards and the optimizer's, keyed by weight name (frozen weights left out)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = {name for name, weight in model.named_parameters() if weight.requires_grad}
    weights = {name: value for name, value in get_model_state_dict(model).items() if name in trainable}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def _transformers_model(model):
    """The transformers model inside a PEFT wrapper (it names its decoder layer class in _no_split_modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
