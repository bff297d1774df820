"""Stage `export`: quantize a merged run for deployment, so its quality can be scored like any run.

Formats: `nf4` (bitsandbytes 4-bit NF4, double quantization), `int8` (LLM.int8) and `pruned_int8` (the
output channels of smallest L2 norm in every decoder projection zeroed with torch's structured pruning,
then 8-bit). Each is saved with transformers' bitsandbytes serialisation, so plain
`AutoModelForCausalLM.from_pretrained(dir)` reloads it quantized.
Reads `results/runs/<run>/merged`; writes `results/runs/<run>.<format>/model/` and `export.json` (size on
disk, sparsity reached).
Run: `tunelab export --config config.yaml --run <run>.<format> --merged results/runs/<run>/merged --out ...`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch.nn.utils import prune
from transformers import AutoModelForCausalLM

from tunelab import modeling
from tunelab.artifacts import atomic_dir, invalidate, write_json
from tunelab.config import TrainConfig

log = logging.getLogger(__name__)


def run_export(merged: Path, export_format: str, prune_amount: float, out: Path) -> dict:
    """Quantize the merged model at `merged` into `out/model`; write `out/export.json`."""
    tokenizer = modeling.load_tokenizer(merged)
    quantization = "nf4" if export_format == "nf4" else "int8"
    settings = TrainConfig(method="full", quantization="none",
                           precision="bf16" if modeling.device().type == "cuda" else "fp32")
    config = modeling.quantization_config(settings.model_copy(update={"quantization": quantization}))
    sparsity = None
    invalidate(out / "export.json")
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(out / "model") as target:
        source = merged
        if export_format == "pruned_int8":
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
            sparsity = prune_channels(model, prune_amount)
            model.save_pretrained(scratch)
            source = Path(scratch)
        quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=config,
                                                         dtype=modeling.DTYPES[settings.precision],
                                                         device_map={"": str(modeling.device())})
        quantized.save_pretrained(target)
        tokenizer.save_pretrained(target)
    size = modeling.weights_size(out / "model")
    report = {"format": export_format, "source": str(merged), "size_bytes": size, "sparsity": sparsity,
              "prune_amount": prune_amount if export_format == "pruned_int8" else None}
    write_json(out / "export.json", report)
    log.info("exported %s as %s: %.2f MB%s", merged, export_format, size / 1e6,
             f", sparsity {sparsity:.1%}" if sparsity is not None else "")
    return report


def prune_channels(model, amount: float) -> float:
    """Zero `amount` of the output channels (smallest L2 norm) of every decoder projection; return the share
    of those projections' weights that are now zero."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
            prune.remove(module, "weight")
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)
