"""Stage `train`: fine-tune one run (LoRA, AdaLoRA or full) and measure what it cost.

Reads the base model (`results/base/<model>`) and its tokenized splits (`results/tokens/<model>`);
writes `results/runs/<run>/model/` (adapter or full weights, plus tokenizer), `train_metrics.json`
(loss curves, tokens/s, peak memory, wall time, parameter counts, resolved config) and `profile/`
(a torch.profiler Chrome trace and key_averages table).
Run: `tunelab train --config config.yaml --run <run> --base ... --tokens ... --out results/runs/<run>`.

The loop reads setup -> steps -> save. One optimizer step takes `gradient_accumulation_steps`
micro-batches; the loss is summed over label tokens and divided by the tokens of the whole step, so
accumulating 4 x 2 gives the update of 1 x 8.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_scheduler, set_seed

from tunelab import kernels, modeling, offload
from tunelab.artifacts import atomic_dir, invalidate, read_jsonl, write_json, write_text
from tunelab.batches import label_tokens, mean_loss, real_tokens, training_batches
from tunelab.checkpoint import Checkpoints, fingerprint
from tunelab.config import Run, TrainConfig
from tunelab.distributed import runtime as distributed
from tunelab.errors import TunelabError
from tunelab.memory import PeakMemory, release_freed_host_memory
from tunelab.tracking import Trackers, provenance

log = logging.getLogger(__name__)
FINAL_FIGURES = ("final_loss", "final_validation_loss", "tokens_per_second", "peak_memory_gib", "wall_seconds")


def run_train(run: Run, base_dir: Path, tokens_dir: Path, out: Path) -> dict:
    """Train `run` from its base and tokens; write the model, metrics and profile into `out`."""
    set_seed(run.train.seed)
    runtime = distributed.from_environment(run.train)  # before loading: it picks this rank's GPU
    path = modeling.base_path(base_dir)
    tokenizer = modeling.load_tokenizer(path)
    model = attach_method(runtime.load_model(path, run.train), run.train)
    train_examples = read_jsonl(tokens_dir / "train.jsonl")
    validation_examples = read_jsonl(tokens_dir / "validation.jsonl")
    checkpoints = Checkpoints(out / "checkpoints", run.train, fingerprint(run.train, path, tokens_dir / "train.jsonl"),
                              runtime=runtime)
    metrics = fit(model, train_examples, validation_examples, run.train, tokenizer.pad_token_id,
                  profile_dir=out / "profile", label=run.name, checkpoints=checkpoints, tracking_dir=out,
                  runtime=runtime)
    save_trained(model, tokenizer, out, runtime)
    if not runtime.is_main:
        runtime.close()
        return metrics
    metrics.update(run=run.name, model=run.model, base=path, config=run.train.model_dump(),
                   kernels=kernels.applied(model), checkpointing=offload.applied(model), **_adalora_budget(model), provenance=provenance())
    metrics.update(wall_seconds=metrics["wall_seconds"] + checkpoints.resumed_wall_seconds,
                   resumed_from_step=checkpoints.resumed_step)
    metrics.update(nodes=run.train.distributed.nodes if run.train.distributed else 1,
                   gpu_hours=metrics["gpus"] * metrics["wall_seconds"] / 3600)
    write_json(out / "train_metrics.json", metrics)
    checkpoints.finish()
    runtime.close()
    return metrics


def save_trained(model, tokenizer, out: Path, runtime: distributed.Single) -> None:
    """Write `out/model`: the adapter, or the whole model, as one process would, whatever the strategy.

    Every rank takes part: under ZeRO-3 and FSDP the weights are gathered whole for rank 0, which writes them in
    their training dtype, so merge and generate read a plain adapter or model directory."""
    with runtime.gathered(model) as whole:
        if runtime.is_main:
            invalidate(out / "train_metrics.json")
            with atomic_dir(out / "model") as model_dir:
                model.save_pretrained(model_dir, state_dict=whole)
                tokenizer.save_pretrained(model_dir)
    runtime.barrier()


def attach_method(model, train: TrainConfig):
    """Wrap `model` for the run's method: a PEFT LoRA/AdaLoRA adapter, or all weights trainable."""
    if train.method == "full":
        return offload.apply(kernels.apply(model, train), train)
    from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if train.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        # That upcasts every bf16/fp16 weight to fp32. A frozen, untied output layer gains nothing (autocast runs its
        # matmul in the compute dtype) and pays twice: its fp32 copy, and autocast's copy kept for backward.
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            output.to(modeling.weights_dtype(train))
    lora = train.lora
    common = dict(lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                  task_type="CAUSAL_LM")
    if train.method == "lora":
        config = LoraConfig(r=lora.r, use_rslora=lora.use_rslora, use_dora=lora.use_dora, **common)
    else:
        ada = train.adalora
        config = AdaLoraConfig(init_r=ada.init_r, target_r=ada.target_r, tinit=ada.tinit, tfinal=ada.tfinal,
                               deltaT=ada.delta_t, total_step=train.max_steps, **common)
    # after prepare_model_for_kbit_training, which sets up checkpointing again
    return offload.apply(kernels.apply(get_peft_model(model, config), train), train)


