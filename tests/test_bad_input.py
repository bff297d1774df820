"""Bad input: each case runs through the real CLI (`tunelab <stage>`), exits 2 with one error line that names the
file and the row or key, and leaves no output behind. One row per case, as in PEFT's TEST_CASES."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tunelab import modeling
from tunelab.artifacts import read_json
from tunelab.cli import main
from tunelab.synthetic import alpaca_records
from tunelab.tokenize import prompt

RECORDS = alpaca_records(40)


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def without(index: int, key: str) -> list[dict]:
    return [{k: v for k, v in r.items() if not (i == index and k == key)} for i, r in enumerate(RECORDS)]


def replaced(index: int, **values) -> list[dict]:
    return [{**r, **values} if i == index else r for i, r in enumerate(RECORDS)]


BROKEN_LINE = jsonl(RECORDS).splitlines(keepends=True)
BROKEN_LINE[2] = b'{"instruction": "Add.", "output": "3"\n'  # line 3: no closing brace
LATIN1 = jsonl(replaced(3, output="cafe")).replace(b'"cafe"', '"caf\u00e9"'.encode("latin-1"))  # line 4

# (id, stage, data file name and bytes, study changes, what the one error line must say)
CASES = [
    ("malformed-json", "data", ("data.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output"}]'),
     {}, ["data.json", "line 2", "malformed JSON"]),
    ("malformed-jsonl-line", "data", ("data.jsonl", b"".join(BROKEN_LINE)), {},
     ["data.jsonl", "line 3", "malformed JSON"]),
    ("missing-instruction", "data", ("data.jsonl", jsonl(without(2, "instruction"))), {},
     ["data.jsonl", "record 2", "missing 'instruction'"]),
    ("missing-output", "data", ("data.json", json.dumps(without(5, "output")).encode()), {},
     ["data.json", "record 5", "missing 'output'"]),
    ("empty-output", "data", ("data.jsonl", jsonl(replaced(7, output="  "))), {},
     ["data.jsonl", "record 7", "empty 'output'"]),
    ("output-not-a-string", "data", ("data.jsonl", jsonl(replaced(1, output=["a"]))), {},
     ["data.jsonl", "record 1", "'output' must be a string, got list"]),
    ("non-utf8", "data", ("data.jsonl", LATIN1), {}, ["data.jsonl", "line 4", "not UTF-8"]),
    ("empty-dataset", "data", ("data.json", b"[]"), {}, ["data.json", "empty"]),
    ("dataset-file-missing", "data", None, {"data": {"source": "{tmp}/nope.jsonl"}},
     ["data.source", "nope.jsonl", "file not found"]),
    ("validation-fraction-0", "data", None, {"data": {"validation_fraction": 0}},
     ["study.yaml", "data.validation_fraction", "greater than 0", "(got 0)"]),
    ("validation-fraction-1.5", "data", None, {"data": {"validation_fraction": 1.5}},
     ["study.yaml", "data.validation_fraction", "less than 1", "(got 1.5)"]),
    ("train-fraction-0", "data", None, {"data": {"train_fraction": 0}},
     ["study.yaml", "data.train_fraction", "greater than 0"]),
    ("unknown-method", "data", None, {"runs": [{"name": "r", "model": "tiny", "method": "qlora"}]},
     ["study.yaml", "runs[0] 'r'", "method", "'lora', 'adalora' or 'full'", "(got 'qlora')"]),
    ("unknown-quantization", "data", None, {"runs": [{"name": "r", "model": "tiny", "quantization": "nf3"}]},
     ["study.yaml", "runs[0] 'r'", "quantization", "'none', 'nf4' or 'int8'", "(got 'nf3')"]),
    ("unknown-attention", "data", None, {"runs": [{"name": "r", "model": "tiny", "attention": "flash3"}]},
     ["study.yaml", "runs[0] 'r'", "attention", "'flash_attention_2'", "(got 'flash3')"]),
    ("rank-0", "data", None, {"runs": [{"name": "r", "model": "tiny", "lora": {"r": 0}}]},
     ["study.yaml", "runs[0] 'r'", "lora.r", "greater than 0", "(got 0)"]),
    ("rank-negative", "data", None, {"train": {"adalora": {"init_r": -2}}},
     ["study.yaml", "runs[0] 'r'", "adalora.init_r", "greater than 0", "(got -2)"]),
    ("model-path-missing", "data", None, {"models": {"tiny": {"source": "{tmp}/no-such-model"}}},
     ["study.yaml", "models.tiny.source", "existing model directory", "no-such-model"]),
    ("checkpoint-every-negative", "data", None, {"train": {"checkpoint_every": -1}},
     ["study.yaml", "runs[0] 'r'", "checkpoint_every", "greater than or equal to 0"]),
    ("all-dropped", "tokenize", None, {"data": {"max_length": 16, "overlength": "drop"}},
     ["train.jsonl", "all 30 records dropped", "data.max_length 16"]),
    ("nf4-without-bitsandbytes", "train", None, {"runs": [{"name": "r", "model": "tiny", "quantization": "nf4"}]},
     ["study.yaml", "runs r", "nf4/int8 quantization", "bitsandbytes is not installed"]),
    ("nf4-without-a-supported-device", "train", None,
     {"runs": [{"name": "r", "model": "tiny", "quantization": "nf4"}]},
     ["quantization nf4", "can't run on this machine's device cpu", "quantization: none"]),
]


def write_study(tmp_path, changes: dict, source: str) -> str:
    study = {"name": "bad", "data": {"source": source, "test_size": 5, "validation_fraction": 0.1},
             "models": {"tiny": {"source": "tiny"}}, "train": {"max_steps": 4, "profile": {"steps": 0}},
             "runs": [{"name": "r", "model": "tiny"}]}
    for key, value in changes.items():
        study[key] = {**study[key], **value} if isinstance(value, dict) and key not in ("models",) else value
    text = yaml.safe_dump(study).replace("{tmp}", str(tmp_path))
    (tmp_path / "study.yaml").write_text(text)
    return str(tmp_path / "study.yaml")


@pytest.mark.parametrize("name, stage, data_file, changes, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, capsys, monkeypatch, tiny_base, tiny_tokens,
                                                    name, stage, data_file, changes, expected):
    source = str(tmp_path / data_file[0]) if data_file else str(tmp_path / "good.jsonl")
    (tmp_path / "good.jsonl").write_bytes(jsonl(RECORDS))
    if data_file:
        (tmp_path / data_file[0]).write_bytes(data_file[1])
    config, out = write_study(tmp_path, changes, source), tmp_path / "out"
    arguments = {"data": [],
                 "tokenize": ["--base", str(tiny_base), "--data", str(tiny_data(tmp_path))],
                 "train": ["--run", "r", "--base", str(tiny_base), "--tokens", str(tiny_tokens / "tokens")]}[stage]
    if name == "nf4-without-bitsandbytes":  # the environment lacks the package; the stage runs as it is
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda package, *args: None if package == "bitsandbytes" else find_spec(package, *args))
    if name == "nf4-without-a-supported-device":  # a bitsandbytes build for other devices only
        import bitsandbytes

        monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)

    code = main([stage, "--config", config, *arguments, "--out", str(out)])

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"tunelab {stage}: error:")]
    assert code == 2
    assert len(errors) == 1, errors
    for fragment in expected:
        assert fragment.replace("{tmp}", str(tmp_path)) in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert not out.exists() or not any(out.rglob("*")), f"partial output: {list(out.rglob('*'))}"


def tiny_data(tmp_path):
    """A data stage's directory of 30/5/5 records whose prompts are each longer than 16 tokens."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split, rows in {"train": RECORDS[:30], "validation": RECORDS[30:35], "test": RECORDS[35:]}.items():
        (data / f"{split}.jsonl").write_bytes(jsonl(rows))
    return data


