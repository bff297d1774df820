"""QLoRA merges: into the dequantised 4-bit base the adapter trained against (default), or the original one."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.artifacts import read_json, read_jsonl, write_json
from tunelab.config import MergeConfig, Run, TrainConfig
from tunelab.merge import compare_logits, run_merge
from tunelab.train import run_train

OUTLIER = 40.0  # times a weight's row scale: one per 64-weight block makes nf4's absmax blocks coarse


@pytest.fixture(scope="module")
def outlier_base(tiny_base, tmp_path_factory):
    """The tiny base with one large weight in every 64-weight block of each decoder projection, so that 4-bit
    quantization visibly changes the model (a random Gaussian tiny model quantizes too well to show it)."""
    out = tmp_path_factory.mktemp("outlier-base")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight[:, ::64] *= OUTLIER
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tiny_base / name).read_bytes())
    write_json(out / "base.json", {"path": str(out), "source": "tiny"})
    return out


@pytest.fixture(scope="module")
def qlora_run(outlier_base, tiny_tokens, tmp_path_factory):
    """A QLoRA run whose adapter moves the logits (a high learning rate on learnable demo records)."""
    train = TrainConfig(method="lora", quantization="nf4", max_steps=12, eval_every=12, micro_batch_size=4,
                        learning_rate=1e-2, profile={"steps": 0})
    out = tmp_path_factory.mktemp("qlora")
    run_train(Run(name="tiny-qlora", model="tiny", train=train), outlier_base, tiny_tokens / "tokens", out)
    return out


def test_dequantized_merge_is_the_trained_model_and_original_is_not(qlora_run, tiny_tokens):
    """merge.base dequantized (the default) reproduces the 4-bit model + adapter; original is off by the whole
    quantization error, which the outliers make large. Both reload as plain fp32 models, as the run computed."""
    import bitsandbytes as bnb

    tokens = tiny_tokens / "tokens"
    original = run_merge(qlora_run, tokens, MergeConfig(base="original"))
    dequantized = run_merge(qlora_run, tokens)
    assert (original["merged_into"], dequantized["merged_into"]) == ("original", "dequantized")
    assert read_json(qlora_run / "merge.json") == pytest.approx(dequantized)
    print(json.dumps({"original": original, "dequantized": dequantized}))
    assert dequantized["max_logit_difference_vs_trained"] < 0.01 * original["max_logit_difference_vs_trained"]
    assert dequantized["top1_agreement_vs_trained"] >= 0.99 > original["top1_agreement_vs_trained"]
    merged = AutoModelForCausalLM.from_pretrained(qlora_run / "merged")
    assert "quantization_config" not in json.loads((qlora_run / "merged" / "config.json").read_text())
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())


def test_a_merge_that_drops_the_adapter_is_caught(qlora_run, tiny_tokens, tmp_path, monkeypatch):
    """merge.json's parity figures expose a merge that loses the adapter: the dequantised base alone is far from
    the trained model (the check the correct merge passes above fails)."""
    from peft import PeftModel

    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self: self.unload(), raising=False)  # adapter dropped
    broken = run_merge(qlora_run, tiny_tokens / "tokens")
    monkeypatch.undo()
    correct = run_merge(qlora_run, tiny_tokens / "tokens")
    assert broken["max_logit_difference_vs_trained"] > 20 * correct["max_logit_difference_vs_trained"]
    assert broken["top1_agreement_vs_trained"] < 0.99 <= correct["top1_agreement_vs_trained"]


def test_the_qlora_run_is_evaluated_as_it_trained(qlora_run, tiny_tokens):
    """The generate stage's test loss of a QLoRA run (adapter on its 4-bit base, loaded as `tunelab generate` and
    `tunelab serve` load it) equals its dequantised merge's, record for record. On a CPU with AVX512-BF16,
    bitsandbytes would otherwise repack the 4-bit weights in eval mode and compute them in bf16, not in the run's
    fp32 (the tiny study's QLoRA test loss was 1 % off its merge that way)."""
    import bitsandbytes as bnb

    from tunelab.batches import collate, mean_loss
    from tunelab.generation import load_for_inference

    run_merge(qlora_run, tiny_tokens / "tokens")
    examples = read_jsonl(tiny_tokens / "tokens" / "test.jsonl")
    losses, models = {}, {}
    for name, path in (("trained", qlora_run / "model"), ("merged", qlora_run / "merged")):
        models[name], tokenizer, _ = load_for_inference(path)
        losses[name] = [mean_loss(models[name], [example], 1, tokenizer.pad_token_id, contextlib.nullcontext)
                        for example in examples]
    logits = compare_logits(models["trained"], models["merged"], collate(examples, tokenizer.pad_token_id))
    print(json.dumps({"losses": losses, **logits}))
    assert logits["max_logit_difference_vs_trained"] < 1e-3
    assert losses["trained"] == pytest.approx(losses["merged"], rel=1e-4, abs=1e-6)
    layers = [m for m in models["trained"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
