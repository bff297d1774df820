"""Structured pruning that shrinks the model: whole MLP channels and whole key-value head groups are removed,
the same number in every decoder layer, so the result is a stock Llama/Qwen2-style config (smaller
`intermediate_size`, `num_attention_heads`, `num_key_value_heads`) that plain `AutoModelForCausalLM` loads.

Importance (activation-weighted magnitude, as in Wanda): on a few training examples, the mean |activation| that
enters `down_proj` (per MLP channel) or `o_proj` (per attention head) times the L2 norm of the weights that
channel writes to the residual stream. A key-value group scores the sum of its query heads; the lowest-scoring
channels and groups go.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def prune_structured(model, share: float, calibration: list[dict]) -> dict:
    """Remove `share` of the MLP channels and floor(`share` x key-value heads) key-value groups from every layer
    of `model` in place, by importance on `calibration` (tokenized examples); return what was removed."""
    config = model.config
    layers = model.model.layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    activity = _mean_input_magnitudes(model, calibration)
    before = sum(p.numel() for p in model.parameters())
    keep_channels = config.intermediate_size - round(share * config.intermediate_size)
    keep_groups = kv_heads - math.floor(share * kv_heads)
    if keep_channels < 1:
        raise ValueError(f"prune share {share} leaves no MLP channel of {config.intermediate_size}")
    for index, layer in enumerate(layers):
        mlp, attention = layer.mlp, layer.self_attn
        channel_score = activity[f"{index}.mlp"] * mlp.down_proj.weight.norm(dim=0)
        channels = channel_score.topk(keep_channels).indices.sort().values
        _keep_rows(mlp.gate_proj, channels)
        _keep_rows(mlp.up_proj, channels)
        _keep_columns(mlp.down_proj, channels)
        if keep_groups < kv_heads:
            per_head = (activity[f"{index}.attn"] * attention.o_proj.weight.norm(dim=0)).view(heads, head_dim).sum(1)
            groups = per_head.view(kv_heads, heads // kv_heads).sum(1).topk(keep_groups).indices.sort().values
            query_dims = _dims(_heads_of(groups, heads // kv_heads), head_dim)
            kv_dims = _dims(groups, head_dim)
            _keep_rows(attention.q_proj, query_dims)
            _keep_rows(attention.k_proj, kv_dims)
            _keep_rows(attention.v_proj, kv_dims)
            _keep_columns(attention.o_proj, query_dims)
    removed_groups = kv_heads - keep_groups
    removed_channels = config.intermediate_size - keep_channels
    config.head_dim = head_dim  # hidden_size / num_attention_heads no longer gives it
    config.intermediate_size = keep_channels
    config.num_attention_heads = heads - removed_groups * (heads // kv_heads)
    config.num_key_value_heads = keep_groups
    after = sum(p.numel() for p in model.parameters())
    summary = {"intermediate_size": keep_channels, "num_attention_heads": config.num_attention_heads,
               "num_key_value_heads": keep_groups, "parameters_before": before, "parameters_after": after,
               "pruned_share": 1 - after / before}
    log.info("pruned %d of %d MLP channels and %d of %d key-value groups per layer: %s -> %s parameters",
             removed_channels, removed_channels + keep_channels, removed_groups, kv_heads, f"{before:,}", f"{after:,}")
    return summary


@torch.no_grad()
def _mean_input_magnitudes(model, calibration: list[dict]) -> dict[str, torch.Tensor]:
    """Mean |input| per feature of every layer's down_proj (`<i>.mlp`) and o_proj (`<i>.attn`) over
    `calibration`, one example at a time (no padding to mask)."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for key, module in ((f"{index}.mlp", layer.mlp.down_proj), (f"{index}.attn", layer.self_attn.o_proj)):
            def record(_module, inputs, _output, key=key):
                magnitude = inputs[0].detach().float().abs().flatten(0, -2).sum(0)
                sums[key] = sums.get(key, 0) + magnitude
            hooks.append(module.register_forward_hook(record))
    device = next(model.parameters()).device
    try:
        model.eval()
        for example in calibration:
            ids = torch.tensor([example["input_ids"]], device=device)
            model(input_ids=ids)
            tokens += ids.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return {key: total / max(tokens, 1) for key, total in sums.items()}


def _heads_of(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    return (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).flatten()


def _dims(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _keep_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    """Keep only the output features `rows` of `linear`."""
    linear.weight = torch.nn.Parameter(linear.weight.data[rows].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[rows].clone())
    linear.out_features = len(rows)


def _keep_columns(linear: torch.nn.Linear, columns: torch.Tensor) -> None:
    """Keep only the input features `columns` of `linear`."""
    linear.weight = torch.nn.Parameter(linear.weight.data[:, columns].clone())
    linear.in_features = len(columns)
