"""Stage `tokenize`: the prompt (`data.prompt_format`: the Alpaca template or the model's own chat template),
with the loss on the response only.

Reads `results/data/{split}.jsonl` and a base model's tokenizer; writes `results/tokens/<model>/{split}.jsonl`
(input_ids and labels, prompt labels -100; the response ends with EOS, or with the chat template's end of turn)
and `stats.json` (truncated and dropped counts).
One output per tokenizer, shared by every run of that model.
Run: `tunelab tokenize --config config.yaml --model tiny --data results/data --base results/base/tiny --out ...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunelab.artifacts import invalidate, read_jsonl, write_json, write_jsonl
from tunelab.config import DataConfig
from tunelab.data import SPLITS
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
IGNORE = -100
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def prompt(record: dict) -> str:
    """The Alpaca prompt of a record, identical for training and generation."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def chat_messages(record: dict) -> list[dict]:
    """A record as one user turn: the instruction, then its input if any."""
    content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": content}]


def check_prompt_format(tokenizer, prompt_format: str, where: object) -> None:
    """chat_template needs a tokenizer that has one."""
    if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise TunelabError(f"data.prompt_format is chat_template, but the tokenizer of {where} has no chat template "
                           "(set data.prompt_format: alpaca, or use a model that ships one)")


def render_prompt(record: dict, tokenizer, prompt_format: str) -> str:
    """The prompt text of a record, identical for training and generation."""
    if prompt_format == "alpaca":
        return prompt(record)
    return tokenizer.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True)


def _response_text(record: dict, tokenizer, prompt_format: str, prompt_text: str) -> str:
    """What the model learns to answer: the output, then the chat template's end of turn (chat_template)."""
    if prompt_format == "alpaca":
        return record["output"]
    conversation = chat_messages(record) + [{"role": "assistant", "content": record["output"]}]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not full.startswith(prompt_text):
        raise TunelabError("data.prompt_format chat_template: the model's chat template renders a conversation that "
                           "does not start with its generation prompt, so the answer cannot be separated for the loss "
                           "(use data.prompt_format: alpaca)")
    return full[len(prompt_text):]


def encode(record: dict, tokenizer, max_length: int, overlength: str,
           prompt_format: str = "alpaca") -> tuple[dict | None, str]:
    """Token ids and labels of one record, and what happened to it: kept, truncated or dropped."""
    prompt_text = render_prompt(record, tokenizer, prompt_format)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(_response_text(record, tokenizer, prompt_format, prompt_text),
                             add_special_tokens=False)["input_ids"]
    if prompt_format == "alpaca":
        response_ids.append(tokenizer.eos_token_id)
    length = len(prompt_ids) + len(response_ids)
    if length <= max_length:
        status = "kept"
    elif overlength == "drop" or len(prompt_ids) >= max_length:
        return None, "dropped"
    else:
        response_ids, status = response_ids[:max_length - len(prompt_ids)], "truncated"
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE] * len(prompt_ids) + response_ids}, status


def run_tokenize(data: DataConfig, tokenizer, data_dir: Path, out: Path) -> dict:
    """Tokenize every split of `data_dir` into `out`; return the per-split counts."""
    check_prompt_format(tokenizer, data.prompt_format, tokenizer.name_or_path)
    stats, tokenized = {}, {}
    for split in SPLITS:
        examples, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
        for record in read_jsonl(data_dir / f"{split}.jsonl"):
            example, status = encode(record, tokenizer, data.max_length, data.overlength, data.prompt_format)
            counts[status] += 1
            if example is not None:
                examples.append(example)
        if not examples:
            fix = "raise it, or set data.overlength: truncate" if data.overlength == "drop" else (
                "every prompt alone is longer: raise it")
            raise TunelabError(f"{data_dir / f'{split}.jsonl'}: all {counts['dropped']} records dropped, longer than "
                               f"data.max_length {data.max_length} tokens ({fix})")
        lengths = [len(e["input_ids"]) for e in examples]
        stats[split] = {**counts, "examples": len(examples), "tokens": sum(lengths), "max_length": max(lengths)}
        if counts["truncated"] or counts["dropped"]:
            log.warning("%s: %d truncated, %d dropped (longer than %d tokens)",
                        split, counts["truncated"], counts["dropped"], data.max_length)
        tokenized[split] = examples
    invalidate(out / "stats.json")
    for split, examples in tokenized.items():  # written only once every split is good
        write_jsonl(out / f"{split}.jsonl", examples)
    write_json(out / "stats.json", stats)
    log.info("tokenized %s into %s", ", ".join(f"{s} {v['examples']:,}" for s, v in stats.items()), out)
    return stats
