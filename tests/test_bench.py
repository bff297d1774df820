"""The benchmark entry runs end to end on the CPU: tunelab's path and the plain loop each train a tiny random
Qwen2 and report tokens/s. This proves the script runs; it asserts no timings (those come from a GPU,
BENCHMARKS.md)."""

from __future__ import annotations

import json
import math

from tunelab.bench import main



def load_render():
    """benchmarks/render.py, the script that writes BENCHMARKS.md, as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("render", Path(__file__).parents[1] / "benchmarks" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    return render

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


def test_results_rows_have_issue_12_fields_and_render_into_benchmarks(tmp_path):
    """bench.records turns measured rows (and a peer's lines) into results.jsonl rows; render.py builds the
    Markdown section from them, ratios within the call, and replaces only its own section."""
    from dataclasses import asdict

    from tunelab.bench import Case, flops_per_token, records

    # Qwen2.5-7B: 4 x 7.07e9 matmul weights + causal attention at 1,024 tokens
    assert abs(flops_per_token("qwen2.5-7b", "lora", 1024) / 1e9 - 28.90) < 0.01
    assert flops_per_token("qwen2.5-7b", "full", 1024) > flops_per_token("qwen2.5-7b", "lora", 1024) * 1.4
    side = lambda seconds, peak: {"tokens_per_step": 4096, "step_seconds": seconds, "peak_memory_gib": peak,  # noqa: E731
                                  "peak_reserved_gib": peak + 1, "kernels": "liger", "load_seconds": 3.0,
                                  "first_step_seconds": 0.5}
    rows = [{"case": asdict(Case("qwen2.5-7b", "lora", "nf4", "sdpa", kernels="liger")),
             "tunelab": side([0.4] * 6, 10.0), "baseline": side([0.5] * 6, 17.0)}]
    peer = {"arch": "qwen2.5-7b", "method": "qlora", "batch_size": 4, "tokens_per_step": 4096,
            "tokens_per_second": 4096 / 0.25, "step_seconds": [0.25] * 6, "peak_memory_gib": 7.0,
            "peak_reserved_gib": 7.5, "settings": {"gradient_checkpointing": "unsloth"}, "import_seconds": 30.0,
            "load_seconds": 9.0, "first_steps_seconds": [25.0, 0.3, 0.3], "versions": {"unsloth": "x"}}
    env = {"device_name": "NVIDIA H200", "date": "2026-11-30 20:00 UTC", "commit": "abc1234"}
    out = records(rows, [peer], call="c1", env=env, batch_size=4, seq_len=1024, windows=3)
    fields = {"side", "call", "card", "gpus", "model", "method", "quantization", "batch", "seq", "tok_s", "tok_s_range",
              "peak_gib", "reserved_gib", "mfu", "repeats", "commit", "date", "kernels", "checkpointing"}
    assert [r["side"] for r in out] == ["tunelab", "plain", "unsloth"]
    assert all(fields <= set(r) for r in out)
    assert out[0]["tok_s"] == 4096 / 0.4 and out[0]["repeats"] == 3 and out[0]["tok_s_range"] == [10240.0, 10240.0]
    assert abs(out[0]["mfu"] - 4096 / 0.4 * flops_per_token("qwen2.5-7b", "lora", 1024) / 790e12) < 1e-4
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in out))
    render = load_render()
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Title\nold hand-written text\n")
    assert render.main(["--results", str(results), "--checks", str(tmp_path / "none.jsonl"),
                        "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    assert "| 10,240 |" in text and "| 1.250 / 0.59 | 0.625 / 1.43 |" in text  # ÷ plain, ÷ unsloth (tok/s / GiB)
    assert text.endswith("old hand-written text\n") and text.count(render.BEGIN) == 1
    assert render.main(["--results", str(results), "--checks", str(tmp_path / "none.jsonl"),
                        "--markdown", str(markdown), "--check"]) == 0


def test_generation_rows_render_in_their_own_table_with_the_ratio_to_plain(tmp_path):
    """Rows with `task: generation` (tunelab.generation.bench) go to the generation table, not the training one."""
    common = dict(task="generation", call="g1", card="H200", gpus=1, model="qwen2.5-7b", method="greedy",
                  quantization="none", attention="sdpa", batch=32, seq=128, new_tokens=256, new_tokens_min=256,
                  new_tokens_max=256, repeats=3, peak_gib=15.0, reserved_gib=16.0, one_time={"first_call_s": 20.0},
                  commit="abc", date="2026-12-01")
    rows = [dict(common, side="plain", engine="generate (dynamic cache)", tok_s=1000.0, tok_s_range=[990.0, 1010.0]),
            dict(common, side="tunelab", engine="static", tok_s=4500.0, tok_s_range=[4400.0, 4600.0])]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    render = load_render()
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Title\n")
    assert render.main(["--results", str(results), "--checks", str(tmp_path / "none.jsonl"), "--generation-checks",
                        str(tmp_path / "none.jsonl"), "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    generation = text.split("## Evaluation generation")[1]
    assert "| qwen2.5-7b | 32 | 128 + 256 | tunelab | static | 4,500 | 4,400–4,600 | 3 | 256–256 |" in generation
    assert "| 4.50× |" in generation and "4,500" not in text.split("## Evaluation generation")[0]


def test_budget_search_finds_the_largest_batch_that_fits():
    """Doubling until out of memory, then halving the gap; any other error ends the search."""
    from tunelab.budget import largest_fitting

    def probe(largest):
        return lambda batch: {} if batch <= largest else {"error": "OutOfMemoryError: CUDA out of memory. Tried ..."}
    tried = lambda results: [(r["batch"], r["fits"]) for r in results]  # noqa: E731
    assert tried(largest_fitting(probe(27), 16, 256)) == [(16, True), (32, False), (24, True)]
    assert tried(largest_fitting(probe(27), 16, 256, resolution=0.25)) == [(16, True), (32, False), (24, True),
                                                                          (28, False)]
    assert tried(largest_fitting(probe(100), 16, 256)) == [(16, True), (32, True), (64, True), (128, False),
                                                           (96, True)]
    assert tried(largest_fitting(probe(8), 16, 256)) == [(16, False), (8, True), (12, False), (10, False)]
    assert tried(largest_fitting(probe(1000), 16, 64)) == [(16, True), (32, True), (64, True)]
    assert tried(largest_fitting(lambda batch: {"error": "ValueError: bad"}, 16, 256)) == [(16, False)]


def test_budget_rows_record_the_largest_fitting_batch_and_every_probe(tmp_path):
    from dataclasses import asdict

    from tunelab.bench import Case, budget_records

    fits = lambda batch, period, peak: {"batch": batch, "fits": True, "tokens_per_step": batch * 1024,  # noqa: E731
                                        "step_seconds": [period] * 5, "tokens_per_second": batch * 1024 / period,
                                        "peak_memory_gib": peak, "peak_reserved_gib": peak + 0.5, "kernels": "liger",
                                        "checkpointing": "offload", "load_seconds": 3.0, "first_step_seconds": 1.0}
    oom = lambda batch: {"batch": batch, "fits": False, "error": "OutOfMemoryError: CUDA out of memory"}  # noqa: E731
    peer = dict(fits(24, 2.0, 13.0), settings={"gradient_checkpointing": "unsloth"}, import_seconds=30.0,
                first_steps_seconds=[20.0, 2.0, 2.0])
    budgets = [{"case": asdict(Case("qwen2.5-7b", "lora", "nf4", "sdpa", kernels="liger")), "budget_gib": 15.0,
                "memory_fraction": 0.1068, "tunelab": [fits(16, 1.6, 11.0), oom(32), fits(24, 2.5, 14.2)],
                "peer": [fits(16, 1.4, 10.0), oom(32), peer]}]
    env = {"device_name": "NVIDIA H200", "date": "2026-12-01 00:00 UTC", "commit": "abc1234"}
    rows = budget_records(budgets, call="c2", env=env, seq_len=1024)
    assert [(r["side"], r["batch"], r["seq"]) for r in rows] == [("tunelab", 24, 1024), ("unsloth", 24, 1024)]
    assert rows[0]["tok_s"] == 24 * 1024 / 2.5 and rows[0]["peak_gib"] == 14.2 and rows[0]["memory_budget_gib"] == 15
    assert [p["batch"] for p in rows[0]["probes"]] == [16, 32, 24] and rows[0]["probes"][1]["fits"] is False
    assert rows[0]["checkpointing"] == "offload" and rows[1]["checkpointing"] == "unsloth (offloaded)"
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    render = load_render()
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Title\n")
    assert render.main(["--results", str(results), "--checks", str(tmp_path / "none.jsonl"),
                        "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    # the budget table: largest batch x seq, tokens per micro-batch, tok/s, and tunelab against Unsloth
    assert "| qwen2.5-7b | lora | nf4 | 15 | tunelab | 24 × 1024 | 24,576 | 9,830 |" in text
    assert "16 ✓, 32 ✗, 24 ✓" in text and "| 1.00 / 0.800 |" in text
    assert "### Call `c2`" not in text  # budget rows stay out of the fixed-shape tables


def test_checkpoint_layers_reaches_tunelabs_config_and_names_the_case():
    from tunelab.bench import Case, _train_config

    case = Case("tiny", "lora", "nf4", "sdpa", kernels="liger", offload="on", checkpoint_layers=14)
    assert _train_config(case, 5, 4).checkpoint_layers == 14 and case.name.endswith("checkpoint_layers=14")
    assert _train_config(Case("tiny", "lora", "none", "sdpa"), 5, 4).checkpoint_layers is None
