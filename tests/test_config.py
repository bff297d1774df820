"""The study schema: the real config validates, and every kind of bad key names itself and the fix."""

from __future__ import annotations

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import check_runtime, load_study
from tunelab.errors import TunelabError
from conftest import REPO

TINY = {key: value for key, value in yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text()).items()
        if key != "exports"}  # its exports name tiny-lora, which most cases below replace


def write_study(tmp_path, **changes) -> str:
    study = {**TINY, **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_real_config_expands_its_grid():
    study = load_study(REPO / "config.yaml")
    names = [r.name for r in study.runs]
    assert len(names) == 16 and len(set(names)) == 16
    assert "qwen7b-adalora-nf4" in names and "qwen1.5b-lora-flash_attention_2" in names
    assert study.run("qwen1.5b-lora-packed").train.packing and not study.run("qwen1.5b-lora-none").train.packing
    qlora = study.run("qwen7b-lora-nf4")
    assert (qlora.model, qlora.train.method, qlora.train.quantization) == ("qwen7b", "lora", "nf4")
    assert qlora.train.precision == "bf16" and qlora.train.lora.r == 16  # study defaults reach every run
    assert study.data.source.startswith("hf:tatsu-lab/alpaca@") and study.data.train_fraction == 0.2
    assert study.models["qwen1.5b"].source.startswith("hf:Qwen/Qwen2.5-1.5B-Instruct@")
    assert study.reference_runs == ["base-qwen1.5b", "base-qwen1.5b.nf4", "base-qwen1.5b.int8",
                                    "base-qwen7b", "base-qwen7b.nf4", "base-qwen7b.int8"]
    assert study.base_row("qwen7b-lora-nf4") == "base-qwen7b.nf4" and study.base_row("qwen1.5b-full") == "base-qwen1.5b"
    assert study.reference_settings("base-qwen7b.nf4").precision == "bf16"
    assert study.reference_settings("base-qwen7b") is None


def test_tiny_study_validates_from_the_cli(capsys):
    assert main(["validate", str(REPO / "studies" / "tiny.yaml")]) == 0
    assert "4 runs, 1 models" in capsys.readouterr().out


BAD = [  # (change to the tiny study, text the error must contain)
    ({"data": {**TINY["data"], "sourc": "x"}}, "data.sourc: unknown key (allowed: source, validation_fraction"),
    ({"data": {**TINY["data"], "test_size": "many"}}, "data.test_size: Input should be a valid integer"),
    ({"data": {**TINY["data"], "validation_fraction": 1.5}}, "data.validation_fraction: Input should be less than 1"),
    ({"data": {**TINY["data"], "source": "data/alpaca.csv"}}, "expected hf:<id>[@<revision>], synthetic:<n> or a .json/.jsonl"),
    ({"runs": [{"name": "a", "model": "tiny", "method": "qlora"}]}, "runs[0] 'a': method: Input should be 'lora', 'adalora' or 'full'"),
    ({"runs": [{"name": "a", "model": "tiny", "quantization": "nf3"}]}, "quantization: Input should be 'none', 'nf4' or 'int8'"),
    ({"runs": [{"name": "a", "model": "tiny", "attention": "flash"}]}, "attention: Input should be 'eager', 'sdpa' or 'flash_attention_2'"),
    ({"runs": [{"name": "a", "model": "tiny", "lora": {"r": 0}}]}, "runs[0] 'a': lora.r: Input should be greater than 0"),
    ({"runs": [{"name": "a", "model": "tiny", "lora": {"rank": 8}}]}, "lora.rank: unknown key (allowed: r, alpha"),
    ({"runs": [{"name": "a", "model": "tiny", "method": "full", "quantization": "nf4"}]},
     "quantization nf4 needs method lora or adalora, got full"),
    ({"runs": [{"name": "a", "model": "tiny", "method": "adalora", "max_steps": 20}]}, "must leave a budgeting phase"),
    ({"runs": [{"name": "a", "model": "llama"}]}, "model 'llama' is not one of models: tiny"),
    ({"runs": [{"name": "a", "model": "tiny"}, {"name": "a", "model": "tiny"}]}, "run name 'a' is used twice"),
    ({"models": {"tiny": {"source": "/no/such/model"}}}, "expected hf:<id>[@<revision>], tiny, an existing model directory"),
    ({"exports": {"formats": ["nf4"], "runs": ["tiny-dora"]}}, "exports.runs: 'tiny-dora' is not a run"),
    ({"exports": {"formats": ["gguf"]}}, "exports.formats.0: Input should be 'nf4', 'int8' or 'pruned_int8'"),
    ({"trian": {}}, "trian: unknown key (allowed: name, data, models, train, runs, generation, metrics, exports, merge, "
                    "quantized_base_rows)"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_is_named(tmp_path, change, message):
    path = write_study(tmp_path, **change)
    with pytest.raises(TunelabError) as error:
        load_study(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_study(tmp_path, runs=[{"name": "a", "model": "tiny", "method": "qlora"},
                                       {"name": "b", "model": "tiny", "lora": {"r": -1}}])
    with pytest.raises(TunelabError) as error:
        load_study(path)
    assert "runs[0] 'a'" in str(error.value) and "runs[1] 'b'" in str(error.value)


def test_grid_names_fill_from_the_axes(tmp_path):
    path = write_study(tmp_path, runs=[{"name": "{model}-{method}-{precision}", "model": "tiny",
                                        "method": ["lora", "full"], "precision": ["fp32", "bf16"]}])
    assert [r.name for r in load_study(path).runs] == ["tiny-lora-fp32", "tiny-lora-bf16", "tiny-full-fp32",
                                                       "tiny-full-bf16"]


def test_flash_attention_without_flash_attn_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    study = load_study(write_study(tmp_path, runs=[{"name": "fa", "model": "tiny", "attention": "flash_attention_2"}]))
    with pytest.raises(TunelabError, match="runs fa need attention flash_attention_2, but flash_attn is not installed"):
        check_runtime(study)


def test_snakemake_stops_before_any_job_on_a_bad_config(tmp_path):
    from conftest import run_snakemake

    path = write_study(tmp_path, runs=[{"name": "a", "model": "tiny", "method": "qlora"}])
    result = run_snakemake(tmp_path, path, "-n")
    assert result.returncode != 0
    assert "runs[0] 'a': method: Input should be 'lora', 'adalora' or 'full'" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()
