"""Training on the tiny model, one row per CPU-runnable (method, quantization, precision), as in PEFT's tests."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tunelab import modeling
from tunelab.artifacts import read_json, read_jsonl
from tunelab.batches import collate, label_tokens, mean_loss, pack, training_batches
from tunelab.config import Run, TrainConfig
from tunelab.errors import TunelabError
from tunelab.tokenize import IGNORE
from tunelab.train import attach_method, fit, orthogonality_penalty, run_train

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CASES = [  # (method, quantization, precision, steps, other settings)
    ("lora", "none", "fp32", 40, {}),
    ("adalora", "none", "fp32", 40, {}),
    ("full", "none", "fp32", 40, {}),
    ("lora", "none", "bf16", 12, {}),      # bf16 is about 5x slower on an AVX2 CPU: fewer steps
    ("lora", "none", "fp16", 12, {}),      # fp16 autocast with GradScaler loss scaling
    ("lora", "nf4", "fp32", 40, {}),       # bitsandbytes 4-bit on the CPU (QLoRA)
    ("lora", "int8", "fp32", 20, {}),      # LLM.int8 on the CPU
    ("lora", "none", "fp32", 20, {"lora": {"use_dora": True, "use_rslora": True}}),
    ("lora", "nf4", "fp32", 20, {"gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"}),
    ("full", "none", "fp32", 20, {"gradient_checkpointing": True, "optimizer": "adamw_8bit"}),
]
SHORT_ADALORA = {"init_r": 8, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1}  # a 3-step run


def settings(**overrides) -> TrainConfig:
    base = dict(max_steps=40, micro_batch_size=8, learning_rate=3e-3, warmup_steps=0, eval_every=20,
                lr_scheduler="constant_with_warmup", profile={"steps": 0},
                adalora={"init_r": 8, "target_r": 2, "tinit": 5, "tfinal": 10, "delta_t": 5})
    return TrainConfig(**{**base, **overrides})


def model_for(tiny_base, train: TrainConfig):
    torch.manual_seed(0)
    return attach_method(modeling.load_model(tiny_base, train, for_training=True), train)


@pytest.mark.parametrize("method, quantization, precision, steps, other", CASES,
                         ids=["-".join(map(str, c[:3])) + "".join(f"-{k}" for k in c[4]) for c in CASES])
def test_method_trains(tiny_base, tiny_tokens, method, quantization, precision, steps, other):
    train = settings(method=method, quantization=quantization, precision=precision, max_steps=steps,
                     eval_every=steps // 2, **other)
    model = model_for(tiny_base, train)
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    validation = read_jsonl(tiny_tokens / "tokens" / "validation.jsonl")
    metrics = fit(model, examples, validation, train, modeling.load_tokenizer(tiny_base).pad_token_id)
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, "the loss must fall"
    assert metrics["validation_loss_curve"][-1][1] < metrics["validation_loss_curve"][0][1] + 0.5
    assert metrics["tokens_per_second"] > 0 and 0 <= metrics["padding_fraction"] < 1
    if method == "full":
        assert metrics["trainable_parameters"] == metrics["total_parameters"]
        return
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == TARGETS, "an adapter sits on every target projection"
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] / 2
    if quantization == "nf4":
        import bitsandbytes as bnb
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_adalora_reallocates_its_rank_budget(tiny_base, tiny_tokens):
    """PEFT only prunes when update_and_allocate runs every step; a silent plain-LoRA run keeps every rank."""
    train = settings(method="adalora", max_steps=30)
    model = model_for(tiny_base, train)
    fit(model, read_jsonl(tiny_tokens / "tokens" / "train.jsonl"), read_jsonl(tiny_tokens / "tokens" / "validation.jsonl"),
        train, modeling.load_tokenizer(tiny_base).pad_token_id)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern, "the final budget was allocated"
    ranks = [int(sum(mask)) for mask in pattern.values()]
    assert sum(ranks) < 8 * len(ranks), "ranks were pruned from init_r"
    assert len(set(ranks)) > 1, "the budget moved between modules"


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_accumulating_4x2_equals_1x8(tiny_base, tiny_tokens, method):
    """Also for AdaLoRA, whose orthogonality penalty must count once per optimizer step, not once per micro-batch."""
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    pad = modeling.load_tokenizer(tiny_base).pad_token_id
    weights = []
    for micro, accumulation in ((8, 1), (2, 4)):
        train = settings(method=method, max_steps=3, micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                         group_by_length=False, lora={"dropout": 0.0}, eval_every=3, adalora=SHORT_ADALORA)
        model = model_for(tiny_base, train)
        fit(model, examples, examples[:8], train, pad)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_row_gives_the_padded_loss(tiny_base, tiny_tokens, attention):
    """Attention stays within each packed example and positions restart: same loss as the padded batch. The
    same row with positions running on (as if one long example) must differ, or the test could not tell."""
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")[:6]
    assert len({len(e["input_ids"]) for e in examples}) > 1, "examples of different lengths"
    model = model_for(tiny_base, settings(attention=attention)).eval()
    padded, packed = collate(examples, modeling.load_tokenizer(tiny_base).pad_token_id), pack(examples)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert label_tokens(packed) == label_tokens(padded)
    with torch.no_grad():
        losses = [float(model(**batch, use_cache=False).loss) for batch in (padded, packed)]
        running_on = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        leaked = float(model(**running_on, use_cache=False).loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert abs(leaked - losses[0]) > 1e-3


def test_packing_trains_the_padded_update_without_padding(tiny_base, tiny_tokens):
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    pad = modeling.load_tokenizer(tiny_base).pad_token_id
    weights, padding = [], []
    for packing in (False, True):
        train = settings(method="lora", max_steps=3, packing=packing, group_by_length=False, lora={"dropout": 0.0},
                         eval_every=3)
        model = model_for(tiny_base, train)
        padding.append(fit(model, examples, examples[:8], train, pad)["padding_fraction"])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert padding[0] > 0 and padding[1] == 0
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_the_run(tiny_base, tiny_tokens):
    train = settings(method="full", learning_rate=1e30, max_steps=5)
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    with pytest.raises(TunelabError, match=r"run nan-run: loss is (nan|inf) at step \d"):
        fit(model_for(tiny_base, train), examples, examples[:8], train, 0, label="nan-run")


def test_all_zero_gradients_stop_the_run(tiny_base, tiny_tokens):
    train = settings(method="lora", max_steps=5)
    model = model_for(tiny_base, train)
    for module in model.modules():  # cut every adapter off from the loss: its gradients are all zero
        if isinstance(module, torch.nn.Dropout):
            module.p = 1.0
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    with pytest.raises(TunelabError, match="every trainable gradient is zero at step 1"):
        fit(model, examples, examples[:8], train, 0, label="detached")


def test_run_train_writes_model_metrics_and_profile(tiny_base, tiny_tokens, tmp_path):
    run = Run(name="tiny-lora", model="tiny", train=settings(max_steps=6, eval_every=3,
                                                              profile={"start_step": 2, "steps": 2}))
    metrics = run_train(run, tiny_base, tiny_tokens / "tokens", tmp_path)
    saved = read_json(tmp_path / "train_metrics.json")
    assert saved["run"] == "tiny-lora" and saved["config"]["max_steps"] == 6
    assert [s for s, _ in saved["loss_curve"]] == list(range(1, 7))
    assert [s for s, _ in saved["validation_loss_curve"]] == [3, 6]
    assert saved["peak_memory_gib"] > 0 and saved["wall_seconds"] > 0 and metrics["tokens_per_second"] > 0
    # every step's own peak, the profiler's window (steps 2-3) left out: its recorded events are not the run's memory
    assert [s for s, _ in saved["step_peak_memory_gib"]] == [1, 4, 5, 6]
    assert saved["peak_memory_gib"] == max(v for _, v in saved["step_peak_memory_gib"])
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "profile" / "trace.json.gz").stat().st_size > 1000
    assert "aten::" in (tmp_path / "profile" / "key_averages.txt").read_text()


@pytest.mark.parametrize("precision, master_weights", [("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "same")])
def test_half_precision_full_fine_tuning_updates_like_fp32_adamw(tiny_base, tiny_tokens, precision, master_weights):
    """At lr 1e-5 a bf16 weight can't take most AdamW updates (they are below half its last bit). With fp32 master
    weights, the weights after 3 steps are what fp32 AdamW makes of the same gradients, and nearly all have moved;
    the pure-bf16 path (`master_weights: same`), run the same way, fails that check."""
    train = settings(method="full", precision=precision, master_weights=master_weights, learning_rate=1e-5,
                     max_steps=3, warmup_steps=0, lr_scheduler="constant_with_warmup", eval_every=3)
    model = model_for(tiny_base, train)
    start = [p.detach().float().clone() for p in model.parameters()]
    gradients = []  # each step's gradients as the optimizer gets them (unscaled, clipped)
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: gradients.append(
        [p.grad.float().clone() for group in optimizer.param_groups for p in group["params"]]))
    try:
        metrics = fit(model, read_jsonl(tiny_tokens / "tokens" / "train.jsonl")[:64], [], train,
                      modeling.load_tokenizer(tiny_base).pad_token_id)
    finally:
        hook.remove()
    assert len(gradients) == 3
    reference = [weight.clone().requires_grad_() for weight in start]
    adamw = torch.optim.AdamW(reference, lr=1e-5, weight_decay=0.0, foreach=False)
    for step in gradients:
        for weight, gradient in zip(reference, step):
            weight.grad = gradient
        adamw.step()
    effective = [p.detach().float() for p in model.parameters()]
    largest = max(float((got - want.detach()).abs().max()) for got, want in zip(effective, reference))
    moved = sum(int((got != first).sum()) for got, first in zip(effective, start)) / sum(w.numel() for w in start)
    print(f"{precision}/{master_weights}: largest difference from fp32 AdamW {largest:.3g}, {moved:.1%} moved")
    assert (largest <= 1e-6 and moved >= 0.99) == (master_weights == "fp32"), (largest, moved)
    assert metrics["trainable_weights_dtype"] == ("float32" if master_weights == "fp32" else "bfloat16")


def test_fp16_without_master_weights_is_refused():
    with pytest.raises(ValueError, match="master_weights same with precision fp16"):
        settings(method="full", precision="fp16", master_weights="same")


def test_adalora_records_cross_entropy_and_its_penalty_apart(tiny_base, tiny_tokens):
    """The loss curve is the cross-entropy alone; the orthogonality penalty has its own curve, equal to PEFT's."""
    train = settings(method="adalora", max_steps=3, group_by_length=False, lora={"dropout": 0.0}, eval_every=3,
                     adalora=SHORT_ADALORA)
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    pad = modeling.load_tokenizer(tiny_base).pad_token_id
    model = model_for(tiny_base, train)
    batch = next(training_batches(examples, train.micro_batch_size, pad, seed=train.seed, group_by_length=False))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cross_entropy = float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE))
        weight = model.peft_config["default"].orth_reg_weight
        peft_penalty = (float(model(**batch).loss) - cross_entropy) / weight  # PEFT adds it to any loss
    assert peft_penalty > 0.1, "the penalty is large enough for the test to tell it from the cross-entropy"
    metrics = fit(model, examples, examples[:8], train, pad)
    assert metrics["loss_curve"][0][1] == pytest.approx(cross_entropy, rel=1e-5)
    assert metrics["orthogonality_penalty_curve"][0][1] == pytest.approx(peft_penalty, rel=1e-4)
    assert metrics["orthogonality_penalty_weight"] == weight
    assert float(orthogonality_penalty(model)) == pytest.approx(metrics["final_orthogonality_penalty"], rel=0.5)


