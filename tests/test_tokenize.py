"""The Alpaca template with the loss on the response only, and the overlength policy counted."""

from __future__ import annotations

import pytest

from tunelab import modeling
from tunelab.artifacts import read_json, read_jsonl
from tunelab.tokenize import IGNORE, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, encode, prompt

RECORD = {"instruction": "Sort the numbers.", "input": "3 1 2", "output": "1 2 3"}


def test_prompt_uses_the_template_with_and_without_input():
    assert prompt(RECORD) == PROMPT_WITH_INPUT.format(instruction="Sort the numbers.", input="3 1 2")
    assert prompt({**RECORD, "input": ""}) == PROMPT_NO_INPUT.format(instruction="Sort the numbers.")
    assert "### Input:" not in prompt({**RECORD, "input": ""})


def test_labels_cover_the_response_and_eos_only(tiny_base):
    tokenizer = modeling.load_tokenizer(tiny_base)
    example, status = encode(RECORD, tokenizer, 512, "truncate")
    prompt_length = len(tokenizer(prompt(RECORD), add_special_tokens=False)["input_ids"])
    assert status == "kept"
    assert example["labels"][:prompt_length] == [IGNORE] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][prompt_length:-1]) == "1 2 3"


@pytest.mark.parametrize("policy, expected", [("truncate", "truncated"), ("drop", "dropped")])
def test_overlength_policy(tiny_base, policy, expected):
    tokenizer = modeling.load_tokenizer(tiny_base)
    long = {**RECORD, "output": "word " * 300}
    prompt_length = len(tokenizer(prompt(long), add_special_tokens=False)["input_ids"])
    example, status = encode(long, tokenizer, prompt_length + 10, policy)
    assert status == expected
    if policy == "truncate":
        assert len(example["input_ids"]) == prompt_length + 10
        assert sum(label != IGNORE for label in example["labels"]) == 10


def test_tokenizer_ids_survive_save_and_reload(tiny_base, demo_records, tmp_path):
    """AutoTokenizer rebuilds qwen2 tokenizers on load; the tiny one must give the same ids after a round trip."""
    tokenizer = modeling.load_tokenizer(tiny_base)
    tokenizer.save_pretrained(tmp_path)
    reloaded = modeling.load_tokenizer(tmp_path)
    texts = [prompt(r) + r["output"] for r in demo_records]
    assert [tokenizer(t)["input_ids"] for t in texts] == [reloaded(t)["input_ids"] for t in texts]


def test_stats_count_every_record(tiny_tokens):
    stats = read_json(tiny_tokens / "tokens" / "stats.json")
    for split in ("train", "validation", "test"):
        rows = len(read_jsonl(tiny_tokens / "data" / f"{split}.jsonl"))
        counted = stats[split]
        assert counted["kept"] + counted["truncated"] + counted["dropped"] == rows
        assert counted["examples"] == rows - counted["dropped"]
        assert counted["max_length"] <= 96
    assert stats["train"]["truncated"] > 0  # demo answers are long: the policy really applied
