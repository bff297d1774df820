"""Multi-GPU figures of tunelab's data-parallel path (issue 13), 1-GPU counterparts in the same call.

`plan` runs each case as `python -m tunelab.distributed.agent` (torchrun) with 1 or 2 ranks, one after another,
and appends one row per run to `<out>/results.jsonl` (issue 12's schema plus `nodes`, `strategy`, `zero_stage`,
`losses`). Each rank runs `rank`: a random-weight Qwen2.5 architecture (tunelab.bench's), tunelab's
`attach_method` and `fit` under `distributed.runtime` (`--strategy`: DeepSpeed ZeRO, FSDP2 or DDP for 2 ranks, the
single path for 1), on
random tokens (seq tokens per example, micro-batch `batch` per GPU, accumulation = ranks, so every GPU runs the
1-GPU micro-batch). tok_s: tokens of the whole job per optimizer step over the median step period after 3
warm-up steps; peak: fit's maximum over ranks of max_memory_allocated.
Run on the 2-GPU machine: `python scripts/multigpu_bench.py plan --out $OUT` (scripts/multigpu-check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [  # (label, arch, method, gpus in all, zero_stage, batch, steps, nodes)
    ("1.5b-lora", "qwen2.5-1.5b", "lora", 1, 2, 4, 10, 1),
    ("1.5b-lora", "qwen2.5-1.5b", "lora", 2, 2, 4, 10, 1),
    ("7b-lora", "qwen2.5-7b", "lora", 1, 2, 4, 10, 1),
    ("7b-lora", "qwen2.5-7b", "lora", 2, 2, 4, 10, 1),
    ("1.5b-lora", "qwen2.5-1.5b", "lora", 2, 2, 4, 10, 1),
    ("1.5b-lora", "qwen2.5-1.5b", "lora", 1, 2, 4, 10, 1),
    ("7b-full", "qwen2.5-7b", "full", 1, 3, 2, 8, 1),
    ("7b-full", "qwen2.5-7b", "full", 2, 3, 2, 8, 1),
    ("1.5b-lora-2node", "qwen2.5-1.5b", "lora", 2, 2, 4, 10, 2),
    ("1.5b-lora", "qwen2.5-1.5b", "lora", 1, 2, 4, 10, 1),
    ("1.5b-lora", "qwen2.5-1.5b", "lora", 2, 2, 4, 10, 1),
    ("1.5b-lora-zero3-save", "qwen2.5-1.5b", "lora", 2, 3, 4, 6, 1),
]


def rank(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tunelab import bench, modeling
    from tunelab.config import LoraConfig, TrainConfig
    from tunelab.distributed import runtime
    from tunelab.train import attach_method, fit

    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = ({"strategy": args.strategy, "gpus": world // args.nodes, "nodes": args.nodes}
                   | ({"zero_stage": args.zero_stage} if args.strategy == "deepspeed" else {}) if world > 1 else None)
    train = TrainConfig(method=args.method, precision="bf16", lora=LoraConfig(r=16, alpha=32, dropout=0.0),
                        micro_batch_size=args.batch, gradient_accumulation_steps=world, max_steps=args.steps,
                        learning_rate=2e-4, warmup_steps=0, lr_scheduler="constant_with_warmup",
                        gradient_checkpointing=True, eval_every=args.steps, log_every=args.steps,
                        checkpoint_every=0, profile={"steps": 0}, distributed=distributed)
    worker = runtime.from_environment(train)
    torch.manual_seed(0)
    config = Qwen2Config(**bench.ARCHITECTURES[args.arch], rope_theta=1e6, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, attn_implementation="sdpa")
    # full fine-tuning keeps fp32 master weights under bf16 autocast on both sides (the precision policy of helper
    # train's master_weights: fp32); ZeRO-3 then partitions those fp32 weights without another copy
    with torch.device(modeling.device()):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if args.method == "full" else torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = attach_method(model, train)
    examples = bench.synthetic_examples(config.vocab_size, args.steps * args.batch * world, args.seq)
    # one stamp per optimizer step: each rank runs one micro-batch a step (accumulation = ranks), and the
    # embedding runs once per forward (gradient checkpointing recomputes the decoder layers only); the last
    # stamp is the final validation pass. (ZeRO-3 steps its optimizer once per parameter sub-group.)
    stamps = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    metrics = fit(model, examples, examples[:args.batch], train, pad_id=0, runtime=worker)
    hook.remove()
    periods = [b - a for a, b in zip(stamps[3:-1], stamps[4:])]  # steps 4.. (warm-up 3; the last ends at validation)
    if worker.is_main:
        tokens_per_step = args.batch * args.seq * world
        row = {"tok_s": tokens_per_step / statistics.median(periods),
               "tok_s_steps": [tokens_per_step / p for p in periods], "fit_tok_s": metrics["tokens_per_second"],
               "peak_gib": metrics["peak_memory_gib"], "reserved_gib": metrics["peak_reserved_gib"],
               "losses": [loss for _, loss in metrics["loss_curve"]]}
        Path(args.row).write_text(json.dumps(row))
    if args.save_check:
        _check_saved_adapter(args, model, worker, config, examples[:2], train)
    worker.close()


def _check_saved_adapter(args, model, worker, config, examples, train) -> None:
    """ZeRO-3 or FSDP: the adapter rank 0 saves inside `runtime.gathered` is whole: full-size, non-zero tensors, and a
    fresh base with it loaded gives the logits of the trained model in memory."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunelab import modeling
    from tunelab.batches import collate

    device = modeling.device()
    batch = {k: v.to(device) for k, v in collate(examples, 0).items()}
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # every rank: ZeRO-3 gathers per layer
        in_memory = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    saved = Path(args.row).with_suffix(".adapter")
    with worker.gathered(model) as whole:
        if worker.is_main:
            model.save_pretrained(saved, state_dict=whole)
    worker.barrier()
    if not worker.is_main:
        return
    tensors = load_file(saved / "adapter_model.safetensors")
    torch.manual_seed(0)  # the base as every rank built it
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(base, saved).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shapes_ok = all(t.numel() > 0 and min(t.shape) >= 1 and 16 in t.shape for t in tensors.values())
    check = {"adapter_tensors": len(tensors), "full_size": shapes_ok,
             "nonzero_lora_B": sum(bool(t.any()) for n, t in tensors.items() if "lora_B" in n),
             "lora_B": sum(1 for n in tensors if "lora_B" in n),
             "max_abs_logit_diff": float((logits - in_memory).abs().max()),
             "logits_equal": bool(torch.allclose(logits, in_memory, atol=1e-2, rtol=0))}
    print("ZeRO-3 adapter check:", check, flush=True)
    row = json.loads(Path(args.row).read_text())
    Path(args.row).write_text(json.dumps({**row, "zero3_adapter": check}))


