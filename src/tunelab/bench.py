"""Benchmark: tunelab's training path against a plain transformers + PEFT + bitsandbytes loop.

For each architecture x method x quantization x attention it trains one random-weight model (real Qwen2.5
shapes) for the same steps at the same shapes (batch x seq_len tokens, no padding; LoRA r=16 on all seven
projections; gradient checkpointing; bf16) twice in this process: through tunelab (`modeling.load_model`,
`train.attach_method`, `train.fit`) and through `_baseline` below, rotating which side goes first, each
from a fresh device state (memory freed, cache emptied, peak stats reset). tokens/s comes from one clock
for both sides (the median period between optimizer steps after 3 warm-up steps; fit's own figure is kept
beside it), and peak allocated memory counts from the start of the loop (weights included, model loading
not). Prints one markdown table and writes `<out>/bench.json`. With `--repeat`, a second table pools each
case's runs; with `--control`, the plain loop also runs a second time per case, and its ratio to the first
(same code) shows how far the host's noise alone moves a ratio.

Run: `python -m tunelab.bench --arch qwen2.5-1.5b qwen2.5-7b --out results/bench` (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import logging
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunelab import budget, kernels, modeling, offload, train
from tunelab.artifacts import atomic_dir, write_json, write_jsonl
from tunelab.batches import real_tokens
from tunelab.config import AdaLoraConfig, LoraConfig, ProfileConfig, TrainConfig

log = logging.getLogger(__name__)
ARCHITECTURES = {  # Qwen2.5's published config.json values; weights are random
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=151936, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),  # the CPU test's
}
SKIPS = {("qwen2.5-7b", "full"): "left out by default (57 GiB with tunelab, 71 GiB with the plain loop on an H100, "
                                 "BENCHMARKS.md); run it with --try-skipped"}
LORA = LoraConfig(r=16, alpha=32, dropout=0.0)  # all seven projections; dropout 0 as issue 12 pins (Unsloth's too)
ADALORA = dict(init_r=16, target_r=8, delta_t=2)  # tinit/tfinal follow the step count, see _train_config
LEARNING_RATE, MAX_GRAD_NORM = 2e-4, 1.0
WARMUP_STEPS = 3  # steps left out of the median step period


@dataclass(frozen=True)
class Case:
    arch: str
    method: str
    quantization: str
    attention: str
    packing: bool = False  # tunelab's side packs; the plain loop always pads
    kernels: str = "auto"  # tunelab's side's train.kernels; the plain loop has none
    offload: str = "auto"  # tunelab's side's train.checkpoint_offload; the plain loop recomputes on the GPU
    checkpoint_layers: int | None = None  # tunelab's side's train.checkpoint_layers (None: all layers)

    @property
    def name(self) -> str:
        return (f"{self.arch} {self.method} {self.quantization} {self.attention}" + (" packed" if self.packing else "")
                + ("" if self.kernels == "auto" else f" kernels={self.kernels}")
                + ("" if self.offload == "auto" else f" offload={self.offload}")
                + ("" if self.checkpoint_layers is None else f" checkpoint_layers={self.checkpoint_layers}"))


def run_bench(cases: list[Case], *, steps: int, batch_size: int, seq_len: int, model_root: Path,
              out: Path | None, sides: tuple[str, ...] = ("tunelab", "baseline"), skips: dict = SKIPS,
              variable_lengths: bool = False, windows: int = 1, call: str = "", peer: Path | None = None,
              commit: str | None = None, budget_cases: list[Case] = (), budget_gib: float = 15.0,
              budget_steps: int = 8, budget_start: int = 16, budget_peer_timeout: int = 200) -> list[dict]:
    """Run every case on both sides (and the peer, with `peer`); then each of `budget_cases` under a `budget_gib`
    memory cap (tunelab and the peer: the largest micro-batch that fits, `run_budget`); print the table; write
    bench.json and results.jsonl (issue 12's rows) into `out` when given."""
    device = modeling.device()
    rows, peers, budgets = [], [], []
    env = dict(environment(device), commit=commit)

    def save() -> None:
        write_json(out / "bench.json", {"environment": env, "settings": dict(
            steps=steps, batch_size=batch_size, seq_len=seq_len, variable_lengths=variable_lengths,
            lora=LORA.model_dump(), adalora=ADALORA, windows=windows,
            learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM), "rows": rows, "pooled": pooled(rows),
            "peers": peers, "budgets": budgets})
        write_jsonl(out / "results.jsonl", records(rows, peers, call=call, env=env, batch_size=batch_size,
                                                   seq_len=seq_len, windows=windows)
                    + budget_records(budgets, call=call, env=env, seq_len=seq_len))
    for index, case in enumerate(cases):
        row = {"case": asdict(case), "name": case.name}
        if (case.arch, case.method) in skips or (case.method == "full" and case.quantization != "none"):
            row["skipped"] = skips.get((case.arch, case.method), "full fine-tuning takes no quantization")
            rows.append(row)
            continue
        path = build_model(case.arch, model_root, device)
        examples = synthetic_examples(ARCHITECTURES[case.arch]["vocab_size"], steps * batch_size, seq_len,
                                      variable=variable_lengths)
        repetition = cases[:index].count(case)  # a repeated case goes first on the other side next time
        shift = (index + repetition) % len(sides)
        order = sides[shift:] + sides[:shift]
        for side in order:
            row[side] = _measure(side, path, case, examples, steps=steps, batch_size=batch_size, device=device)
        row.update(_ratios(row))
        rows.append(row)
        log.info("%s: %s", case.name, _line(row))
        if out:  # after every case, so a run cut short at its time limit still leaves its numbers
            save()
    if peer is not None and not variable_lengths:
        for arch in dict.fromkeys(case.arch for case in cases):
            quantizations = list(dict.fromkeys(c.quantization for c in cases if c.arch == arch and c.method == "lora"))
            peers += run_peer(peer, arch, quantizations, steps=steps, batch_size=batch_size, seq_len=seq_len,
                              model_root=model_root, out=out or Path("."))
            if out:
                save()
    for case in budget_cases:
        search = run_budget(case, budget_gib=budget_gib, steps=budget_steps, seq_len=seq_len, start=budget_start,
                            model_root=model_root, device=device)
        budgets.append(search)
        if out:
            save()
        if peer is not None and case.method == "lora" and case.quantization in ("nf4", "none"):
            search["peer"] = run_peer_budget(peer, case.arch, "qlora" if case.quantization == "nf4" else "lora",
                                             budget_gib=budget_gib, steps=budget_steps, seq_len=seq_len,
                                             start=budget_start, model_root=model_root, out=out or Path("."),
                                             timeout=budget_peer_timeout)
            if out:
                save()
    print(table(rows, env))
    summary = pooled(rows)
    if any(item["runs"] > 1 for item in summary):
        print(pooled_table(summary))
    return rows


def run_budget(case: Case, *, budget_gib: float, steps: int, seq_len: int, start: int, model_root: Path,
               device: torch.device, limit: int = 256) -> dict:
    """The largest micro-batch of `seq_len` tokens that trains `case` through tunelab under a `budget_gib` CUDA
    memory cap (torch.cuda.set_per_process_memory_fraction), with its tokens/s; each probe from a fresh load.
    The peer's side: `run_peer_budget`."""
    path = build_model(case.arch, model_root, device)
    vocab = ARCHITECTURES[case.arch]["vocab_size"]
    result = {"case": asdict(case), "budget_gib": budget_gib, "seq_len": seq_len, "steps": steps}

    def probe(batch: int) -> dict:
        examples = synthetic_examples(vocab, steps * batch, seq_len)
        measured = _measure("tunelab", path, case, examples, steps=steps, batch_size=batch, device=device)
        log.info("budget %s GiB, %s, batch %d: %s", budget_gib, case.name, batch,
                 measured.get("error") or f"{measured['tokens_per_second']:,.0f} tok/s, "
                                          f"{measured['peak_memory_gib']:.2f} GiB")
        return measured

    result["memory_fraction"] = budget.cap_memory(budget_gib)
    try:
        result["tunelab"] = budget.largest_fitting(probe, start, limit)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return result


def run_peer_budget(peer: Path, arch: str, method: str, *, budget_gib: float, steps: int, seq_len: int, start: int,
                    model_root: Path, out: Path, timeout: int = 200) -> list[dict]:
    """The peer's probes under the same cap, in one child process (`python -m tunelab.budget`: the peer script's own
    `measure` per probe); its log goes to `out`."""
    import json
    import subprocess

    command = [sys.executable, "-m", "tunelab.budget", "--peer", str(peer), "--arch", arch, "--method", method,
               "--model-root", str(model_root), "--steps", str(steps), "--seq-len", str(seq_len),
               "--budget-gib", str(budget_gib), "--start", str(start)]
    log.info("peer budget: %s", " ".join(command))
    try:
        output = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout).stdout
    except subprocess.TimeoutExpired as err:  # keep the probes that finished
        output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    (out / f"peer-budget-{arch}-{method}.log").write_text(output)
    probes = [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]
    return [dict(p, fits="error" not in p) for p in probes]


