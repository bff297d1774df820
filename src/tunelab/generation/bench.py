"""Benchmark: evaluation generation through tunelab's static path against transformers' default `generate`.

For each architecture (random weights, real Qwen2.5 shapes, bf16, SDPA) and batch size, greedy generation of
exactly `new_tokens` tokens (min = max, no stop token) after `prompt_len` random prompt tokens, timed per call
(batch x new tokens / wall time, GPU synchronised), by side: `plain` is transformers' `generate` with its
defaults (dynamic cache), `tunelab` is `StaticDecoder` (static cache, compiled decoding step in a CUDA graph),
and `hf-static` (optional) is `generate` with `cache_implementation="static"`, which transformers compiles
itself. Each side is called once to warm up (its compilation, reported as a one-time cost), then `repeats`
times, the sides interleaved. Writes `<out>/results.jsonl` (rows of benchmarks/results.jsonl, `task:
generation`) and `<out>/bench.json`.

Run: `python -m tunelab.generation.bench --arch qwen2.5-1.5b qwen2.5-7b --out DIR` (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from tunelab.artifacts import write_json, write_jsonl
from tunelab.bench import ARCHITECTURES, environment
from tunelab.generation.fast import StaticDecoder

log = logging.getLogger(__name__)
ENGINES = {"plain": "generate (dynamic cache)", "tunelab": "static cache, compiled step (CUDA graph)",
           "hf-static": "generate (static cache, compiled by transformers)"}


def random_model(arch: str, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**ARCHITECTURES[arch], rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def _sides(model, decoder: StaticDecoder, new_tokens: int, names: list[str]) -> dict:
    """Each side as a function of (input_ids, attention_mask) -> new tokens [batch, n]."""
    from transformers import GenerationConfig

    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    plain, static = GenerationConfig(**common), GenerationConfig(**common, cache_implementation="static")
    functions = {
        "plain": lambda ids, mask: model.generate(input_ids=ids, attention_mask=mask, generation_config=plain)[
            :, ids.shape[1]:],
        "tunelab": lambda ids, mask: decoder.generate(ids, mask, new_tokens).tokens,
        "hf-static": lambda ids, mask: model.generate(input_ids=ids, attention_mask=mask, generation_config=static)[
            :, ids.shape[1]:]}
    return {name: functions[name] for name in names}


def _timed(function, ids, mask, device) -> tuple[float, int]:
    """Seconds of one call and the new tokens it gave each row."""
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    tokens = function(ids, mask)
    torch.cuda.synchronize(device)
    return time.perf_counter() - began, int(tokens.shape[1])


@torch.no_grad()
def run_bench(archs: list[str], batches: list[int], *, new_tokens: int, prompt_len: int, repeats: int,
              sides: list[str], call: str, commit: str | None, out: Path) -> list[dict]:
    device = torch.device("cuda")
    env = dict(environment(device), commit=commit)
    rows: list[dict] = []
    for arch in archs:
        model = random_model(arch, device)
        decoder = StaticDecoder(model, compiled=True)
        functions = _sides(model, decoder, new_tokens, sides)
        for batch in batches:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(0, ARCHITECTURES[arch]["vocab_size"], (batch, prompt_len), generator=generator)
            ids, mask = ids.to(device), torch.ones(batch, prompt_len, dtype=torch.long, device=device)
            results = {side: {"seconds": [], "lengths": [], "peak": 0.0, "reserved": 0.0} for side in functions}
            for side, function in functions.items():  # warm-up: compilation and first-call costs
                seconds, _ = _timed(function, ids, mask, device)
                results[side]["first_call_s"] = round(seconds, 2)
                log.info("%s batch %d %s: first call %.1f s", arch, batch, side, seconds)
            for repeat in range(repeats):  # interleaved, the first side rotating
                order = list(functions)[repeat % len(functions):] + list(functions)[:repeat % len(functions)]
                for side in order:
                    torch.cuda.reset_peak_memory_stats(device)
                    seconds, new = _timed(functions[side], ids, mask, device)
                    result = results[side]
                    result["seconds"].append(seconds)
                    result["lengths"].append(new)
                    result["peak"] = max(result["peak"], torch.cuda.max_memory_allocated(device) / 1024 ** 3)
                    result["reserved"] = max(result["reserved"], torch.cuda.max_memory_reserved(device) / 1024 ** 3)
            for side, result in results.items():
                speeds = [batch * new_tokens / s for s in result["seconds"]]
                rows.append({"task": "generation", "side": side, "call": call, "card": env["device_name"], "gpus": 1,
                             "model": arch, "method": "greedy", "quantization": "none", "attention": "sdpa",
                             "batch": batch, "seq": prompt_len, "new_tokens": new_tokens,
                             "new_tokens_min": min(result["lengths"]), "new_tokens_max": max(result["lengths"]),
                             "tok_s": round(statistics.median(speeds), 1),
                             "tok_s_range": [round(min(speeds), 1), round(max(speeds), 1)], "repeats": len(speeds),
                             "peak_gib": round(result["peak"], 3), "reserved_gib": round(result["reserved"], 3),
                             "engine": ENGINES[side], "one_time": {"first_call_s": result["first_call_s"]},
                             "commit": commit, "date": env["date"]})
                log.info("%s batch %d %s: %.0f tok/s (%.0f-%.0f)", arch, batch, side, rows[-1]["tok_s"], min(speeds),
                         max(speeds))
            write_jsonl(out / "results.jsonl", rows)  # after every case: a run cut short keeps its numbers
        del model, decoder, functions
        gc.collect()
        torch.cuda.empty_cache()
    write_json(out / "bench.json", {"environment": env, "rows": rows, "settings": dict(
        new_tokens=new_tokens, prompt_len=prompt_len, repeats=repeats, batches=batches, sides=sides)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.generation.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=[a for a in ARCHITECTURES if a != "tiny"], default=["qwen2.5-1.5b"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", choices=list(ENGINES), default=["plain", "tunelab"])
    parser.add_argument("--call", default=time.strftime("%Y%m%dT%H%M", time.gmtime()),
                        help="id of this GPU-machine run in results.jsonl")
    parser.add_argument("--commit", default=None, help="tunelab commit measured (results.jsonl)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        parser.error("the generation benchmark needs a CUDA GPU")
    run_bench(args.arch, args.batch, new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats,
              sides=args.sides, call=args.call, commit=args.commit, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