def plan(args) -> None:
    from tunelab.config import DistributedConfig
    from tunelab.distributed import launch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    order = args.only if args.only else range(len(CASES))
    for position, index in enumerate(order):
        label, arch, method, gpus, zero, batch, steps, nodes = CASES[index]
        if time.monotonic() > deadline:
            print(f"budget spent: not run: {[CASES[i] for i in order[position:]]}", flush=True)
            break
        row_file = out / f"row-{index}.json"
        entry = [str(Path(__file__).resolve()), "rank", "--arch", arch, "--method", method, "--zero-stage", str(zero),
                 "--batch", str(batch), "--steps", str(steps), "--seq", str(args.seq), "--nodes", str(nodes),
                 "--row", str(row_file), "--strategy", args.strategy] + (["--save-check"] if "save" in label else [])
        if args.dry_run:  # the CPU rehearsal: the tiny architecture, DDP on gloo (no DeepSpeed on the CPU)
            entry[3], entry[9], entry[11] = "tiny", "2", "4"
            entry[entry.index("--seq") + 1] = "32"
        started = time.monotonic()
        if nodes == 1:
            command = launch.node_command(DistributedConfig(gpus=gpus), entry=entry)
            processes = [subprocess.Popen(command)]
        else:  # two "nodes" of one GPU each: the per-node command lines of a SLURM job, rendezvous on 127.0.0.1
            config = DistributedConfig(gpus=1, nodes=nodes)
            processes = [subprocess.Popen(launch.node_command(config, port=29611,
                                                              rendezvous_id="twonode", entry=entry),
                                          env={**os.environ, "CUDA_VISIBLE_DEVICES": str(r)})
                         for r in range(nodes)]
        codes = [p.wait() for p in processes]
        row = {"side": "tunelab", "call": args.call, "card": "NVIDIA H200", "gpus": gpus,
               "nodes": nodes, "model": arch, "method": method, "quantization": "none", "batch": batch,
               "seq": args.seq, "strategy": args.strategy if gpus > 1 else "single",
               "zero_stage": zero if gpus > 1 else None, "steps": steps, "case": label,
               "exit": codes, "wall_s": time.monotonic() - started, "commit": args.commit,
               "date": time.strftime("%Y-%m-%d")}
        if row_file.exists():
            row.update(json.loads(row_file.read_text()))
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{label} gpus={row['gpus']} nodes={nodes}: exit {codes} tok/s {row.get('tok_s', 0):.0f} "
              f"peak {row.get('peak_gib', 0):.1f} GiB loss {row.get('losses', [None])[:3]} "
              f"({row['wall_s']:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan")
    p.add_argument("--out", required=True)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--budget", type=float, default=330, help="seconds after which no further case starts")
    p.add_argument("--call", default="dist-1")
    p.add_argument("--commit", default="")
    p.add_argument("--strategy", default="deepspeed", choices=["deepspeed", "fsdp", "ddp"])
    p.add_argument("--only", type=int, nargs="*", help="indices of CASES to run, in this order")
    p.add_argument("--dry-run", action="store_true", help="tiny model, 3 steps: check the plan on the CPU")
    r = commands.add_parser("rank")
    for name, kind in (("arch", str), ("method", str), ("zero-stage", int), ("batch", int), ("steps", int),
                       ("seq", int), ("nodes", int), ("row", str), ("strategy", str)):
        r.add_argument(f"--{name}", type=kind, required=True)
    r.add_argument("--save-check", action="store_true", help="ZeRO-3: save the adapter, reload it, compare logits")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    (plan if args.command == "plan" else rank)(args)


if __name__ == "__main__":
    main()
