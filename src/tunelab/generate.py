"""Stage `generate`: a run's (or the untrained base's) loss and answers on the held-out test split.

Loads the model as it trained (an adapter on its base in the same quantization, full weights, or the
base alone for the reference row); writes `generations.jsonl` (prompt, reference, prediction, latency per
record) and `eval.json` (test loss over label tokens, latency, generated tokens/s).
Run: `tunelab generate --config config.yaml --run <run> --data ... --tokens ... --out results/runs/<run>`.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig as HFGenerationConfig

from tunelab import modeling
from tunelab.artifacts import invalidate, read_json, read_jsonl, write_json, write_jsonl
from tunelab.batches import mean_loss
from tunelab.config import GenerationConfig, TrainConfig
from tunelab.tokenize import prompt

log = logging.getLogger(__name__)


def load_for_inference(model_dir: Path | None, base_dir: Path | None = None):
    """A model ready to generate, its tokenizer and the settings it runs with.

    `model_dir` is a run's trained model (loaded as it trained: an adapter on its base in the same
    quantization), or any merged or exported model directory (bitsandbytes settings, if any, are in its
    config.json); None means the base of `base_dir` alone.
    """
    from peft import PeftModel

    plain = TrainConfig(method="full", precision="bf16" if modeling.device().type == "cuda" else "fp32")
    if model_dir is None:
        path = modeling.base_path(base_dir)
        return modeling.load_model(path, plain, for_training=False), modeling.load_tokenizer(path), plain
    tokenizer = modeling.load_tokenizer(model_dir)
    if not (model_dir / "adapter_config.json").is_file():
        return modeling.load_model(model_dir, plain, for_training=False), tokenizer, plain
    metrics = read_json(model_dir.parent / "train_metrics.json")
    train = TrainConfig.model_validate(metrics["config"])
    base = modeling.load_model(metrics["base"], train, for_training=False)
    return PeftModel.from_pretrained(base, str(model_dir)), tokenizer, train


def run_generate(model_dir: Path | None, base_dir: Path, data_dir: Path, tokens_dir: Path,
                 settings: GenerationConfig, out: Path) -> dict:
    """Score test loss and generate an answer for every test record; write both into `out`."""
    model, tokenizer, train = load_for_inference(model_dir, base_dir)
    model.eval()
    autocast = modeling.autocast(train, next(model.parameters()).device)
    test_loss = mean_loss(model, read_jsonl(tokens_dir / "test.jsonl"), settings.batch_size,
                          tokenizer.pad_token_id, autocast)
    records = read_jsonl(data_dir / "test.jsonl")
    generations, seconds = _generate(model, tokenizer, records, settings, autocast)
    invalidate(out / "eval.json")
    write_jsonl(out / "generations.jsonl", generations)
    latencies = [g["latency_seconds"] for g in generations]
    new_tokens = sum(g["new_tokens"] for g in generations)
    summary = {"test_loss": test_loss, "samples": len(generations),
               "latency_seconds_mean": statistics.fmean(latencies),
               "latency_seconds_p50": statistics.median(latencies),
               "generated_tokens": new_tokens,
               "generation_seconds": seconds, "generated_tokens_per_second": new_tokens / max(seconds, 1e-9),
               "empty_predictions": sum(not g["prediction"].strip() for g in generations)}
    write_json(out / "eval.json", summary)
    log.info("test loss %.4f, %d samples, %.3f s mean latency, %d empty", test_loss, len(generations),
             summary["latency_seconds_mean"], summary["empty_predictions"])
    return summary


def generate_answers(model_dir: Path, instructions: list[str], settings: GenerationConfig) -> list[str]:
    """Answers of any trained, merged or exported model to `instructions`, with the training prompt template."""
    model, tokenizer, train = load_for_inference(model_dir)
    model.eval()
    records = [{"instruction": text, "input": "", "output": ""} for text in instructions]
    generations, _ = _generate(model, tokenizer, records, settings,
                               modeling.autocast(train, next(model.parameters()).device))
    return [g["prediction"] for g in generations]


@torch.no_grad()
def _generate(model, tokenizer, records: list[dict], settings: GenerationConfig,
              autocast) -> tuple[list[dict], float]:
    """Greedy (or sampled) answers in length-sorted, left-padded batches, back in record order,
    and the seconds spent generating them."""
    tokenizer.padding_side = "left"
    prompts = [prompt(r) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    config = HFGenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                temperature=settings.temperature if settings.do_sample else None,
                                top_p=settings.top_p if settings.do_sample else None,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    results: dict[int, dict] = {}
    total_seconds = 0.0
    for start in tqdm(range(0, len(order), settings.batch_size), desc="generate", disable=None):
        indices = order[start:start + settings.batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        began = time.perf_counter()
        with autocast():
            output = model.generate(**batch, generation_config=config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        total_seconds += seconds
        new = output[:, batch["input_ids"].shape[1]:]
        for row, index in enumerate(indices):
            tokens = new[row]
            length = int((tokens != tokenizer.pad_token_id).sum())
            results[index] = {"index": index, "prompt": prompts[index], "reference": records[index]["output"],
                              "prediction": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                              "new_tokens": length, "latency_seconds": seconds / len(indices)}
            if "category" in records[index]:  # the task family, for per-family scores
                results[index]["category"] = records[index]["category"]
    return [results[i] for i in range(len(records))], total_seconds