def build_model(arch: str, root: Path, device: torch.device) -> Path:
    """Save a random-weight bf16 model of `arch` under `root` once; quantized loading reads it from there."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = Path(root) / arch
    if (path / "config.json").exists():
        return path
    config = Qwen2Config(**ARCHITECTURES[arch], rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
    del model
    _fresh(device)
    return path


def synthetic_examples(vocab_size: int, count: int, seq_len: int, seed: int = 0, variable: bool = False) -> list[dict]:
    """`count` examples of random tokens, every one labelled: each exactly `seq_len` long (no padding), or with
    `variable`, of log-normal lengths shaped like Alpaca's (median 170 tokens, clipped to 32..seq_len)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (count, seq_len), generator=generator).tolist()
    if variable:
        lengths = torch.empty(count).log_normal_(math.log(170), 0.6, generator=generator).clamp(32, seq_len).long()
        ids = [row[:length] for row, length in zip(ids, lengths.tolist())]
    return [{"input_ids": row, "labels": row} for row in ids]


def _measure(side: str, path: Path, case: Case, examples: list[dict], *, steps: int, batch_size: int,
             device: torch.device) -> dict:
    """One side of one case from a fresh device state. tokens/s comes from one clock for both sides: the
    median period between optimizer steps after the warm-up steps (a global optimizer post-step hook)."""
    _fresh(device)
    start_allocated = torch.cuda.memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else 0.0
    stamps = []
    hook = register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        runner = _tunelab if side == "tunelab" else _baseline  # "control" is the plain loop run once more
        result = runner(path, case, examples, steps=steps, batch_size=batch_size, device=device)
    except Exception as err:  # one failing case (say, out of memory) must not lose the rest of the matrix
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    finally:
        hook.remove()
    _fresh(device)
    warmup = min(WARMUP_STEPS, steps - 1)
    periods = [after - before for before, after in zip(stamps[warmup - 1:], stamps[warmup:])]
    if "fit_started" in result:
        result["first_step_seconds"] = stamps[0] - result.pop("fit_started") if stamps else None
    if "error" not in result and periods:
        result["step_seconds"] = periods
        if len({len(e["input_ids"]) for e in examples}) == 1:
            result["tokens_per_step"] = batch_size * len(examples[0]["input_ids"])
            result["tokens_per_second"] = result["tokens_per_step"] / statistics.median(periods)
        else:  # steps differ in tokens, and the sides order examples differently: each side's own count
            result["tokens_per_second"] = result["fit_tokens_per_second"]
    result["start_allocated_gib"] = start_allocated
    return result


