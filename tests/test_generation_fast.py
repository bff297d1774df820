"""The static-cache decoder (generation/fast.py) is the same greedy generation as transformers' `generate`: checked on
the CPU without compilation, on a model trained until its predictions are confident (generation/check.py), where
exact agreement means something; the GPU runs the same check compiled (BENCHMARKS.md)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tunelab import modeling, synthetic
from tunelab.config import GenerationConfig, TinyModelConfig
from tunelab.generation import Engine
from tunelab.generation.check import chain_prompts, equivalence, left_padded
from tunelab.generation.fast import StaticDecoder

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def confident(confident_qwen2):
    """A tiny Qwen2 (fp32, SDPA, grouped-query attention) trained on a token chain until confident."""
    from transformers import AutoModelForCausalLM

    path, base = confident_qwen2(TINY)
    assert base["last_loss"] < 0.05 * base["first_loss"], base
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_static_path_equals_generate_and_the_check_catches_an_off_by_one(confident):
    prompts = chain_prompts(TINY["vocab_size"], 24, 4, 16)  # left-padded batches of different lengths
    result = equivalence(confident, StaticDecoder(confident, compiled=False), prompts, 16, batch_size=8)
    assert result["reference_top1_probability"] > 0.9, result  # confident: exact agreement means something
    assert result["passed"] and result["greedy_identical"] == 1.0 and result["top1_agreement"] == 1.0, result
    assert result["max_abs_logit_difference"] < 1e-3, result
    broken = equivalence(confident, StaticDecoder(confident, compiled=False, broken=True), prompts, 16, batch_size=8)
    assert not broken["passed"] and broken["max_abs_logit_difference"] > 1.0, broken
    # the diagnostic paths compute the same function: the plain forward pass over prompt + generate's tokens, the
    # decoder without the grouped attention, and with the head's product kept in float32
    for decoder in (None, StaticDecoder(confident, compiled=False, grouped=False),
                    StaticDecoder(confident, compiled=False, fp32_logits=True)):
        result = equivalence(confident, decoder, prompts, 16, batch_size=8)
        assert result["top1_agreement"] == 1.0 and result["max_abs_logit_difference"] < 1e-3, result


def test_a_stop_token_in_the_models_own_config_changes_neither_path(confident):
    """The check asks for exactly N tokens with no stop token. `generate` fills an eos_token_id left unset from the
    model's generation config (with min_new_tokens it would then mask it out of its choices): here the model's
    eos is a token the chain produces, and both paths still run N steps and agree."""
    prompts = chain_prompts(TINY["vocab_size"], 16, 4, 12, seed=5)
    ids, mask = left_padded(prompts, 0, "cpu")
    chosen = StaticDecoder(confident, compiled=False).generate(ids, mask, 12).tokens
    before = confident.generation_config.eos_token_id
    confident.generation_config.eos_token_id = int(chosen[0, 3])  # a token greedy decoding picks
    try:
        result = equivalence(confident, StaticDecoder(confident, compiled=False), prompts, 12, batch_size=8)
    finally:
        confident.generation_config.eos_token_id = before
    assert result["greedy_identical"] == 1.0 and result["passed"], result


def test_stop_tokens_end_rows_as_generate_ends_them(confident):
    from transformers import GenerationConfig as HFGenerationConfig

    prompts = chain_prompts(TINY["vocab_size"], 8, 4, 12, seed=3)
    ids, mask = left_padded(prompts, 0, "cpu")
    free = StaticDecoder(confident, compiled=False).generate(ids, mask, 24).tokens
    stops = [int(free[0, 5]), int(free[3, 14])]  # rows stop at different steps; some may never stop
    reference = confident.generate(input_ids=ids, attention_mask=mask, generation_config=HFGenerationConfig(
        max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=stops))[:, ids.shape[1]:]
    ours = StaticDecoder(confident, compiled=False).generate(ids, mask, 24, stop_ids=stops, pad_id=0).tokens
    assert reference.shape[1] <= ours.shape[1]
    assert torch.equal(ours[:, :reference.shape[1]], reference)
    assert (ours[:, reference.shape[1]:] == 0).all()  # generate stopped once every row had: only padding after
    first = next(i for i, token in enumerate(reference[0].tolist()) if token in stops)
    assert first <= 5 and (reference[0, first + 1:] == 0).all()  # row 0 did stop, and is padded after its stop


@pytest.fixture(scope="module")
def tiny_engine_parts(tmp_path_factory):
    records = synthetic.alpaca_records(100)
    tokenizer = modeling.train_tiny_tokenizer([r["instruction"] + r["output"] for r in records], vocab_size=400)
    model = modeling.build_tiny_model(TinyModelConfig(), tokenizer).eval()
    return model, tokenizer


def test_engine_selects_the_path_and_static_answers_equal_generates(tiny_engine_parts):
    model, tokenizer = tiny_engine_parts

    def engine(**settings):
        return Engine(model, tokenizer, contextlib.nullcontext, GenerationConfig(max_new_tokens=10, do_sample=False,
                                                                                  batch_size=3, **settings))
    plain, static, auto = engine(engine="generate"), engine(engine="static"), engine()
    assert (plain.decoding_path(), static.decoding_path(), auto.decoding_path()) == ("generate", "static", "generate")
    assert static.effective_settings()["decoding"] == "static"
    assert static.decoding_path(static.config_with(do_sample=True)) == "generate"  # sampling: generate's
    prompts = ["Sort the numbers 3 1 2", "Repeat the words: red green blue yellow", "Add 4"]
    free = plain.generate(prompts, plain.config_with(eos_token_id=[]))
    assert free == static.generate(prompts, static.config_with(eos_token_id=[]))
    stop = free[1].token_ids[4]  # a stop token of the model's own that ends row 1 early (and maybe others)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    plain, static = engine(engine="generate"), engine(engine="static")
    ours, theirs = static.generate(prompts), plain.generate(prompts)
    assert ours == theirs and ours[1].finish_reason == "stop" and len(ours[1].token_ids) <= 4
    assert static.generate(prompts[:2]) == theirs[:2]  # a short batch, filled up to the batch size and cut back
    assert {rows for rows, _ in static.decoder._caches} == {3}  # one batch shape: one compiled step on a GPU


def test_static_path_runs_a_lora_adapter_as_generate_does(confident):
    """A run's adapter on its base (how the generate stage loads a LoRA run): same check, non-zero adapter."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(confident), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_lora_weights=False)).eval()
    prompts = chain_prompts(TINY["vocab_size"], 16, 4, 16, seed=5)
    result = equivalence(model, StaticDecoder(model, compiled=False), prompts, 12, batch_size=8)
    assert result["passed"] and result["max_abs_logit_difference"] < 1e-3, result
