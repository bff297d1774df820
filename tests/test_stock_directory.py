"""A merged run is a stock Hugging Face directory, which other servers (vLLM: `vllm serve DIR`) load as it is:
no remote code, its config, generation config, tokenizer and chat template present, loadable by plain
AutoModelForCausalLM / AutoTokenizer without trust_remote_code, and its chat template renders as the base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tunelab import modeling, synthetic
from tunelab.artifacts import write_json, write_jsonl
from tunelab.config import DataConfig, Run, TinyModelConfig, TrainConfig
from tunelab.data import split_records
from tunelab.merge import run_merge
from tunelab.tokenize import run_tokenize
from tunelab.train import run_train

# A ChatML template like Qwen2.5-Instruct's: a turn ends with <|im_end|>, which is not the tokenizer's EOS
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Repeat the number 4807."}]
RUNS = {"lora": {"method": "lora"}, "qlora": {"method": "lora", "quantization": "nf4"}, "full": {"method": "full"}}


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A tiny instruct-style base laid out as the base stage writes one: a chat template, and a generation
    config whose stop list holds the end of turn and the EOS."""
    out = tmp_path_factory.mktemp("chat-base")
    records = synthetic.alpaca_records(200)
    tokenizer = modeling.train_tiny_tokenizer([r["instruction"] + r["output"] for r in records], vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    model = modeling.build_tiny_model(TinyModelConfig(), tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "base.json", {"path": str(out), "source": "tiny"})
    return out


@pytest.fixture(scope="module")
def chat_tokens(chat_base, tmp_path_factory) -> Path:
    """Synthetic records in the chat template's format, split and tokenized."""
    root = tmp_path_factory.mktemp("chat-tokens")
    data = DataConfig(source="synthetic:200", test_size=16, max_length=96, prompt_format="chat_template")
    for split, rows in split_records(synthetic.alpaca_records(200), data).items():
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
    run_tokenize(data, modeling.load_tokenizer(chat_base), root / "data", root / "tokens")
    return root / "tokens"


@pytest.fixture(scope="module", params=list(RUNS))
def merged_dir(request, chat_base, chat_tokens, tmp_path_factory) -> Path:
    """The merged directory of a short LoRA, QLoRA or full run on the chat base."""
    train = TrainConfig(max_steps=4, eval_every=4, micro_batch_size=4, learning_rate=3e-3, profile={"steps": 0},
                        **RUNS[request.param])
    out = tmp_path_factory.mktemp(request.param)
    run_train(Run(name=f"chat-{request.param}", model="tiny", train=train), chat_base, chat_tokens, out)
    run_merge(out, chat_tokens)
    return out / "merged"


def test_merged_directory_is_a_stock_hugging_face_directory(merged_dir, chat_base):
    files = {path.name for path in merged_dir.iterdir()}
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert name in files, f"{name} missing from {sorted(files)}"
    assert not [name for name in files if name.endswith(".py")], files  # no remote code shipped
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    config = json.loads((merged_dir / "config.json").read_text())
    tokenizer_config = json.loads((merged_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and "auto_map" not in tokenizer_config
    assert "quantization_config" not in config  # a plain dense model, as vLLM's default loader expects
    assert config["model_type"] in transformers.CONFIG_MAPPING
    assert [hasattr(transformers, architecture) for architecture in config["architectures"]] == [True]
    template = tokenizer_config.get("chat_template") or (merged_dir / "chat_template.jinja").read_text()
    assert template == CHATML

    model = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=False)
    assert type(model).__module__.startswith("transformers.models.")
    assert model.generation_config.eos_token_id == GenerationConfig.from_pretrained(chat_base).eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=False)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    base_tokenizer = AutoTokenizer.from_pretrained(chat_base)
    assert rendered == base_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids).count("<|im_start|>") == 3  # special tokens kept whole