def fit(model, train_examples: list[dict], validation_examples: list[dict], train: TrainConfig, pad_id: int,
        *, profile_dir: Path | None = None, label: str = "train", checkpoints: Checkpoints | None = None,
        tracking_dir: Path | None = None, runtime: distributed.Single | None = None) -> dict:
    """Run `train.max_steps` optimizer steps on `model` in place; return the run's measurements.

    With `tracking_dir`, the trackers of `train.tracking` log there (tunelab.tracking) from rank 0. With a
    multi-process `runtime` this rank trains on its share of each step (distributed.runtime)."""
    runtime = runtime or distributed.Single()
    device = modeling.model_device(model)
    model = runtime.shard_model(model)  # FSDP: before the optimizer, which must hold the shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, train)
    trained = runtime.wrap(model, optimizer)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.warmup_steps,
                              num_training_steps=train.max_steps)
    scaler = runtime.grad_scaler(device, enabled=train.precision == "fp16")
    autocast = modeling.autocast(train, device)
    batches = training_batches(train_examples, train.micro_batch_size, pad_id, seed=train.seed,
                               group_by_length=train.group_by_length, packing=train.packing)
    # AdaLoRA: PEFT's AdaLoraModel.forward adds its orthogonality penalty to the loss of every micro-batch. With its
    # weight at 0 during training, the forward gives the cross-entropy alone (adapters included); the penalty is
    # added once per step below, and the weight is put back before the adapter is saved.
    adalora = train.method == "adalora"
    penalty_weight = model.peft_config["default"].orth_reg_weight if adalora else 0.0
    if adalora:
        model.peft_config["default"].orth_reg_weight = 0.0
    curves = {"loss": [], "validation_loss": [], "learning_rate": [], "step_tokens_per_second": [],
              "step_peak_memory_gib": [], "step_peak_reserved_gib": []}
    if adalora:
        curves["orthogonality_penalty"] = []
    counted = {"tokens": 0, "padded": 0, "seconds": 0.0}
    memory = PeakMemory(device)
    started = time.perf_counter()
    first = checkpoints.resume(model, optimizer, scheduler, scaler, batches, curves, counted) if checkpoints else 1
    profiler = (_Profiler(profile_dir, train.profile, device, first=first, max_steps=train.max_steps)
                if profile_dir and train.profile.steps and runtime.is_main else None)
    trackers = (Trackers(train.tracking, tracking_dir, label, train.model_dump(), first)
                if tracking_dir and runtime.is_main else None)
    model.train()
    progress = tqdm(range(first, train.max_steps + 1), desc=label, disable=None if runtime.is_main else True)
    for step in progress:
        step_started = time.perf_counter()
        memory.reset()
        if profiler:
            profiler.before(step)
        host_batches = runtime.shard([next(batches) for _ in range(train.gradient_accumulation_steps)])
        # counted before the copy: no device sync (summed over ranks: an all-reduce the GPU waits on, not the host)
        step_tokens = runtime.total(sum(label_tokens(b) for b in host_batches))
        micro_batches = [{k: v.to(device) for k, v in b.items()} for b in host_batches]
        loss = 0.0
        for index, batch in enumerate(micro_batches):
            with runtime.accumulating(trained, more_to_come=index < len(micro_batches) - 1):
                with autocast():
                    micro_loss = trained(**batch, use_cache=False, num_items_in_batch=step_tokens).loss
                runtime.backward(scaler.scale(micro_loss))
            loss += micro_loss.detach()  # read once the optimizer step is queued: the GPU never waits on it
        if penalty_weight:  # AdaLoRA: once per optimizer step, whatever the accumulation (the same on every rank)
            penalty = orthogonality_penalty(model)
            scaler.scale(penalty_weight * penalty).backward()
            curves["orthogonality_penalty"].append([step, float(penalty.detach())])
        runtime.step(optimizer, scaler, params, train.max_grad_norm)
        loss = float(runtime.total(loss))
        # before zero_grad: it reads the step-1 gradients (which ZeRO keeps to itself)
        _check_step(step, loss, params if runtime.local_gradients else [], label)
        if train.method == "adalora":  # after step, before zero_grad: it reads the gradients (PEFT AdaLoRA)
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if profiler:
            profiler.after(step)
        step_real_tokens = sum(real_tokens(b) for b in host_batches)
        if step > 1:  # the first step holds one-off allocation and kernel selection
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds = time.perf_counter() - step_started
            counted["seconds"] += step_seconds
            counted["tokens"] += step_real_tokens
            # every step's speed (all ranks), so the report ranks speed only beyond the run's own spread
            curves["step_tokens_per_second"].append(
                [step, step_real_tokens * runtime.world_size / max(step_seconds, 1e-9)])
        counted["padded"] += sum(b["input_ids"].numel() for b in host_batches) - step_real_tokens
        curves["loss"].append([step, loss])
        curves["learning_rate"].append([step, scheduler.get_last_lr()[0]])
        logged = {"loss": loss, "learning_rate": scheduler.get_last_lr()[0]}
        if step % train.eval_every == 0 or step == train.max_steps:
            validation = mean_loss(model, validation_examples, train.micro_batch_size, pad_id, autocast)
            curves["validation_loss"].append([step, validation])
            logged["validation_loss"] = validation
        if not (profiler and profiler.first <= step <= profiler.last):  # the profiler's own memory is not the run's
            for key, value in memory.read().items():
                curves[f"step_{key}"].append([step, value])
        if trackers:
            if penalty_weight:
                logged["orthogonality_penalty"] = curves["orthogonality_penalty"][-1][1]
            if counted["seconds"]:
                logged["tokens_per_second"] = counted["tokens"] / counted["seconds"]
            trackers.log_step(step, {**logged, "peak_memory_gib": memory.read()["peak_memory_gib"]})
        if (step % train.log_every == 0 or step == train.max_steps) and runtime.is_main:
            progress.set_postfix(loss=f"{loss:.3f}")
            log.info("%s step %d/%d loss %.4f lr %.2e tok/s %.0f peak %.2f GiB", label, step, train.max_steps, loss,
                     scheduler.get_last_lr()[0], counted["tokens"] / max(counted["seconds"], 1e-9),
                     _run_peak(curves, memory)["peak_memory_gib"])
        if checkpoints:
            checkpoints.after_step(step)
    counted["tokens"], counted["padded"] = (int(runtime.total(counted[k])) for k in ("tokens", "padded"))
    all_tokens = counted["tokens"] + counted["padded"]
    extra = {}
    if adalora:
        model.peft_config["default"].orth_reg_weight = penalty_weight
        extra = {"orthogonality_penalty_curve": curves["orthogonality_penalty"], "orthogonality_penalty_weight":
                 penalty_weight, "final_orthogonality_penalty": curves["orthogonality_penalty"][-1][1]}
    if profiler:
        extra["profiled_steps"] = [profiler.first, profiler.last]
    peak = {key: runtime.maximum(value) for key, value in _run_peak(curves, memory).items()}  # the fullest rank
    results = {
        "steps": train.max_steps, "loss_curve": curves["loss"], "validation_loss_curve": curves["validation_loss"],
        "learning_rate_curve": curves["learning_rate"], "final_loss": curves["loss"][-1][1],
        "step_tokens_per_second": curves["step_tokens_per_second"],
        "step_peak_memory_gib": curves["step_peak_memory_gib"], "memory_kind": memory.kind,
        "trainable_weights_dtype": str(params[0].dtype).removeprefix("torch."), **extra,
        "final_validation_loss": curves["validation_loss"][-1][1],
        "tokens_per_second": counted["tokens"] / max(counted["seconds"], 1e-9),
        "padding_fraction": counted["padded"] / max(all_tokens, 1),
        "wall_seconds": time.perf_counter() - started, "device": str(device),
        "trainable_parameters": sum(_numel(p) for p in params),
        "total_parameters": sum(_numel(p) for p in model.parameters()), **peak,
        "gpus": runtime.world_size if device.type == "cuda" else 0, "processes": runtime.world_size}
    if trackers:
        trackers.finish({key: results[key] for key in FINAL_FIGURES})
    return results


