"""Shared fixtures: the repository's own Alpaca-format records (tests/data/instructions.json), a tiny
random-weight Qwen2 base with a BPE tokenizer trained on them, their tokenized splits, and the tiny study
run once through Snakemake, and tiny Qwen2 models trained on a token chain until confident."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import modeling
from tunelab.artifacts import write_json, write_jsonl
from tunelab.config import DataConfig, TinyModelConfig
from tunelab.data import split_records
from tunelab.tokenize import prompt, run_tokenize

REPO = Path(__file__).resolve().parents[1]
# 120 instruction records written for these tests (no dataset's text): varied tasks, with and without input,
# a few long answers (truncation) and non-ASCII text, every answer in one house style ("Field note: ...
# (end of note)") that fine-tuning visibly learns (tests/test_real_model.py)
DEMO = REPO / "tests" / "data" / "instructions.json"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.fixture(scope="session")
def confident_qwen2(tmp_path_factory):
    """`confident_qwen2(shape)` -> (directory, loss curve ends) of a small Qwen2 of `shape` trained on a token chain
    until its predictions are confident (tunelab.kernels.check.confident_base: 150 steps), built once per shape:
    random weights give flat logits on which two correct paths agree or differ by chance alone."""
    built: dict[tuple, tuple[Path, dict]] = {}

    def build(shape: dict) -> tuple[Path, dict]:
        key = tuple(sorted(shape.items()))
        if key not in built:
            import torch

            from tunelab.kernels import check

            path = tmp_path_factory.mktemp("confident") / "base"
            built[key] = path, check.confident_base(path, torch.device("cpu"), steps=150, seq_len=32, shape=shape,
                                                    batch_size=16)
        return built[key]

    return build


@pytest.fixture(scope="session")
def demo_records() -> list[dict]:
    return json.loads(DEMO.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, demo_records) -> Path:
    """A saved 2-layer random-weight Qwen2 + BPE tokenizer (trained on the demo records), as the base stage lays it out."""
    out = tmp_path_factory.mktemp("base")
    tokenizer = modeling.train_tiny_tokenizer([prompt(r) + r["output"] for r in demo_records], vocab_size=1024)
    model = modeling.build_tiny_model(TinyModelConfig(), tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "base.json", {"path": str(out), "source": "tiny"})
    return out


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory, demo_records, tiny_base) -> Path:
    """The demo records split and tokenized for the tiny base (max 96 tokens: the long answers are truncated)."""
    root = tmp_path_factory.mktemp("tokens")
    data = DataConfig(source=str(DEMO), test_size=16, validation_fraction=0.02, max_length=96)
    for split, rows in split_records(demo_records, data).items():
        write_jsonl(root / "data" / f"{split}.jsonl", rows)
    run_tokenize(data, modeling.load_tokenizer(tiny_base), root / "data", root / "tokens")
    return root


def run_snakemake(workdir: Path, study: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The workflow as a user runs it, in `workdir`, on `study`."""
    command = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
               "--config", f"study={study}", *args]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1200)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """The tiny study (studies/tiny.yaml) run once, end to end, through Snakemake."""
    workdir = tmp_path_factory.mktemp("tiny-study")
    study = workdir / "tiny.yaml"
    shutil.copy(REPO / "studies" / "tiny.yaml", study)
    result = run_snakemake(workdir, study)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir
