"""Stage `generate`: a run's (or the untrained base's) loss and answers on the held-out test split.

Loads the model as it trained (an adapter on its base in the same quantization, full weights, or the
base alone for a reference row: unquantized, or in a QLoRA run's quantization for `base-<model>.<nf4|int8>`)
through `tunelab.generation`, the path `tunelab serve` uses too; writes
`generations.jsonl` (prompt, reference, prediction and any extra field of each test record, e.g. `category`)
and `eval.json` (test loss over label tokens, batched generation tokens/s, per-request latency, and the
effective generation settings and stop tokens).
Run: `tunelab generate --config config.yaml --run <run> --data ... --tokens ... --out results/runs/<run>`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from tunelab.artifacts import invalidate, read_jsonl, write_json, write_jsonl
from tunelab.batches import mean_loss
from tunelab.config import GenerationConfig, TrainConfig
from tunelab.generation import Engine, measure_latency

log = logging.getLogger(__name__)
RECORD_FIELDS = ("instruction", "input", "output")


def run_generate(model_dir: Path | None, base_dir: Path, data_dir: Path, tokens_dir: Path,
                 settings: GenerationConfig, out: Path, prompt_format: str = "alpaca",
                 base_settings: TrainConfig | None = None) -> dict:
    """Score test loss, generate an answer for every test record and time single requests; write into `out`.
    A base row (`model_dir` None) loads its base as `base_settings` say (a quantized base row) or unquantized."""
    engine = Engine.load(model_dir, settings, prompt_format, base_dir, base_settings)
    test_loss = mean_loss(engine.model, read_jsonl(tokens_dir / "test.jsonl"), settings.batch_size,
                          engine.tokenizer.pad_token_id, engine.autocast)
    records = read_jsonl(data_dir / "test.jsonl")
    generations, seconds = answer_records(engine, records)
    latency = measure_latency(engine, [g["prompt"] for g in generations], settings.latency_requests)
    invalidate(out / "eval.json")
    write_jsonl(out / "generations.jsonl", generations)
    new_tokens = sum(g["new_tokens"] for g in generations)
    summary = {"test_loss": test_loss, "samples": len(generations), **latency,
               "generated_tokens": new_tokens, "generation_batch_size": settings.batch_size,
               "generation_seconds": seconds, "generated_tokens_per_second": new_tokens / max(seconds, 1e-9),
               "empty_predictions": sum(not g["prediction"].strip() for g in generations),
               "generation": engine.effective_settings()}
    write_json(out / "eval.json", summary)
    log.info("test loss %.4f, %d samples, %.0f generated tokens/s batched, %d empty", test_loss, len(generations),
             summary["generated_tokens_per_second"], summary["empty_predictions"])
    return summary


def generate_answers(model_dir: Path, instructions: list[str], settings: GenerationConfig,
                     prompt_format: str = "alpaca") -> list[str]:
    """Answers of any trained, merged or exported model to `instructions`, in the study's prompt format."""
    engine = Engine.load(model_dir, settings, prompt_format)
    records = [{"instruction": text, "input": "", "output": ""} for text in instructions]
    return [g["prediction"] for g in answer_records(engine, records)[0]]


def answer_records(engine: Engine, records: list[dict]) -> tuple[list[dict], float]:
    """An answer per record in length-sorted batches of the study's batch size, back in record order,
    and the seconds spent generating them."""
    prompts = [engine.record_prompt(r) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    size = engine.settings.batch_size
    results: dict[int, dict] = {}
    seconds = 0.0
    for start in tqdm(range(0, len(order), size), desc="generate", disable=None):
        indices = order[start:start + size]
        began = time.perf_counter()
        completions = engine.generate([prompts[i] for i in indices])
        seconds += time.perf_counter() - began
        for index, completion in zip(indices, completions):
            extra = {k: v for k, v in records[index].items() if k not in RECORD_FIELDS}
            results[index] = {"index": index, **extra, "prompt": prompts[index], "reference": records[index]["output"],
                              "prediction": completion.text.strip(), "new_tokens": completion.generated_tokens,
                              "finish_reason": completion.finish_reason}
    return [results[i] for i in range(len(records))], seconds