def _numel(parameter: torch.Tensor) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 leaves each rank a partition


def orthogonality_penalty(model) -> torch.Tensor:
    """AdaLoRA's regulariser (Zhang et al. 2023, eq. 4): the mean over adapters of ||P^T P - I||_F for each
    right singular-vector matrix A (r x in, rows orthonormal) and left one B (out x r, columns orthonormal)."""
    terms = []
    for name, weight in model.named_parameters():
        if weight.requires_grad and (".lora_A." in name or ".lora_B." in name):
            gram = weight @ weight.T if ".lora_A." in name else weight.T @ weight
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device, dtype=gram.dtype)))
    return torch.stack(terms).mean()


def _check_step(step: int, loss: float, params: list[torch.Tensor], label: str) -> None:
    """Stop a run early whose loss is not finite, or whose first step has no gradient at all."""
    if not math.isfinite(loss):
        raise TunelabError(f"run {label}: loss is {loss} at step {step} (lower learning_rate, or use bf16/fp32)")
    if step == 1 and params and all(p.grad is None or not p.grad.any() for p in params):
        raise TunelabError(f"run {label}: every trainable gradient is zero at step 1 "
                           "(no label tokens, or the trainable weights are detached from the loss)")


def _optimizer(params: list[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adamw_torch":
        # fused: one kernel per step for all parameters on CUDA instead of foreach's dozen passes
        return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                                 fused=all(p.is_cuda for p in params) or None)
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit if train.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return optimizer(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def _run_peak(curves: dict, memory: PeakMemory) -> dict[str, float]:
    """The run's peak: the largest per-step peak outside the profiler's window (the current step's where none is
    recorded yet)."""
    if not curves["step_peak_memory_gib"]:
        return memory.read()
    return {key: max(value for _, value in curves[f"step_{key}"]) for key in ("peak_memory_gib", "peak_reserved_gib")}


def _adalora_budget(model) -> dict:
    """AdaLoRA's rank budget before and after allocation, so the report shows that ranks moved."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or config.peft_type.value != "ADALORA":
        return {}
    modules = sum(1 for m in model.modules() if hasattr(m, "lora_E"))
    final = sum(int(sum(mask)) for mask in config.rank_pattern.values()) if config.rank_pattern else None
    return {"adalora_rank_budget": {"initial": config.init_r * modules, "final": final, "modules": modules}}


class _Profiler:
    """torch.profiler over a window of optimizer steps: a Chrome trace and the key_averages table."""

    def __init__(self, out: Path, window, device: torch.device, *, first: int, max_steps: int):
        """A run resumed at step `first` inside or after the window, whose trace the killed attempt did not
        write, profiles `window.steps` steps from `first` instead (as many as are left)."""
        self.out, self.first = out, window.start_step
        if first > self.first and not (out / "trace.json.gz").is_file():
            self.first = first
        self.last = min(self.first + window.steps - 1, max_steps)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)

    def before(self, step: int) -> None:
        if step == self.first:
            self.profile.start()

    def after(self, step: int) -> None:
        if step == self.last and self.profile.profiler is not None:  # not started: resumed after a written trace
            self.profile.stop()
            with atomic_dir(self.out) as tmp:
                self.profile.export_chrome_trace(str(tmp / "trace.json.gz"))
                table = self.profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                write_text(tmp / "key_averages.txt", table + "\n")
            self.profile = torch.profiler.profile()  # an unstarted one: the recorded events (gigabytes on CPU) go
            release_freed_host_memory()
