"""Stage `merge`: turn a trained run into a plain transformers model a user can deploy.

LoRA and AdaLoRA adapters are merged into their base loaded unquantized in bf16 (also for QLoRA runs:
merging into 4-bit weights re-quantizes the sum and loses quality); full fine-tunes are re-saved in bf16.
Records the largest logit difference between the merged model and the model as it trained, on a fixed
batch of test examples, so the cost of merging shows in the report.
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
from tunelab.config import TrainConfig
from tunelab.generate import load_for_inference

log = logging.getLogger(__name__)
EXPORT = TrainConfig(method="full", precision="bf16", attention="eager")
PARITY_EXAMPLES = 8


def run_merge(run_dir: Path, tokens_dir: Path) -> dict:
    """Merge `run_dir/model` into a bf16 model at `run_dir/merged`; write `run_dir/merge.json`."""
    trained, tokenizer, train = load_for_inference(run_dir / "model", None)
    if train.method == "full":
        merged = modeling.load_model(run_dir / "model", EXPORT, for_training=False)
    else:
        from peft import PeftModel

        base = modeling.load_model(read_json(run_dir / "train_metrics.json")["base"], EXPORT, for_training=False)
        merged = PeftModel.from_pretrained(base, str(run_dir / "model")).merge_and_unload()
    batch = collate(read_jsonl(tokens_dir / "test.jsonl")[:PARITY_EXAMPLES], tokenizer.pad_token_id)
    difference = _max_logit_difference(trained, merged, batch)
    invalidate(run_dir / "merge.json")
    with atomic_dir(run_dir / "merged") as out:
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    size = modeling.weights_size(run_dir / "merged")
    report = {"method": train.method, "quantization": train.quantization, "dtype": "bfloat16",
              "max_logit_difference_vs_trained": difference, "size_bytes": size}
    write_json(run_dir / "merge.json", report)
    log.info("merged %s into %s (%.1f MB); max logit difference vs trained model %.4g",
             run_dir / "model", run_dir / "merged", size / 1e6, difference)
    return report


@torch.no_grad()
def _max_logit_difference(trained, merged, batch: dict[str, torch.Tensor]) -> float:
    """Largest |logit| difference over the non-padding positions of `batch`."""
    mask = batch["attention_mask"].bool()
    logits = []
    for model in (trained, merged):
        model.eval()
        device = next(model.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        logits.append(model(**inputs).logits.float().cpu()[mask])
    return float((logits[0] - logits[1]).abs().max())
