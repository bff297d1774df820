"""Gradient checkpointing with each decoder layer's input offloaded to pinned CPU memory (`train.checkpoint_offload`).

Plain (non-reentrant) checkpointing keeps every checkpointed layer's input on the GPU from the forward pass until
that layer's backward: layers x batch x seq x hidden values (0.77 GiB for Qwen2.5-7B at 4 x 1,024 tokens in bf16),
growing with the batch. Here the forward runs the layer without saving anything, copies its input to pinned host
memory on a side stream (overlapping the next layers' compute), and the backward copies it back (the previous
layer's input is prefetched while this one recomputes), recomputes the layer under the forward's autocast and RNG
state, and back-propagates through it. The gradients are those of plain checkpointing (tests/test_offload.py).

`apply` installs it as the checkpointing function of every checkpointed layer once the method is attached
(`train.attach_method`); `auto` is on for one CUDA process and off elsewhere, so the CPU path never needs it.
`train.checkpoint_layers: N` checkpoints only the first N decoder layers: the others keep their activations on the
GPU and are not recomputed, which trades memory (about 0.6 GiB per Qwen2.5-7B layer at 4 x 1,024 tokens) for the
recomputation (a third of a frozen-base LoRA step's matmuls in each such layer).
What ran is recorded as `checkpointing` (none, recompute, offload; `offload 14/28 layers` where
checkpoint_layers leaves some out) in train_metrics.json.
"""

from __future__ import annotations

import logging

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from tunelab import modeling
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
APPLIED = "_tunelab_checkpointing"  # attribute on the returned model: none, recompute or offload


def resolve(train, device: torch.device) -> str:
    """How a run checkpoints: none (no gradient checkpointing), recompute (on the GPU) or offload."""
    if not train.gradient_checkpointing:
        return "none"  # checkpoint_offload on without it is refused by the config
    if train.checkpoint_offload == "on":
        return "offload"
    if train.checkpoint_offload == "auto" and device.type == "cuda" and train.world_size == 1:
        return "offload"
    return "recompute"


def apply(model, train):
    """Make every checkpointed layer of `model` offload its input when `train` resolves to offload; return it."""
    device = modeling.model_device(model)  # a rank's model may still be on the meta device
    mode = resolve(train, device)
    # the layers transformers checkpoints (the model itself also carries a gradient_checkpointing flag)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
              and getattr(m, "gradient_checkpointing", False)]
    total = len(layers)
    if mode != "none" and train.checkpoint_layers is not None and train.checkpoint_layers < total:
        for layer in layers[train.checkpoint_layers:]:
            layer.gradient_checkpointing = False  # transformers' GradientCheckpointingLayer then runs it plainly
        layers = layers[:train.checkpoint_layers]
        log.info("checkpointing: the first %d of %d layers; the others keep their activations", len(layers), total)
    if mode == "offload":
        offloader = Offloader(device)
        for layer in layers:
            layer._gradient_checkpointing_func = offloader
        log.info("checkpointing offload: %d layer inputs kept in %s host memory", len(layers),
                 "pinned" if device.type == "cuda" else "plain")
    setattr(model, APPLIED, mode if len(layers) == total else f"{mode} {len(layers)}/{total} layers")
    return model


def applied(model) -> str:
    """The checkpointing `apply` set up on `model` (none for a model it never saw)."""
    return getattr(model, APPLIED, "none")


class _Stored:
    """One layer input on the host, with its copy's completion event and the previous layer's input (prefetched
    during this layer's backward)."""

    def __init__(self, host: torch.Tensor, copied, previous: _Stored | None):
        self.host, self.copied, self.previous = host, copied, previous
        self.device_copy, self.loaded = None, None


class Offloader:
    """The checkpointing function (`torch.utils.checkpoint.checkpoint`'s signature) that offloads layer inputs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last: _Stored | None = None  # the latest stored input: the next one's `previous`
        # an input that always needs a gradient, so that the backward runs (and reaches the layer's LoRA weights)
        # also where the layer's input needs none (the first layer's, from a frozen embedding)
        self.anchor = torch.empty(0, requires_grad=True)

    def __call__(self, run, hidden: torch.Tensor, *args, **kwargs):
        kwargs.pop("use_reentrant", None)
        kwargs.pop("preserve_rng_state", None)
        if kwargs or any(torch.is_tensor(a) and a.requires_grad for a in args):
            raise TunelabError("checkpoint_offload: a checkpointed layer got keyword arguments or a second input "
                               "that needs a gradient; set train.checkpoint_offload: off")
        return _OffloadedLayer.apply(self, run, self.anchor, hidden, *args)

    def store(self, hidden: torch.Tensor) -> _Stored:
        if self.stream is None:  # CPU: a separate copy, so the path is the same as on a GPU
            stored = _Stored(hidden.detach().clone(), None, self.last)
        else:
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(hidden, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            hidden.record_stream(self.stream)  # its memory is not reused before the copy has read it
            stored = _Stored(host, copied, self.last)
        self.last = stored
        return stored

    def prefetch(self, stored: _Stored | None) -> None:
        """Start copying `stored` back to the GPU on the side stream (once)."""
        if stored is None or self.stream is None or stored.host is None or stored.device_copy is not None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(stored.copied)
            stored.device_copy = stored.host.to(self.device, non_blocking=True)
            stored.loaded = torch.cuda.Event()
            stored.loaded.record(self.stream)

    def load(self, stored: _Stored) -> torch.Tensor:
        """`stored` back on the device (waiting for its prefetch, or copying it now); frees the host copy."""
        if self.stream is None:
            hidden = stored.host
        else:
            self.prefetch(stored)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(stored.loaded)
            hidden = stored.device_copy
            hidden.record_stream(current)
        self.prefetch(stored.previous)
        stored.host = stored.device_copy = stored.previous = None
        return hidden


class _OffloadedLayer(torch.autograd.Function):
    """One checkpointed layer: forward without saving activations, its input offloaded; backward recomputes."""

    @staticmethod
    def forward(ctx, offloader: Offloader, run, anchor: torch.Tensor, hidden: torch.Tensor, *args):
        device_type = hidden.device.type
        ctx.offloader, ctx.run, ctx.args = offloader, run, args
        ctx.autocast = dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                            dtype=torch.get_autocast_dtype(device_type), cache_enabled=torch.is_autocast_cache_enabled())
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(hidden.device) if device_type == "cuda" else None)
        ctx.stored = offloader.store(hidden)
        return run(hidden, *args)  # autograd runs a Function's forward without recording a graph

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.offloader.load(ctx.stored).detach().requires_grad_(ctx.needs_input_grad[3])
        ctx.stored = None
        device = hidden.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                output = ctx.run(hidden, *ctx.args)
        outputs = output if isinstance(output, tuple) else (output,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if torch.is_tensor(out) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, None, None, hidden.grad) + (None,) * len(ctx.args)
