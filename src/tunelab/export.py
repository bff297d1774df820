"""Stage `export`: quantize a merged run for deployment, so its quality can be scored like any run.

Formats: `nf4` (bitsandbytes 4-bit NF4, double quantization), `int8` (LLM.int8) and `pruned_int8`: whole MLP
channels and key-value head groups removed from every layer (tunelab.prune, a smaller stock config), a short
recovery fine-tune on the training split in the run's batches (a LoRA merged in, or all weights),
then 8-bit. Each is saved with transformers' bitsandbytes serialisation, so plain `AutoModelForCausalLM.from_pretrained(dir)` reloads it quantized. The pruned model is
quantized from memory: no full-precision copy is written anywhere.
Reads `results/runs/<run>/merged` (and the training tokens for pruned_int8); writes
`results/runs/<run>.<format>/model/` and `export.json` (size on disk, parameters, what pruning removed, the
recovery losses, CPU generation tokens/s).
Run: `tunelab export --config config.yaml --run <run>.<format> --merged results/runs/<run>/merged --tokens ... --out ...`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunelab import modeling
from tunelab.artifacts import atomic_dir, invalidate, read_jsonl, write_json
from tunelab.config import ExportConfig, LoraConfig, TrainConfig

log = logging.getLogger(__name__)
SPEED_PROMPTS, SPEED_TOKENS = 4, 16  # the export's own generation-speed probe: greedy, a fixed token count


def run_export(merged: Path, export_format: str, settings: ExportConfig, tokens_dir: Path, out: Path,
               trained: TrainConfig) -> dict:
    """Quantize (pruning first for pruned_int8) the merged model at `merged` into `out/model`; write
    `out/export.json`. `trained` is how the source run trained, whose batching the recovery fine-tune keeps."""
    tokenizer = modeling.load_tokenizer(merged)
    quantization = "nf4" if export_format == "nf4" else "int8"
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # a warning per int8 matmul
    invalidate(out / "export.json")
    report = {"format": export_format, "source": str(merged)}
    if export_format == "pruned_int8":
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32,
                                                     device_map={"": str(modeling.device())})
        model = _prune_and_recover(model, settings, trained, tokens_dir, tokenizer.pad_token_id, report)
        quantized = quantize(model, quantization)
        del model
    else:
        quantized = quantize(merged, quantization)
        report["parameters"] = sum(p.numel() for p in quantized.parameters())
    with atomic_dir(out / "model") as target:
        quantized.save_pretrained(target)
        tokenizer.save_pretrained(target)
    report["size_bytes"] = modeling.weights_size(out / "model")
    report.update(_generation_speed(quantized, tokenizer, read_jsonl(tokens_dir / "test.jsonl")))
    write_json(out / "export.json", report)
    log.info("exported %s as %s: %.2f MB, %.1f generated tokens/s on %s", merged, export_format,
             report["size_bytes"] / 1e6, report["generated_tokens_per_second"], report["speed_device"])
    return report


def quantize(source, quantization: str):
    """`source` (a model directory, or a model in memory: rebuilt from its weights, no copy written) loaded in
    `quantization` (nf4 or int8) on the run's device. What stays unquantized (embeddings, norms) is bf16: a
    deployable file keeps no fp32 tensors."""
    config = modeling.quantization_config(TrainConfig(method="full", precision="bf16").model_copy(
        update={"quantization": quantization}))  # model_copy: the quantization check is for training runs
    load = {"quantization_config": config, "dtype": torch.bfloat16, "device_map": {"": str(modeling.device())}}
    if isinstance(source, torch.nn.Module):
        return type(source).from_pretrained(None, config=source.config, state_dict=source.state_dict(), **load)
    return AutoModelForCausalLM.from_pretrained(source, **load)


def _prune_and_recover(model, settings: ExportConfig, trained: TrainConfig, tokens_dir: Path, pad_id: int,
                       report: dict):
    """Prune `model` (fp32) in place, then fine-tune it on the training split (a merged LoRA adapter, or all
    weights) in the batches the run trained with."""
    from tunelab.prune import prune_structured
    from tunelab.train import attach_method, fit

    train_examples = read_jsonl(tokens_dir / "train.jsonl")
    pruning = prune_structured(model, settings.prune_amount, train_examples[:settings.calibration_examples])
    report.update(prune_amount=settings.prune_amount, **pruning, parameters=pruning["parameters_after"])
    if not settings.recovery_steps:
        return model
    recovery = recovery_config(settings, trained)
    adapted = attach_method(model, recovery)
    metrics = fit(adapted, train_examples, read_jsonl(tokens_dir / "validation.jsonl"), recovery, pad_id,
                  label="recovery")
    report["recovery"] = {"method": recovery.method, "steps": recovery.max_steps,
                          "learning_rate": recovery.learning_rate, "lora_r": recovery.lora.r,
                          "micro_batch_size": recovery.micro_batch_size, "group_by_length": recovery.group_by_length,
                          "first_loss": metrics["loss_curve"][0][1],
                          "final_validation_loss": metrics["final_validation_loss"]}
    return adapted.merge_and_unload() if recovery.method == "lora" else adapted


def recovery_config(settings: ExportConfig, trained: TrainConfig) -> TrainConfig:
    """The recovery fine-tune: the export's method, steps, learning rate and rank, in the run's batches (micro-batch
    size, accumulation, length grouping, packing, seed) and optimizer. A recovery in other batches than the
    run's can undo what the run learnt: grouped by length, each batch of the tiny study holds one task family."""
    steps, rank = settings.recovery_steps, settings.recovery_lora_r
    kept = trained.model_dump(include={"micro_batch_size", "gradient_accumulation_steps", "group_by_length",
                                       "packing", "seed", "optimizer", "weight_decay", "max_grad_norm",
                                       "lr_scheduler"})
    return TrainConfig(**kept, method=settings.recovery_method, max_steps=steps,
                       precision="bf16" if modeling.device().type == "cuda" else "fp32",
                       learning_rate=settings.recovery_learning_rate, warmup_steps=min(10, steps // 5),
                       eval_every=steps, log_every=max(1, steps // 5), lora=LoraConfig(r=rank, alpha=2 * rank),
                       profile={"steps": 0}, tracking=[])


@torch.no_grad()
def _generation_speed(model, tokenizer, examples: list[dict]) -> dict:
    """Greedy tokens/s of `model` on the first test prompts, SPEED_TOKENS new tokens each (recorded, not judged:
    the machine may be shared)."""
    device = next(model.parameters()).device
    prompts = [e["input_ids"][:next((i for i, label in enumerate(e["labels"]) if label != -100), None)]
               for e in examples[:SPEED_PROMPTS]]  # up to the first answer token
    model.eval()
    began = time.perf_counter()
    for ids in prompts:
        model.generate(torch.tensor([ids], device=device), max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - began
    return {"generated_tokens_per_second": len(prompts) * SPEED_TOKENS / seconds, "speed_device": device.type}
