"""Multi-GPU figures of tunelab's data-parallel path (issue 13), each beside its 1-GPU counterpart of the same call.

`plan` runs the cases of PLAN one after another (1- and 2-GPU runs interleaved) as `python -m
tunelab.distributed.agent` (torchrun) with 1 or 2 ranks, or as two one-GPU launchers meeting at a c10d rendezvous
on 127.0.0.1 (what a two-node SLURM job runs per node). Each rank runs `rank`: a random-weight Qwen2.5
architecture (tunelab.bench's), tunelab's `attach_method` and `fit` under `distributed.runtime` (`--strategy`:
DeepSpeed ZeRO by default, FSDP2 or DDP for several ranks; the one-process path for one), on learnable tokens
(each row drawn from 64 token ids, so the loss falls far within a few steps and equal curves mean something),
micro-batch `batch` per GPU, accumulation = ranks (every GPU runs the 1-GPU micro-batch).

Writes under --out: `runs.jsonl` (one row per run: tok_s, each step's tok_s, peak, losses, exit codes),
`results.jsonl` (one row per case and GPU count in benchmarks/results.jsonl's schema: median over the repeats,
range, repeats, `gpus`, `nodes`), `summary.json` and the printed verdict against issue 13's targets. tok_s: tokens
of the whole job per optimizer step over the median step period after 3 warm-up steps; peak: fit's maximum over
ranks of max_memory_allocated (from after the engine is set up: loading is not counted).
Run on the 2-GPU machine: `scripts/multigpu-check.sh`; on a CPU, `plan --dry-run` rehearses the plan (tiny model,
DDP on gloo).
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

# one run each: architecture, method, GPUs in all, nodes, ZeRO stage (several GPUs), micro-batch, steps, kernels.
# 7B full: no Liger (its fused loss reads lm_head.weight outside the module's forward, which ZeRO-3 never gathers
# there), the same on the 1-GPU side; LoRA on the fast path (Liger) on both sides. Checkpoint offloading is off on
# both sides (auto turns it on for one process only), so a ratio compares the GPU counts alone.
CASES = {
    "7b-full-1": dict(arch="qwen2.5-7b", method="full", gpus=1, batch=2, steps=8, kernels="none"),
    "7b-full-2": dict(arch="qwen2.5-7b", method="full", gpus=2, zero_stage=3, batch=2, steps=8, kernels="none"),
    "7b-lora-1": dict(arch="qwen2.5-7b", method="lora", gpus=1, batch=4, steps=10, kernels="liger"),
    "7b-lora-2": dict(arch="qwen2.5-7b", method="lora", gpus=2, zero_stage=2, batch=4, steps=10, kernels="liger"),
    "1.5b-lora-1": dict(arch="qwen2.5-1.5b", method="lora", gpus=1, batch=4, steps=10, kernels="liger"),
    "1.5b-lora-2": dict(arch="qwen2.5-1.5b", method="lora", gpus=2, zero_stage=2, batch=4, steps=10, kernels="liger"),
    "1.5b-lora-2node": dict(arch="qwen2.5-1.5b", method="lora", gpus=2, nodes=2, zero_stage=2, batch=4, steps=10,
                            kernels="liger"),
    # not in PLAN (`--only 1.5b-lora-save`): ZeRO-3 (or FSDP) saves a whole adapter that reloads to the same logits
    "1.5b-lora-save": dict(arch="qwen2.5-1.5b", method="lora", gpus=2, zero_stage=3, batch=4, steps=6, kernels="none",
                           save_check=True),
}
# most needed first (a budget cut drops the tail): the ZeRO-3 memory row, 7B LoRA scaling, 1.5B scaling with three
# interleaved repeats, with the two launchers after the first single-launcher 2-GPU run they are compared with
PLAN = ["7b-full-1", "7b-full-2", "7b-lora-1", "7b-lora-2", "7b-lora-2", "7b-lora-1",
        "1.5b-lora-1", "1.5b-lora-2", "1.5b-lora-2node", "1.5b-lora-2", "1.5b-lora-1", "1.5b-lora-1", "1.5b-lora-2"]
LEARNABLE_IDS = 64  # the token ids the rows are drawn from
LEARNING_RATE = {"lora": 1e-3, "full": 1e-5}
# issue 13's targets: (what, 2-GPU case, 1-GPU case, figure, bound, at least)
TARGETS = [("7B LoRA bf16 ZeRO-2, tokens/s 2 GPUs / 1 GPU", "7b-lora-2", "7b-lora-1", "tok_s", 1.85, True),
           ("7B full ZeRO-3, per-GPU peak 2 GPUs / 1 GPU", "7b-full-2", "7b-full-1", "peak_gib", 0.6, False),
           ("1.5B LoRA, tokens/s 2 GPUs / 1 GPU", "1.5b-lora-2", "1.5b-lora-1", "tok_s", 1.8, True)]
LOSS_TOLERANCE = 1e-3  # relative, at every step: two launchers against one (bf16 reductions may reorder)


def rank(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tunelab import bench, kernels, modeling, offload
    from tunelab.config import LoraConfig, TrainConfig
    from tunelab.distributed import runtime
    from tunelab.train import attach_method, fit

    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = ({"strategy": args.strategy, "gpus": world // args.nodes, "nodes": args.nodes}
                   | ({"zero_stage": args.zero_stage} if args.strategy == "deepspeed" else {}) if world > 1 else None)
    train = TrainConfig(method=args.method, precision="bf16", lora=LoraConfig(r=16, alpha=32, dropout=0.0),
                        micro_batch_size=args.batch, gradient_accumulation_steps=world, max_steps=args.steps,
                        learning_rate=LEARNING_RATE[args.method], warmup_steps=0, lr_scheduler="constant_with_warmup",
                        gradient_checkpointing=True, checkpoint_offload="off", kernels=args.kernels,
                        eval_every=args.steps, log_every=args.steps, checkpoint_every=0, profile={"steps": 0},
                        distributed=distributed)
    worker = runtime.from_environment(train)
    torch.manual_seed(0)
    config = Qwen2Config(**bench.ARCHITECTURES[args.arch], rope_theta=1e6, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, attn_implementation="sdpa")
    # full fine-tuning keeps fp32 master weights under bf16 autocast on both sides (train.master_weights: fp32,
    # modeling.weights_dtype); LoRA's frozen base is bf16
    with torch.device(modeling.device()):
        model = AutoModelForCausalLM.from_config(
            config, dtype=modeling.weights_dtype(train, for_training=True))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = attach_method(model, train)
    examples = learnable_examples(args.steps * args.batch * world, args.seq)
    # one stamp per optimizer step: each rank runs one micro-batch a step (accumulation = ranks), and the
    # embedding runs once per forward (gradient checkpointing recomputes the decoder layers only); the last
    # stamp is the final validation pass
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
               "losses": [loss for _, loss in metrics["loss_curve"]], "kernels": kernels.applied(model),
               "checkpointing": offload.applied(model), "gpus": metrics["gpus"], "processes": metrics["processes"]}
        Path(args.row).write_text(json.dumps(row))
    if args.save_check:
        _check_saved_adapter(args, model, worker, config, examples[:2])
    worker.close()


def _check_saved_adapter(args, model, worker, config, examples) -> None:
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
    print("saved adapter check:", check, flush=True)
    row = json.loads(Path(args.row).read_text())
    Path(args.row).write_text(json.dumps({**row, "saved_adapter": check}))


def learnable_examples(count: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Rows of tokens drawn from LEARNABLE_IDS ids only: a random-weight model learns that within a few steps
    (its loss falls from about ln(vocabulary) towards ln(64)), so loss curves that agree are a real check."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LEARNABLE_IDS, (count, seq_len), generator=generator).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def plan(args) -> None:
    from tunelab.config import DistributedConfig
    from tunelab.distributed import launch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    names = args.only or PLAN
    runs = []
    for position, name in enumerate(names):
        case = {"nodes": 1, "zero_stage": 2, **CASES[name]}
        if args.dry_run:  # the CPU rehearsal: tiny architecture, few steps, plain path (no Liger off CUDA)
            case.update(arch="tiny", batch=2, steps=5, kernels="none")
        if time.monotonic() > deadline:
            print(f"budget spent: not run: {names[position:]}", flush=True)
            break
        row_file = out / f"run-{position}.json"
        entry = [str(Path(__file__).resolve()), "rank", "--arch", case["arch"], "--method", case["method"],
                 "--zero-stage", str(case["zero_stage"]), "--batch", str(case["batch"]), "--steps", str(case["steps"]),
                 "--seq", str(args.seq), "--nodes", str(case["nodes"]), "--row", str(row_file),
                 "--strategy", args.strategy, "--kernels", case["kernels"]] + (["--save-check"] if case.get("save_check")
                                                                                 else [])
        started = time.monotonic()
        if case["nodes"] == 1:
            processes = [subprocess.Popen(launch.node_command(DistributedConfig(gpus=case["gpus"]), entry=entry))]
        else:  # one one-GPU launcher per "node": the per-node command lines of a SLURM job, rendezvous on 127.0.0.1
            config = DistributedConfig(gpus=case["gpus"] // case["nodes"], nodes=case["nodes"])
            processes = [subprocess.Popen(launch.node_command(config, port=args.port, rendezvous_id=f"twonode-{position}",
                                                              entry=entry),
                                          env={**os.environ, **({} if args.dry_run else {"CUDA_VISIBLE_DEVICES": str(r)})})
                         for r in range(case["nodes"])]
        codes = [_wait(p, started + args.case_timeout) for p in processes]
        run = {"case": name, "position": position, **case, "exit": codes, "wall_s": time.monotonic() - started}
        if row_file.exists():
            run.update(json.loads(row_file.read_text()))
        runs.append(run)
        with open(out / "runs.jsonl", "a") as handle:
            handle.write(json.dumps(run) + "\n")
        print(f"{name}: exit {codes} tok/s {run.get('tok_s', 0):.0f} peak {run.get('peak_gib', 0):.1f} GiB "
              f"losses {[round(x, 3) for x in run.get('losses', [])[:2]]}..{[round(x, 3) for x in run.get('losses', [])[-1:]]} "
              f"({run['wall_s']:.0f} s)", flush=True)
        summary = summarise(runs, args)  # after every run: a call cut short still returns what it measured
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in summary["rows"]))
    for line in summarise(runs, args)["verdict"]:
        print(line, flush=True)


def _wait(process: subprocess.Popen, deadline: float) -> int:
    """The launcher's exit status; a run past the deadline (a hung collective) is stopped (torchrun ends its
    ranks on SIGTERM) so that the cases after it still run: status 124."""
    try:
        return process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 124


def summarise(runs: list[dict], args) -> dict:
    """Rows in benchmarks/results.jsonl's schema (median over a case's repeats), the targets' ratios, and the two
    launchers' losses against the single launcher's."""
    ok = [run for run in runs if run.get("tok_s") and not any(run["exit"])]
    by_case: dict[str, list[dict]] = {}
    for run in ok:
        by_case.setdefault(run["case"], []).append(run)
    rows, medians = [], {}
    for name, repeats in by_case.items():
        figures = [run["tok_s"] for run in repeats]
        spread = figures if len(figures) > 1 else repeats[0]["tok_s_steps"]
        first = repeats[0]
        medians[name] = {"tok_s": statistics.median(figures), "peak_gib": max(run["peak_gib"] for run in repeats)}
        rows.append({"side": "tunelab", "call": args.call, "card": args.card, "gpus": first["gpus"],
                     "nodes": first["nodes"], "model": first["arch"], "method": first["method"], "quantization": "none",
                     "batch": first["batch"], "seq": args.seq, "tok_s": medians[name]["tok_s"],
                     "tok_s_range": [min(spread), max(spread)], "repeats": len(repeats),
                     "peak_gib": medians[name]["peak_gib"], "reserved_gib": max(run["reserved_gib"] for run in repeats),
                     "mfu": None, "kernels": first["kernels"], "checkpointing": first["checkpointing"],
                     "strategy": args.strategy if first["processes"] > 1 else "single",
                     "zero_stage": first["zero_stage"] if first["processes"] > 1 and args.strategy == "deepspeed" else None,
                     "precision": ("bf16 autocast, fp32 master weights" if first["method"] == "full"
                                   else "bf16 weights, fp32 LoRA adapters, bf16 autocast"),
                     "steps": first["steps"], "losses": first["losses"], "case": name, "commit": args.commit,
                     "date": time.strftime("%Y-%m-%d")})
    verdict, targets = [], []
    for what, many, one, figure, bound, at_least in TARGETS:
        if many not in medians or one not in medians:
            verdict.append(f"{what}: not measured")
            continue
        ratio = medians[many][figure] / medians[one][figure]
        met = ratio >= bound if at_least else ratio <= bound
        targets.append({"what": what, "ratio": ratio, "target": bound, "met": met,
                        "repeats": [len(by_case[many]), len(by_case[one])]})
        verdict.append(f"{what}: {medians[many][figure]:,.1f} / {medians[one][figure]:,.1f} = {ratio:.3f} "
                       f"(target {'>=' if at_least else '<='} {bound}: {'met' if met else 'NOT met'}; repeats "
                       f"{len(by_case[many])} and {len(by_case[one])})")
    rendezvous = _rendezvous(by_case)
    verdict.append(rendezvous["line"])
    return {"rows": rows, "targets": targets, "rendezvous": rendezvous, "verdict": verdict}


def _rendezvous(by_case: dict[str, list[dict]]) -> dict:
    """Two launchers against the single launcher's 2-GPU runs of the same case: each step's relative loss
    difference, beside the difference between two single-launcher runs (the run-to-run floor)."""
    two, single = by_case.get("1.5b-lora-2node"), by_case.get("1.5b-lora-2")
    if not two or not single:
        return {"line": "two launchers: not measured"}
    reference = single[0]["losses"]

    def worst(other: list[float]) -> float:
        return max(abs(a - b) / abs(a) for a, b in zip(reference, other, strict=True))

    difference = worst(two[0]["losses"])
    floor = max((worst(run["losses"]) for run in single[1:]), default=None)
    fell = (reference[0] - min(reference)) / reference[0]
    equal = difference <= LOSS_TOLERANCE and fell >= 10 * LOSS_TOLERANCE
    return {"max_relative_difference": difference, "single_launcher_floor": floor, "loss_fell_by": fell,
            "equal": equal, "line": f"two launchers vs one, 1.5B LoRA 2 GPUs: losses differ by at most {difference:.2e} "
                                    f"(relative; two single-launcher runs: {floor if floor is None else f'{floor:.2e}'}), "
                                    f"loss fell by {fell:.1%}: {'equal' if equal else 'NOT equal'} within "
                                    f"{LOSS_TOLERANCE:g}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan")
    p.add_argument("--out", required=True)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--budget", type=float, default=480, help="seconds after which no further case starts")
    p.add_argument("--case-timeout", type=float, default=150, help="seconds after which a run is stopped")
    p.add_argument("--call", default="dist-3")
    p.add_argument("--card", default="NVIDIA H200")
    p.add_argument("--commit", default="")
    p.add_argument("--port", type=int, default=29611, help="the two launchers' rendezvous port")
    p.add_argument("--strategy", default="deepspeed", choices=["deepspeed", "fsdp", "ddp"])
    p.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run, in this order (default PLAN)")
    p.add_argument("--dry-run", action="store_true", help="tiny model, 5 steps: rehearse the plan on the CPU")
    r = commands.add_parser("rank")
    for name, kind in (("arch", str), ("method", str), ("zero-stage", int), ("batch", int), ("steps", int),
                       ("seq", int), ("nodes", int), ("row", str), ("strategy", str), ("kernels", str)):
        r.add_argument(f"--{name}", type=kind, required=True)
    r.add_argument("--save-check", action="store_true", help="save the adapter, reload it, compare logits")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    (plan if args.command == "plan" else rank)(args)


if __name__ == "__main__":
    main()
