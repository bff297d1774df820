"""Exports: nf4/int8 quantization, and structured pruning that removes channels for real, recovers and pays."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from tunelab.artifacts import read_json
from tunelab.config import ExportConfig, Run, TrainConfig
from tunelab.export import run_export
from tunelab.merge import run_merge
from tunelab.prune import prune_structured
from tunelab.train import run_train


def test_pruning_removes_the_dead_channels_and_groups_and_keeps_the_function(tmp_path):
    """Channels and a key-value group that contribute nothing are the ones removed; the pruned model computes the
    same logits, with a stock config (smaller sizes) that plain transformers reloads."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config).eval()
    dead_channels = torch.randperm(128)[:32]
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, dead_channels] = 0  # these channels write nothing
            group = index % 4  # query heads 2*group and 2*group+1 share key-value head `group`
            layer.self_attn.o_proj.weight[:, group * 16:(group + 2) * 16] = 0
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    calibration = [{"input_ids": row.tolist()} for row in torch.randint(0, 97, (4, 16))]
    summary = prune_structured(model, 0.25, calibration)
    assert (summary["intermediate_size"], summary["num_attention_heads"], summary["num_key_value_heads"]) == (96, 6, 3)
    assert summary["pruned_share"] == pytest.approx(1 - summary["parameters_after"] / summary["parameters_before"])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["intermediate_size"], saved["num_attention_heads"], saved["num_key_value_heads"]) == (96, 6, 3)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[1].mlp.up_proj.weight.shape == (96, 64)
    assert reloaded.model.layers[1].self_attn.k_proj.weight.shape == (3 * 8, 64)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


TRAINED = TrainConfig(method="lora", max_steps=8, eval_every=8, micro_batch_size=4, learning_rate=3e-3,
                      group_by_length=False, profile={"steps": 0})


@pytest.fixture(scope="module")
def merged_run(tiny_base, tiny_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_train(Run(name="tiny-lora", model="tiny", train=TRAINED), tiny_base, tiny_tokens / "tokens", out)
    run_merge(out, tiny_tokens / "tokens")
    return out


def test_exports_reload_quantized_and_pruning_shrinks_the_file(merged_run, tiny_tokens, tmp_path, monkeypatch):
    """nf4, int8 and pruned int8 reload with plain transformers; the pruned file is at most (1 - pruned share) x
    the int8 file + 5 %; the pruned model is recovered by a LoRA fine-tune and never saved unquantized."""
    import bitsandbytes as bnb

    saved = []
    save = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, path, **kw: (saved.append((path, getattr(self, "is_quantized", False))),
                                                  save(self, path, **kw))[1])
    settings = ExportConfig(prune_amount=0.25, recovery_steps=6, calibration_examples=4)
    reports = {}
    for export_format, layer in (("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt),
                                 ("pruned_int8", bnb.nn.Linear8bitLt)):
        reports[export_format] = run_export(merged_run / "merged", export_format, settings, tiny_tokens / "tokens",
                                            tmp_path / export_format, TRAINED)
        assert read_json(tmp_path / export_format / "export.json") == reports[export_format]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / export_format / "model")
        assert isinstance(reloaded.model.layers[0].mlp.up_proj, layer)
        assert reports[export_format]["generated_tokens_per_second"] > 0
    assert all(quantized for _, quantized in saved) and len(saved) == 3  # no full-precision copy anywhere
    pruned, int8 = reports["pruned_int8"], reports["int8"]
    assert reloaded.config.intermediate_size == 192 == pruned["intermediate_size"]  # 256 - 25 %
    assert pruned["parameters"] < int8["parameters"] and pruned["pruned_share"] > 0.1
    assert pruned["size_bytes"] <= (1 - pruned["pruned_share"] + 0.05) * int8["size_bytes"]
    assert reports["nf4"]["size_bytes"] < int8["size_bytes"]
    assert pruned["recovery"]["steps"] == 6 and pruned["recovery"]["final_validation_loss"] > 0
    # the recovery trains in the run's batches (not TrainConfig's defaults: 8 rows, grouped by length)
    assert (pruned["recovery"]["micro_batch_size"], pruned["recovery"]["group_by_length"]) == (4, False)


def test_generate_answers_with_an_exported_model(merged_run, tiny_tokens, tmp_path, capsys):
    from tunelab.cli import main
    from conftest import REPO

    run_export(merged_run / "merged", "nf4", ExportConfig(), tiny_tokens / "tokens", tmp_path, TRAINED)
    code = main(["generate", "--config", str(REPO / "studies" / "tiny.yaml"), "--model", str(tmp_path / "model"),
                 "--prompt", "Add the two numbers.", "--prompt", "Repeat the words: red fox"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and '"instruction": "Add the two numbers."' in lines[0]