def test_test_loss_runs_in_chunks_within_the_logits_budget(tiny_base, tiny_tokens):
    """A batch whose logits would exceed the budget runs a few rows at a time; the loss is still the one
    cross-entropy per label token over all examples (not a mean of chunk means)."""
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")[:10]  # the validation split holds 2
    pad = modeling.load_tokenizer(tiny_base).pad_token_id
    model = model_for(tiny_base, settings(method="full")).eval()
    batch = collate(examples, pad)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                  ignore_index=IGNORE, reduction="none")
    counts = (batch["labels"][:, 1:] != IGNORE).sum(1)
    plain = float(per_token.sum() / counts.sum())
    assert len(set(counts.tolist())) > 1, "rows of different answer lengths: a mean of chunk means would differ"
    width, vocabulary = batch["input_ids"].shape[1], model.config.vocab_size
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, output: shapes.append(output.shape))
    try:
        chunked = mean_loss(model, examples, 10, pad, modeling.autocast(settings(), torch.device("cpu")),
                            logits_budget=3 * width * vocabulary)
    finally:
        hook.remove()
    assert [shape[0] for shape in shapes] == [3, 3, 3, 1]
    assert max(s[0] * s[1] * s[2] for s in shapes) <= 3 * width * vocabulary
    assert chunked == pytest.approx(plain, rel=1e-5)
    chunk_means = [float(per_token[i:i + 3].sum() / counts[i:i + 3].sum()) for i in range(0, 10, 3)]
    assert abs(sum(chunk_means) / len(chunk_means) - plain) > 1e-4


@pytest.mark.parametrize("profile, problem", [({"start_step": 0}, "greater than or equal to 1"),
                                              ({"start_step": 7, "steps": 1}, "is after max_steps 6"),
                                              ({"start_step": 5, "steps": 3}, "ends after max_steps 6")])
def test_a_profiler_window_that_never_opens_is_refused(profile, problem):
    with pytest.raises(ValueError, match=problem):
        settings(max_steps=6, profile=profile)
    settings(max_steps=6, profile={"start_step": 7, "steps": 0})  # profiler off: the start does not matter
