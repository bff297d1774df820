"""Merging adapters into a deployable model, and generating from runs and bases."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.artifacts import read_json, read_jsonl
from tunelab.batches import collate
from tunelab.config import GenerationConfig, Run, TrainConfig
from tunelab.generate import run_generate
from tunelab.generation import load_for_inference
from tunelab.merge import run_merge
from tunelab.train import run_train

ADALORA = {"init_r": 8, "target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 2}


@pytest.fixture(scope="module", params=["lora", "adalora", "full"])
def trained_run(request, tiny_base, tiny_tokens, tmp_path_factory):
    train = TrainConfig(method=request.param, max_steps=8, eval_every=4, micro_batch_size=4, learning_rate=3e-3,
                        adalora=ADALORA, profile={"steps": 0})
    out = tmp_path_factory.mktemp(request.param)
    run_train(Run(name=f"tiny-{request.param}", model="tiny", train=train), tiny_base, tiny_tokens / "tokens", out)
    return out


def test_merged_model_reloads_with_plain_transformers_and_matches(trained_run, tiny_tokens):
    """The merge of LoRA, AdaLoRA (which other tools refuse) and full runs reloads and keeps the logits."""
    report = run_merge(trained_run, tiny_tokens / "tokens")
    merged = AutoModelForCausalLM.from_pretrained(trained_run / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    trained, tokenizer, _ = load_for_inference(trained_run / "model", None)
    batch = collate(read_jsonl(tiny_tokens / "tokens" / "test.jsonl")[:4], tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = trained.eval()(**inputs).logits[mask], merged.eval()(**inputs).logits[mask]
    scale = expected.abs().max()
    assert (expected - got).abs().max() / scale < 1e-4  # saved in the run's fp32: no rounding
    assert report["max_logit_difference_vs_trained"] / scale < 1e-4 and report["top1_agreement_vs_trained"] >= 0.99
    assert report["size_bytes"] > 0 and (trained_run / "merged" / "tokenizer.json").is_file()


def test_generate_from_a_run_and_from_its_base(trained_run, tiny_base, tiny_tokens, tmp_path):
    settings = GenerationConfig(max_new_tokens=8, batch_size=5)
    data, tokens = tiny_tokens / "data", tiny_tokens / "tokens"
    summary = run_generate(trained_run / "model", tiny_base, data, tokens, settings, trained_run)
    base_summary = run_generate(None, tiny_base, data, tokens, settings, tmp_path)
    records = read_jsonl(data / "test.jsonl")
    for out, result in ((trained_run, summary), (tmp_path, base_summary)):
        generations = read_jsonl(out / "generations.jsonl")
        assert [g["reference"] for g in generations] == [r["output"] for r in records]  # back in record order
        assert all(0 <= g["new_tokens"] <= 8 and g["finish_reason"] in ("stop", "length") for g in generations)
        assert all(len(g["prediction"]) > 0 or g["new_tokens"] <= 1 for g in generations)
        assert read_json(out / "eval.json") == result
        assert result["test_loss"] > 0 and result["samples"] == len(records)
        assert result["latency_requests"] == len(records) and "latency_seconds_mean" not in result
        assert 0 < result["ttft_p50_seconds"] <= result["latency_p50_seconds"] <= result["latency_p95_seconds"]
        assert result["generation"]["stop_token_ids"] == [tokenizer_eos(tiny_base)]
        assert result["generation"]["do_sample"] is False and result["generation"]["max_new_tokens"] == 8


def tokenizer_eos(base) -> int:
    from tunelab.modeling import load_tokenizer

    return load_tokenizer(base).eos_token_id




MERGE_TOLERANCE = 1e-2  # largest |logit| difference a bf16 merge may add (bf16 keeps about 3 significant digits)


@pytest.fixture(scope="module")
def moved_adalora(tiny_base, tiny_tokens, tmp_path_factory):
    """An AdaLoRA run trained until its adapter moves the logits by far more than the merge tolerance."""
    train = TrainConfig(method="adalora", max_steps=30, eval_every=30, micro_batch_size=8, learning_rate=4e-2,
                        warmup_steps=0, lora={"dropout": 0.0}, profile={"steps": 0},
                        adalora={"init_r": 8, "target_r": 4, "tinit": 5, "tfinal": 5, "delta_t": 5})
    out = tmp_path_factory.mktemp("adalora-moved")
    run_train(Run(name="tiny-adalora", model="tiny", train=train), tiny_base, tiny_tokens / "tokens", out)
    return out


def _logits(model, tiny_tokens, pad_id: int) -> torch.Tensor:
    batch = collate(read_jsonl(tiny_tokens / "tokens" / "test.jsonl")[:8], pad_id)
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()].float()


def test_adalora_merge_keeps_the_logits_of_an_adapter_that_moved_them(moved_adalora, tiny_base, tiny_tokens,
                                                                       tmp_path, monkeypatch):
    """Parity within MERGE_TOLERANCE means something only if the adapter moved the logits by >= 100x as much;
    and the same check fails a merge that drops the adapter."""
    import shutil

    from peft.tuners.adalora import AdaLoraModel

    trained, tokenizer, _ = load_for_inference(moved_adalora / "model", None)
    expected = _logits(trained, tiny_tokens, tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    moved = float((expected - _logits(base, tiny_tokens, tokenizer.pad_token_id)).abs().max())
    assert moved >= 100 * MERGE_TOLERANCE, f"the adapter moved the logits by {moved:.3g} only"

    report = run_merge(moved_adalora, tiny_tokens / "tokens")
    merged = AutoModelForCausalLM.from_pretrained(moved_adalora / "merged", dtype=torch.float32)
    error = float((expected - _logits(merged, tiny_tokens, tokenizer.pad_token_id)).abs().max())
    print(f"adapter moved the logits by {moved:.3g}; the merge changed them by {error:.3g}")
    assert error < MERGE_TOLERANCE and report["max_logit_difference_vs_trained"] < MERGE_TOLERANCE

    broken = tmp_path / "broken"
    shutil.copytree(moved_adalora, broken, ignore=shutil.ignore_patterns("merged"))
    monkeypatch.setattr(AdaLoraModel, "merge_and_unload", AdaLoraModel.unload)  # the base back, the adapter dropped
    broken_report = run_merge(broken, tiny_tokens / "tokens")
    dropped = AutoModelForCausalLM.from_pretrained(broken / "merged", dtype=torch.float32)
    assert float((expected - _logits(dropped, tiny_tokens, tokenizer.pad_token_id)).abs().max()) > MERGE_TOLERANCE
    assert broken_report["max_logit_difference_vs_trained"] > MERGE_TOLERANCE