def _train_config(case: Case, steps: int, batch_size: int) -> TrainConfig:
    edge = min(2, (steps - 1) // 2)  # AdaLoRA's tinit/tfinal; a budgeting phase must remain
    return TrainConfig(
        method=case.method, quantization=case.quantization, attention=case.attention, packing=case.packing,
        precision="bf16", kernels=case.kernels, checkpoint_offload=case.offload,
        checkpoint_layers=case.checkpoint_layers, lora=LORA, adalora=AdaLoraConfig(**ADALORA, tinit=edge, tfinal=edge),
        micro_batch_size=batch_size, max_steps=steps, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM,
        warmup_steps=0, lr_scheduler="constant_with_warmup", gradient_checkpointing=True, eval_every=steps,
        log_every=steps, profile=ProfileConfig(steps=0))


def _tunelab(path: Path, case: Case, examples: list[dict], *, steps: int, batch_size: int,
             device: torch.device) -> dict:
    started = time.perf_counter()
    config = _train_config(case, steps, batch_size)
    torch.manual_seed(config.seed)
    model = train.attach_method(modeling.load_model(path, config, for_training=True), config)
    loaded = time.perf_counter()
    metrics = train.fit(model, examples, examples[:batch_size], config, pad_id=0, label=case.name)
    losses = [loss for _, loss in metrics["loss_curve"]]
    return {"fit_tokens_per_second": metrics["tokens_per_second"], "peak_memory_gib": metrics["peak_memory_gib"],
            "peak_reserved_gib": metrics["peak_reserved_gib"], "padding_fraction": metrics["padding_fraction"],
            "losses": losses, "kernels": kernels.applied(model), "checkpointing": offload.applied(model),
            "load_seconds": loaded - started, "fit_started": loaded,
            "finite": all(map(math.isfinite, losses)), "trainable_parameters": metrics["trainable_parameters"]}


def _baseline(path: Path, case: Case, examples: list[dict], *, steps: int, batch_size: int,
              device: torch.device) -> dict:
    """The plain loop: from_pretrained, (prepare_model_for_kbit_training,) get_peft_model, torch AdamW."""
    from peft import AdaLoraConfig as PeftAdaLora, LoraConfig as PeftLora, get_peft_model, \
        prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    load_started = time.perf_counter()
    torch.manual_seed(0)
    kwargs = {}
    if case.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    elif case.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, attn_implementation=case.attention,
                                                 device_map={"": str(device)}, **kwargs)
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    if case.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=checkpointing)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    common = dict(lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=list(LORA.target_modules),
                  task_type="CAUSAL_LM")
    edge = min(2, (steps - 1) // 2)
    if case.method == "lora":
        model = get_peft_model(model, PeftLora(r=LORA.r, **common))
    elif case.method == "adalora":
        model = get_peft_model(model, PeftAdaLora(init_r=ADALORA["init_r"], target_r=ADALORA["target_r"],
                                                  deltaT=ADALORA["delta_t"], tinit=edge, tfinal=edge,
                                                  total_step=steps, **common))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    batches = [_padded(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = time.perf_counter()
    seconds, tokens, losses = 0.0, 0, []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        batch = {k: v.to(device) for k, v in batches[(step - 1) % len(batches)].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        if case.method == "adalora":  # after step, before zero_grad (PEFT AdaLoRA)
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 1:
            seconds += time.perf_counter() - started
            tokens += real_tokens(batch)
        losses.append(loss.detach())
    losses = [float(loss) for loss in losses]
    peak = {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 1024 ** 3,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 1024 ** 3} if device.type == "cuda" else {
        "peak_memory_gib": float("nan"), "peak_reserved_gib": float("nan")}
    return {"fit_tokens_per_second": tokens / max(seconds, 1e-9), **peak, "losses": losses, "kernels": "none",
            "load_seconds": loaded - load_started, "fit_started": loaded,
            "finite": all(map(math.isfinite, losses)), "trainable_parameters": sum(p.numel() for p in params)}


def _padded(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The plain loop's batch: right-padded, with an attention_mask where lengths differ (as transformers'
    DataCollatorForSeq2Seq pads), else input_ids and labels alone."""
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(e["input_ids"]) for e in examples]
    batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=0),
             "labels": pad_sequence([torch.tensor(e["labels"]) for e in examples], batch_first=True,
                                    padding_value=-100)}
    if len({len(row) for row in ids}) > 1:
        batch["attention_mask"] = pad_sequence([torch.ones_like(row) for row in ids], batch_first=True)
    return batch


def _fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _ratios(row: dict) -> dict:
    ours, theirs = row.get("tunelab", {"error": ""}), row.get("baseline", {"error": ""})
    if "error" in ours or "error" in theirs:
        return {}
    ratios = {"speed_ratio": ours["tokens_per_second"] / theirs["tokens_per_second"],
              "memory_ratio": ours["peak_memory_gib"] / theirs["peak_memory_gib"]}
    if "tokens_per_second" in row.get("control", {}):  # the same plain loop against itself: the noise floor
        ratios["control_ratio"] = row["control"]["tokens_per_second"] / theirs["tokens_per_second"]
    return ratios


def _cells(result: dict | None) -> tuple[str, str, str]:
    """tokens/s, peak GiB and final loss of one side, or its error."""
    if result is None:
        return "", "", "-"
    if "error" in result:
        return result["error"], "", "-"
    return (f"{result['tokens_per_second']:,.0f}", f"{result['peak_memory_gib']:.2f}",
            f"{result['losses'][-1]:.3f}" + ("" if result["finite"] else " (not finite)"))


def _line(row: dict) -> str:
    return " | ".join(f"{side} {' tok/s, '.join(_cells(row[side])[:2])} GiB, loss {_cells(row[side])[2]}"
                      for side in ("tunelab", "baseline", "control") if side in row)


def table(rows: list[dict], env: dict) -> str:
    lines = [f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}", "",
             "| config | tunelab tok/s | baseline tok/s | speed ratio | tunelab peak GiB | baseline peak GiB "
             "| memory ratio | fit's own tok/s | final loss (tunelab / baseline) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['name']} | | | | | | | | {row['skipped']} |")
            continue
        ours, theirs = _cells(row.get("tunelab")), _cells(row.get("baseline"))
        speed = f"{row['speed_ratio']:.3f}" if "speed_ratio" in row else ""
        memory = f"{row['memory_ratio']:.3f}" if "memory_ratio" in row else ""
        fit = row.get("tunelab", {}).get("fit_tokens_per_second")
        lines.append(f"| {row['name']} | {ours[0]} | {theirs[0]} | {speed} | {ours[1]} | {theirs[1]} | {memory} "
                     f"| {f'{fit:,.0f}' if fit else ''} | {ours[2]} / {theirs[2]} |")
    return "\n".join(lines)


def pooled(rows: list[dict]) -> list[dict]:
    """Each fixed-length case once: tokens/s from the median of every run's measured step periods, per side,
    and the spread of the runs' own ratios (a repeated case on a host-bound size drifts with the host)."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        if "speed_ratio" in row and "tokens_per_step" in row["tunelab"]:
            by_name.setdefault(row["name"], []).append(row)
    summary = []
    for name, runs in by_name.items():
        speed = {side: _pooled_speed(runs, side) for side in ("tunelab", "baseline")}
        item = {"name": name, "runs": len(runs), **{f"{side}_tokens_per_second": speed[side] for side in speed},
                "speed_ratio": speed["tunelab"] / speed["baseline"],
                "run_ratios": [run["speed_ratio"] for run in runs],
                "memory_ratio": max(run["memory_ratio"] for run in runs)}
        if all("control_ratio" in run for run in runs):
            item.update(control_ratio=_pooled_speed(runs, "control") / speed["baseline"],
                        control_run_ratios=[run["control_ratio"] for run in runs])
        summary.append(item)
    return summary


def _pooled_speed(runs: list[dict], side: str) -> float:
    """tokens/s of one side over several runs of a case: the median of all their measured step periods."""
    return runs[0][side]["tokens_per_step"] / statistics.median(
        [period for run in runs for period in run[side]["step_seconds"]])


def pooled_table(summary: list[dict]) -> str:
    """`pooled`'s summary as a Markdown table."""
    lines = ["", "Pooled over repeats (control: the plain loop run again, against itself):", "",
             "| config | runs | tunelab tok/s | baseline tok/s | speed ratio | run ratios (min-max) | memory ratio "
             "| control ratio | control run ratios (min-max) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for item in summary:
        control = (f"{item['control_ratio']:.3f} | {min(item['control_run_ratios']):.2f}-"
                   f"{max(item['control_run_ratios']):.2f}") if "control_ratio" in item else " | "
        lines.append(f"| {item['name']} | {item['runs']} | {item['tunelab_tokens_per_second']:,.0f} "
                     f"| {item['baseline_tokens_per_second']:,.0f} | {item['speed_ratio']:.3f} "
                     f"| {min(item['run_ratios']):.2f}-{max(item['run_ratios']):.2f} | {item['memory_ratio']:.3f} "
                     f"| {control} |")
    return "\n".join(lines)


PEAK_FLOPS = 790e12  # bf16 dense matrix rate measured on the H200 (issue 12)
SIDE_NAMES = {"tunelab": "tunelab", "baseline": "plain", "control": "plain"}
CHECKPOINTING = {"tunelab": "recompute", "baseline": "recompute", "control": "recompute"}


def flops_per_token(arch: str, method: str, seq_len: int) -> float:
    """Matmul FLOPs of one trained token: 4N for a frozen base (forward and input gradients), 6N for full
    fine-tuning (weight gradients too), N the matmul weights (head included), plus causal attention
    (QK^T and AV: 2·h·seq per layer forward on average, twice that backward). Recomputation is not counted."""
    a = ARCHITECTURES[arch]
    h, layers = a["hidden_size"], a["num_hidden_layers"]
    kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
    weights = layers * (2 * h * h + 2 * h * kv + 3 * h * a["intermediate_size"]) + h * a["vocab_size"]
    return (6 if method == "full" else 4) * weights + 6 * layers * h * seq_len


def windowed(tokens_per_step: float, periods: list[float], windows: int) -> list[float]:
    """tokens/s of each of `windows` consecutive timed windows (median step period of each)."""
    size = max(len(periods) // windows, 1)
    chunks = [periods[i * size:(i + 1) * size] for i in range(windows) if periods[i * size:(i + 1) * size]]
    return [tokens_per_step / statistics.median(chunk) for chunk in chunks]


def records(rows: list[dict], peers: list[dict], *, call: str, env: dict, batch_size: int, seq_len: int,
            windows: int) -> list[dict]:
    """benchmarks/results.jsonl's rows (issue 12's "Honest figures"): one per measured config and side, pooled
    over --repeat runs (tok_s from the median of all their step periods; the range over every run's windows)."""
    by_key: dict[tuple, list[tuple[Case, dict]]] = {}
    for row in rows:
        case = Case(**row["case"])
        for side in ("tunelab", "baseline", "control"):
            result = row.get(side)
            if result and "step_seconds" in result and "tokens_per_step" in result:
                by_key.setdefault((case, side), []).append(result)
    common = dict(call=call, card=env["device_name"], gpus=1, batch=batch_size, seq=seq_len,
                  commit=env.get("commit"), date=env["date"])
    out = []
    for (case, side), results in by_key.items():
        tokens = results[0]["tokens_per_step"]
        periods = [p for r in results for p in r["step_seconds"]]
        ranges = [v for r in results for v in windowed(tokens, r["step_seconds"], windows)]
        out.append(_record(common, side=SIDE_NAMES[side], case=case, tok_s=tokens / statistics.median(periods),
                           ranges=ranges, peak=max(r["peak_memory_gib"] for r in results),
                           reserved=max(r["peak_reserved_gib"] for r in results),
                           kernels=results[0].get("kernels", "none"),
                           checkpointing=results[0].get("checkpointing", CHECKPOINTING[side]),
                           one_time={"load_s": _median(r.get("load_seconds") for r in results),
                                     "first_step_s": _median(r.get("first_step_seconds") for r in results)},
                           extra={"role": "control"} if side == "control" else {}))
    for peer in peers:
        if "error" in peer:
            continue
        case = Case(peer["arch"], "lora", "nf4" if peer["method"] == "qlora" else "none", "sdpa")
        out.append(_record(dict(common, batch=peer["batch_size"]), side="unsloth", case=case,
                           tok_s=peer["tokens_per_second"],
                           ranges=windowed(peer["tokens_per_step"], peer["step_seconds"], windows),
                           peak=peer["peak_memory_gib"], reserved=peer["peak_reserved_gib"], kernels="unsloth",
                           checkpointing=peer["settings"]["gradient_checkpointing"] + " (offloaded)"
                           if peer["settings"]["gradient_checkpointing"] == "unsloth" else "recompute",
                           one_time={"import_s": peer.get("import_seconds"), "load_s": peer.get("load_seconds"),
                                     "first_step_s": (peer.get("first_steps_seconds") or [None])[0]},
                           extra={"peer_versions": {k: peer["versions"].get(k) for k in ("unsloth", "unsloth_zoo")}}))
    return out


def budget_records(budgets: list[dict], *, call: str, env: dict, seq_len: int) -> list[dict]:
    """results.jsonl's rows of the memory-budget search: per side, the largest micro-batch that fitted, its
    tokens/s (median step; the range over the timed steps, each its own repeat) and every probe tried."""
    out = []
    common = dict(call=call, card=env["device_name"], gpus=1, seq=seq_len, commit=env.get("commit"), date=env["date"])
    for search in budgets:
        case = Case(**search["case"])
        for side in ("tunelab", "peer"):
            probes = search.get(side) or []
            fitted = [p for p in probes if p["fits"] and p.get("step_seconds")]
            if not fitted:
                continue
            best = max(fitted, key=lambda p: p["batch"])
            tokens = best["tokens_per_step"]
            peer = side == "peer"
            one_time = ({"import_s": best.get("import_seconds"), "load_s": best.get("load_seconds"),
                         "first_step_s": (best.get("first_steps_seconds") or [None])[0]} if peer else
                        {"load_s": best.get("load_seconds"), "first_step_s": best.get("first_step_seconds")})
            checkpointing = (best["settings"]["gradient_checkpointing"] + " (offloaded)"
                             if peer and best["settings"]["gradient_checkpointing"] == "unsloth" else
                             "recompute" if peer else best.get("checkpointing", "recompute"))
            tried = [{"batch": p["batch"], "fits": p["fits"], "error": p.get("error"),
                      "tok_s": round(p["tokens_per_second"], 1) if "tokens_per_second" in p else None,
                      "peak_gib": round(p["peak_memory_gib"], 3) if "peak_memory_gib" in p else None,
                      "reserved_gib": round(p["peak_reserved_gib"], 3) if "peak_reserved_gib" in p else None}
                     for p in probes]
            out.append(_record(dict(common, batch=best["batch"]), side="unsloth" if peer else "tunelab", case=case,
                               tok_s=tokens / statistics.median(best["step_seconds"]),
                               ranges=[tokens / period for period in best["step_seconds"]],
                               peak=best["peak_memory_gib"], reserved=best["peak_reserved_gib"],
                               kernels="unsloth" if peer else best.get("kernels", "none"), checkpointing=checkpointing,
                               one_time={k: None if v is None else round(v, 2) for k, v in one_time.items()},
                               extra={"memory_budget_gib": search["budget_gib"],
                                      "memory_fraction": round(search["memory_fraction"], 5), "probes": tried}))
    return out


def _record(common: dict, *, side: str, case: Case, tok_s: float, ranges: list[float], peak: float,
            reserved: float, kernels: str, checkpointing: str, one_time: dict, extra: dict) -> dict:
    flops = flops_per_token(case.arch, case.method, common["seq"])
    return {"side": side, **common, "model": case.arch, "method": case.method, "quantization": case.quantization,
            "attention": case.attention, "tok_s": round(tok_s, 1),
            "tok_s_range": [round(min(ranges), 1), round(max(ranges), 1)],
            "peak_gib": round(peak, 3), "reserved_gib": round(reserved, 3),
            "mfu": round(tok_s * flops / PEAK_FLOPS, 4), "repeats": len(ranges), "kernels": kernels,
            "checkpointing": checkpointing, "one_time": one_time, **extra}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def run_peer(peer: Path, arch: str, quantizations: list[str], *, steps: int, batch_size: int, seq_len: int,
             model_root: Path, out: Path) -> list[dict]:
    """The peer script (Unsloth, ../shared/peers) on the same model, shapes and steps, in its own processes;
    its JSON lines, each tagged with `arch`."""
    import json
    import subprocess

    configs = [f"{'qlora' if q == 'nf4' else 'lora'}:{batch_size}" for q in quantizations if q in ("nf4", "none")]
    lines = out / f"peer-{arch}.jsonl"
    lines.unlink(missing_ok=True)
    command = [sys.executable, str(peer), "--arch", arch, "--configs", *configs, "--model-root", str(model_root),
               "--steps", str(steps), "--seq-len", str(seq_len), "--child-timeout", "400", "--out", str(lines)]
    log.info("peer: %s", " ".join(command))
    subprocess.run(command, check=False)
    results = [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
    return [dict(result, arch=arch) for result in results]


def environment(device: torch.device) -> dict:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    return {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "torch": torch.__version__,
            **{p: version(p) for p in ("transformers", "peft", "bitsandbytes", "accelerate")},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHITECTURES), default=["qwen2.5-1.5b"])
    parser.add_argument("--method", nargs="+", choices=["lora", "adalora", "full"], default=["lora", "adalora", "full"])
    parser.add_argument("--quantization", nargs="+", choices=["none", "nf4", "int8"], default=["none", "nf4", "int8"])
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "eager", "flash_attention_2"], default=["sdpa"])
    parser.add_argument("--steps", type=int, default=13, help="optimizer steps per side; the first 3 are warm-up")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--variable-lengths", action="store_true",
                        help="examples of Alpaca-like lengths (up to --seq-len) instead of all --seq-len long")
    parser.add_argument("--packing", nargs="+", choices=["off", "on"], default=["off"],
                        help="tunelab's side packs each micro-batch into one row (the plain loop pads)")
    parser.add_argument("--model-root", type=Path, default=Path("/tmp/tunelab-bench-models"),
                        help="where the random-weight models are saved once")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole matrix this many times, alternating")
    parser.add_argument("--sides", nargs="+", choices=["tunelab", "baseline"], default=["tunelab", "baseline"])
    parser.add_argument("--control", action="store_true",
                        help="also run the plain loop a second time per case: its ratio to the first is the "
                             "noise floor")
    parser.add_argument("--try-skipped", action="store_true", help="run the cases SKIPS leaves out (7B full)")
    parser.add_argument("--kernels", nargs="+", choices=["auto", "liger", "none"], default=["auto"],
                        help="tunelab's train.kernels (one case each)")
    parser.add_argument("--windows", type=int, default=1,
                        help="split each side's timed steps into this many windows: results.jsonl's repeats and range")
    parser.add_argument("--peer", type=Path, help="peer script (../shared/peers/peer_unsloth.py) to run on the same "
                                                  "model and shapes after tunelab's cases: side unsloth rows")
    parser.add_argument("--call", default=time.strftime("%Y%m%dT%H%M", time.gmtime()),
                        help="id of this GPU-machine run in results.jsonl")
    parser.add_argument("--commit", default=None, help="tunelab commit measured (results.jsonl)")
    parser.add_argument("--checkpoint-offload", nargs="+", choices=["auto", "on", "off"], default=["auto"],
                        help="tunelab's train.checkpoint_offload (one case each)")
    parser.add_argument("--checkpoint-layers", nargs="+", default=["all"],
                        help="tunelab's train.checkpoint_layers: how many decoder layers checkpoint (all, or a number)")
    parser.add_argument("--memory-budget-gib", type=float,
                        help="after the cases, search the largest micro-batch of --seq-len tokens that trains LoRA "
                             "with each --budget-quantization under this CUDA memory cap, tunelab (first --kernels "
                             "and --checkpoint-offload) and the --peer alike")
    parser.add_argument("--budget-quantization", nargs="+", choices=["none", "nf4"], default=["nf4"])
    parser.add_argument("--budget-steps", type=int, default=8, help="steps per probed batch size; the first 3 warm up")
    parser.add_argument("--budget-start", type=int, default=16, help="first batch size probed (then doubled)")
    parser.add_argument("--budget-peer-timeout", type=int, default=200,
                        help="seconds for the peer's budget search (the probes finished by then are kept)")
    parser.add_argument("--memory-fraction", type=float,
                        help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction), "
                             "e.g. 15/141 for a 16 GB card")
    parser.add_argument("--out", type=Path, help="directory for bench.json and results.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 matmul call, both sides alike
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if args.memory_fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    cases = [Case(a, m, q, t, k == "on", kernels, offloaded, None if layers == "all" else int(layers))
             for a in args.arch for m in args.method for q in args.quantization for t in args.attention
             for k in args.packing for kernels in args.kernels for offloaded in args.checkpoint_offload
             for layers in args.checkpoint_layers
             if not (m == "full" and q != "none")] * args.repeat
    budget_cases = [Case(a, "lora", q, args.attention[0], kernels=args.kernels[0], offload=args.checkpoint_offload[0])
                    for a in args.arch for q in args.budget_quantization] if args.memory_budget_gib else []
    run_bench(cases, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, model_root=args.model_root,
              out=args.out, sides=tuple(args.sides) + (("control",) if args.control else ()),
              skips={} if args.try_skipped else SKIPS, variable_lengths=args.variable_lengths, windows=args.windows,
              call=args.call, peer=args.peer, commit=args.commit, budget_cases=budget_cases,
              budget_gib=args.memory_budget_gib or 0.0, budget_steps=args.budget_steps, budget_start=args.budget_start,
              budget_peer_timeout=args.budget_peer_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
