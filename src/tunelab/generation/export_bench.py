"""Benchmark: greedy generation tokens/s of a study's deployable formats on a GPU, side by side in one process:
the bf16 merged model, its int8 export and its pruned int8 export (tunelab.prune's structured pruning, then
LLM.int8, as the export stage makes them), with each one's size on disk.

Random weights of a real architecture (speed does not depend on the values; pruning ranks channels on random
calibration tokens); `transformers`' `generate` for every side (the engine the export rows are scored with),
exactly `new_tokens` new tokens (min = max), the sides interleaved over `repeats`. Writes `<out>/results.jsonl`
(rows of benchmarks/results.jsonl, `task: export_generation`).

Run: `python -m tunelab.generation.export_bench --arch qwen2.5-1.5b --out DIR` (benchmarks/gpu_exports.sh).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tunelab import modeling
from tunelab.artifacts import write_jsonl
from tunelab.bench import ARCHITECTURES, environment
from tunelab.export import quantize
from tunelab.generation.bench import _timed, random_model

log = logging.getLogger(__name__)


def formats(arch: str, device: torch.device, prune_amount: float) -> dict:
    """{side: model}: bf16, int8, and pruned_int8 (pruned on 4 random calibration sequences)."""
    from tunelab.prune import prune_structured

    models = {"bf16": random_model(arch, device)}
    models["int8"] = quantize(models["bf16"], "int8")  # as the export stage builds it
    pruned = random_model(arch, device)
    generator = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(0, ARCHITECTURES[arch]["vocab_size"], (128,), generator=generator)
                    .tolist(), "labels": [-100] * 128} for _ in range(4)]
    prune_structured(pruned, prune_amount, calibration)
    models["pruned_int8"] = quantize(pruned, "int8")
    del pruned
    return models


def _size_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return modeling.weights_size(Path(folder))


@torch.no_grad()
def run_bench(arch: str, batches: list[int], *, prune_amount: float, new_tokens: int, prompt_len: int, repeats: int,
              call: str, commit: str | None, out: Path) -> list[dict]:
    device = torch.device("cuda")
    env = environment(device)
    models = formats(arch, device, prune_amount)
    sizes = {side: _size_bytes(model) for side, model in models.items()}
    log.info("sizes on disk: %s", ", ".join(f"{side} {size / 1e9:.2f} GB" for side, size in sizes.items()))

    def generate(model):
        return lambda ids, mask: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, do_sample=False,
                                                pad_token_id=0)[:, ids.shape[1]:]

    rows = []
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, ARCHITECTURES[arch]["vocab_size"], (batch, prompt_len), generator=generator).to(device)
        mask = torch.ones_like(ids)
        seconds = {side: [] for side in models}
        lengths = {side: [] for side in models}
        for side, model in models.items():  # warm-up
            _timed(generate(model), ids, mask, device)
        for repeat in range(repeats):
            order = list(models)[repeat % len(models):] + list(models)[:repeat % len(models)]
            for side in order:
                taken, new = _timed(generate(models[side]), ids, mask, device)
                seconds[side].append(taken)
                lengths[side].append(new)
        for side in models:
            speeds = [batch * new_tokens / s for s in seconds[side]]
            rows.append({"task": "export_generation", "side": side, "call": call, "card": env["device_name"],
                         "gpus": 1, "model": arch, "method": "greedy", "quantization": side, "batch": batch,
                         "seq": prompt_len, "new_tokens": new_tokens, "new_tokens_min": min(lengths[side]),
                         "new_tokens_max": max(lengths[side]), "tok_s": round(statistics.median(speeds), 1),
                         "tok_s_range": [round(min(speeds), 1), round(max(speeds), 1)], "repeats": len(speeds),
                         "size_bytes": sizes[side], "prune_amount": prune_amount if side == "pruned_int8" else 0.0,
                         "engine": "generate", "commit": commit, "date": env["date"]})
            log.info("%s batch %d %s: %.0f tok/s (%.0f-%.0f), %.2f GB", arch, batch, side, rows[-1]["tok_s"],
                     min(speeds), max(speeds), sizes[side] / 1e9)
        write_jsonl(out / "results.jsonl", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-1.5b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prune-amount", type=float, default=0.2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--call", default="local")
    parser.add_argument("--commit")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (bitsandbytes' int8 generation is a GPU path)")
    run_bench(args.arch, args.batch, prune_amount=args.prune_amount, new_tokens=args.new_tokens,
              prompt_len=args.prompt_len, repeats=args.repeats, call=args.call, commit=args.commit, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
