"""The benchmark entry runs end to end on the CPU: tunelab's path and the plain loop each train a tiny random
Qwen2 and report tokens/s. This proves the script runs; it asserts no timings (those come from a GPU,
BENCHMARKS.md)."""

from __future__ import annotations

import json
import math

from tunelab.bench import main


def test_bench_runs_both_sides_on_a_tiny_model(tmp_path, capsys):
    status = main(["--arch", "tiny", "--method", "lora", "--quantization", "none", "--attention", "sdpa",
                   "--steps", "2", "--repeat", "2", "--control", "--batch-size", "2", "--seq-len", "32", "--model-root", str(tmp_path / "models"),
                   "--out", str(tmp_path / "out")])
    assert status == 0
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = bench["rows"]
    assert [row["name"] for row in rows] == ["tiny lora none sdpa"] * 2
    for side in ("tunelab", "baseline", "control"):
        result = rows[0][side]
        assert "error" not in result, result.get("error")
        assert result["tokens_per_second"] > 0 and result["fit_tokens_per_second"] > 0
        assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
        assert result["trainable_parameters"] > 0
    assert rows[0]["tunelab"]["trainable_parameters"] == rows[0]["baseline"]["trainable_parameters"]
    [pooled] = bench["pooled"]  # the repeated case once, from both runs' step periods
    assert pooled["runs"] == 2 and pooled["run_ratios"] == [row["speed_ratio"] for row in rows]
    assert pooled["tunelab_tokens_per_second"] > 0 and pooled["baseline_tokens_per_second"] > 0
    assert pooled["control_run_ratios"] == [row["control_ratio"] for row in rows] and pooled["control_ratio"] > 0
    printed = capsys.readouterr().out
    assert "| tiny lora none sdpa |" in printed and "| tiny lora none sdpa | 2 |" in printed


def test_bench_packs_examples_of_varied_lengths(tmp_path):
    """--variable-lengths --packing on: tunelab's side trains on padding-free rows, the plain loop on padded ones."""
    status = main(["--arch", "tiny", "--method", "lora", "--quantization", "none", "--attention", "sdpa",
                   "--variable-lengths", "--packing", "off", "on", "--steps", "3", "--batch-size", "4",
                   "--seq-len", "64", "--model-root", str(tmp_path / "models"), "--out", str(tmp_path / "out")])
    assert status == 0
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {row["name"]: row for row in bench["rows"]}
    assert set(rows) == {"tiny lora none sdpa", "tiny lora none sdpa packed"}
    assert bench["settings"]["variable_lengths"]
    for row in rows.values():
        assert "error" not in row["tunelab"] and "error" not in row["baseline"]
        assert row["tunelab"]["tokens_per_second"] == row["tunelab"]["fit_tokens_per_second"] > 0
        assert row["baseline"]["tokens_per_second"] > 0
    assert rows["tiny lora none sdpa packed"]["tunelab"]["padding_fraction"] == 0
