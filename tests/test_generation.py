"""The generation engine follows the model: its stop-token list and generation settings, and its chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab import modeling, synthetic
from tunelab.config import DataConfig, GenerationConfig, TinyModelConfig
from tunelab.errors import TunelabError
from tunelab.generation import Engine, measure_latency
from tunelab.tokenize import IGNORE, encode, render_prompt, run_tokenize

# A ChatML template like Qwen2.5-Instruct's: the turn ends with <|im_end|>, which is not the tokenizer's EOS
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    records = synthetic.alpaca_records(200)
    tokenizer = modeling.train_tiny_tokenizer([r["instruction"] + r["output"] for r in records], vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    modeling.build_tiny_model(TinyModelConfig(), tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _engine(path: Path, **settings) -> Engine:
    return Engine.load(path, GenerationConfig(max_new_tokens=12, **settings))


def test_stops_on_every_stop_token_of_the_models_generation_config(tiny):
    engine = _engine(tiny)
    free = engine.generate(["Sort the numbers 3 1 2"], engine.config_with(eos_token_id=[]))[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    engine.model.generation_config.eos_token_id = [engine.tokenizer.convert_tokens_to_ids("<|im_end|>"), stop]
    engine = Engine(engine.model, engine.tokenizer, engine.autocast, GenerationConfig(max_new_tokens=12))
    assert stop in engine.stop_token_ids and engine.tokenizer.eos_token_id in engine.stop_token_ids
    stopped = engine.generate(["Sort the numbers 3 1 2"])[0]
    assert stopped.token_ids == free.token_ids[:first] and stopped.finish_reason == "stop"
    assert stopped.generated_tokens == first + 1
    assert engine.effective_settings()["stop_token_ids"] == engine.stop_token_ids


def test_unset_settings_follow_the_model_and_set_ones_win(tiny):
    engine = _engine(tiny)
    engine.model.generation_config.do_sample, engine.model.generation_config.temperature = True, 0.7
    following = Engine(engine.model, engine.tokenizer, engine.autocast, GenerationConfig())
    assert following.effective_settings()["do_sample"] is True
    assert following.effective_settings()["temperature"] == 0.7
    assert following.effective_settings()["top_p"] == 1.0  # transformers' default where the model sets none
    study = Engine(engine.model, engine.tokenizer, engine.autocast, GenerationConfig(do_sample=False, temperature=0.2))
    assert study.config.do_sample is False and study.config.temperature == 0.2


def test_chat_template_prompt_format_trains_the_answer_and_the_end_of_turn(tiny):
    tokenizer = modeling.load_tokenizer(tiny)
    record = {"instruction": "Reverse the words.", "input": "red fox", "output": "fox red"}
    text = render_prompt(record, tokenizer, "chat_template")
    assert text == "<|im_start|>user\nReverse the words.\n\nred fox<|im_end|>\n<|im_start|>assistant\n"
    example, status = encode(record, tokenizer, 128, "truncate", "chat_template")
    labelled = [t for t in example["labels"] if t != IGNORE]
    assert status == "kept" and example["labels"][:len(example["labels"]) - len(labelled)] == [IGNORE] * (
        len(example["labels"]) - len(labelled))
    assert tokenizer.decode(labelled) == "fox red<|im_end|>\n"
    assert tokenizer.eos_token_id not in labelled  # the template's end of turn ends the answer, not the EOS
    alpaca, _ = encode(record, tokenizer, 1024, "truncate", "alpaca")
    assert alpaca["labels"][-1] == tokenizer.eos_token_id
    engine = Engine.load(tiny, GenerationConfig(), "chat_template")
    assert engine.record_prompt(record) == text


def test_chat_template_needs_a_tokenizer_that_has_one(tiny, tmp_path):
    tokenizer = modeling.load_tokenizer(tiny)
    tokenizer.chat_template = None
    data = DataConfig(source="synthetic:50", prompt_format="chat_template")
    with pytest.raises(TunelabError, match="has no chat template .*data.prompt_format: alpaca"):
        run_tokenize(data, tokenizer, tmp_path, tmp_path / "tokens")
    assert not (tmp_path / "tokens").exists()


def test_latency_is_per_request_after_a_warm_up(tiny):
    engine = _engine(tiny)
    prompts = [render_prompt(r, engine.tokenizer, "alpaca") for r in synthetic.alpaca_records(5)]
    latency = measure_latency(engine, prompts, 32)
    assert latency["latency_requests"] == 5  # all, when fewer than asked
    assert 0 < latency["ttft_p50_seconds"] <= latency["ttft_p95_seconds"] <= latency["latency_p95_seconds"]
    assert 0 < latency["per_token_latency_p50_seconds"] < latency["latency_p50_seconds"]
    assert measure_latency(engine, prompts, 3)["latency_requests"] == 3