@pytest.mark.parametrize("overlength", ["truncate", "drop"])
def test_overlength_examples_are_truncated_or_dropped_and_counted(tmp_path, tiny_base, overlength):
    """Not an error: longer examples follow data.overlength, and stats.json counts them."""
    long = [{**r, "output": " ".join(["apple river stone"] * 30)} if i % 3 == 0 else r for i, r in enumerate(RECORDS)]
    (tmp_path / "data").mkdir()
    for split, rows in {"train": long[:30], "validation": long[30:35], "test": long[35:]}.items():
        (tmp_path / "data" / f"{split}.jsonl").write_bytes(jsonl(rows))
    tokenizer = modeling.load_tokenizer(tiny_base)
    limit = max(len(tokenizer(prompt(r) + r["output"])["input_ids"]) + 1 for r in RECORDS)  # every short one fits
    config = write_study(tmp_path, {"data": {"max_length": limit, "overlength": overlength}}, str(tmp_path / "x.jsonl"))

    assert main(["tokenize", "--config", config, "--base", str(tiny_base), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out")]) == 0

    train = read_json(tmp_path / "out" / "stats.json")["train"]
    assert train["examples"] == 30 - train["dropped"] and train["max_length"] <= limit
    if overlength == "truncate":
        assert train["truncated"] == 10 and train["dropped"] == 0
    else:
        assert train["dropped"] == 10 and train["truncated"] == 0
