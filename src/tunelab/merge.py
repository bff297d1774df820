"""Stage `merge`: turn a trained run into a plain transformers model a user can deploy.

Adapters are merged in fp32; the merged model is saved in the precision the run computed in (fp32 or bf16/fp16),
so that it is the model that trained, not a rounding of it. A QLoRA
adapter was trained against the dequantised 4-bit (or 8-bit) weights, so by default (`merge.base: dequantized`)
it merges into exactly those: the base is loaded quantized as it trained, dequantised, and the adapter added.
`merge.base: original` merges into the full-precision base instead, which differs from the trained model by the
whole quantisation error. Either way `merge.json` records, on a fixed batch of test examples, the largest logit
difference between the merged model and the model as it trained, and how often their top-1 tokens agree.
Reads `results/runs/<run>/model`; writes `results/runs/<run>/merged/` (safetensors + tokenizer) and `merge.json`.
Run: `tunelab merge --config config.yaml --run <run> --tokens ... --out results/runs/<run>`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab import modeling
from tunelab.artifacts import atomic_dir, invalidate, read_json, read_jsonl, write_json
from tunelab.batches import collate
from tunelab.config import MergeConfig, TrainConfig
from tunelab.generation import load_for_inference

log = logging.getLogger(__name__)
PARITY_EXAMPLES = 8


def run_merge(run_dir: Path, tokens_dir: Path, settings: MergeConfig = MergeConfig()) -> dict:
    """Merge `run_dir/model` into one model at `run_dir/merged`; write `run_dir/merge.json`."""
    trained, tokenizer, train = load_for_inference(run_dir / "model", None)
    merged, base = merged_model(run_dir, train, settings.base)
    dtype = modeling.DTYPES[train.precision]
    merged.to(dtype)
    batch = collate(read_jsonl(tokens_dir / "test.jsonl")[:PARITY_EXAMPLES], tokenizer.pad_token_id)
    parity = compare_logits(trained, merged, batch)
    invalidate(run_dir / "merge.json")
    with atomic_dir(run_dir / "merged") as out:
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    size = modeling.weights_size(run_dir / "merged")
    report = {"method": train.method, "quantization": train.quantization, "merged_into": base,
              "dtype": str(dtype).removeprefix("torch."), **parity, "size_bytes": size}
    write_json(run_dir / "merge.json", report)
    log.info("merged %s into the %s base at %s (%.1f MB); against the trained model: max logit difference %.4g, "
             "top-1 agreement %.2f%%", run_dir / "model", base, run_dir / "merged", size / 1e6,
             parity["max_logit_difference_vs_trained"], 100 * parity["top1_agreement_vs_trained"])
    return report


def merged_model(run_dir: Path, train: TrainConfig, base: str):
    """The run as one fp32 model without adapters, and what its adapter went into ("dequantized" for a
    quantized run's dequantised base, else "original"; "none" for a full fine-tune)."""
    fp32 = TrainConfig(method="full", precision="fp32", attention="eager")
    if train.method == "full":
        return modeling.load_model(run_dir / "model", fp32, for_training=False), "none"
    from peft import PeftModel

    base_path = read_json(run_dir / "train_metrics.json")["base"]
    if train.quantization != "none" and base == "dequantized":
        quantized = train.model_copy(update={"attention": "eager", "gradient_checkpointing": False})
        weights = modeling.load_model(base_path, quantized, for_training=False).dequantize(dtype=torch.float32)
        weights.to(torch.float32)  # the layers bitsandbytes left unquantized are in the run's precision
    else:
        base, weights = "original", modeling.load_model(base_path, fp32, for_training=False)
    return PeftModel.from_pretrained(weights, str(run_dir / "model")).merge_and_unload(), base


@torch.no_grad()
def compare_logits(trained, merged, batch: dict[str, torch.Tensor]) -> dict:
    """Largest |logit| difference and top-1 token agreement over the non-padding positions of `batch`."""
    mask = batch["attention_mask"].bool()
    logits = []
    for model in (trained, merged):
        model.eval()
        device = next(model.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        logits.append(model(**inputs).logits.float().cpu()[mask])
    agreement = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()
    return {"max_logit_difference_vs_trained": float((logits[0] - logits[1]).abs().max()),
            "top1_agreement_vs_trained": float(agreement), "parity_tokens": int(mask.sum())}
