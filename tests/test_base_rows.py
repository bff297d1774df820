"""Untrained base rows per quantization: `base-<model>.nf4` is in the DAG, loads its base as QLoRA does (so its
test loss is the quantized base's, not the full-precision one), and every run is reported against its own base row.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, run_snakemake
from tunelab import modeling
from tunelab.artifacts import read_json, read_jsonl, write_json, write_jsonl
from tunelab.batches import mean_loss
from tunelab.cli import main
from tunelab.config import MetricsConfig, load_study
from tunelab.report import run_report
from tunelab.score import score


def _planned(result) -> dict[str, set[str]]:
    """rule -> the `run` wildcards of its jobs, from a dry run's job list."""
    jobs: dict[str, set[str]] = {}
    rule = None
    for line in map(str.strip, result.stdout.splitlines()):  # jobs of a group are indented
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif "wildcards: run=" in line:
            jobs.setdefault(rule, set()).add(line.split("run=")[1].split(",")[0].strip())
    return jobs


def test_the_quantized_base_row_is_in_the_dag_and_can_be_turned_off(tmp_path):
    study = tmp_path / "tiny.yaml"
    shutil.copy(REPO / "studies" / "tiny.yaml", study)
    result = run_snakemake(tmp_path, study, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _planned(result)
    for rule in ("generate", "score"):
        assert {"base-tiny", "base-tiny.nf4"} <= jobs[rule], jobs
    loaded = load_study(study)
    assert loaded.reference_rows == {"base-tiny": ("tiny", "none"), "base-tiny.nf4": ("tiny", "nf4")}
    assert loaded.reference_settings("base-tiny.nf4") == loaded.run("tiny-qlora").train  # QLoRA's own loading
    assert loaded.reference_settings("base-tiny") is None
    assert [loaded.base_row(r) for r in ("tiny-qlora", "tiny-qlora.merged", "tiny-lora", "tiny-lora.nf4")] == [
        "base-tiny.nf4", "base-tiny.nf4", "base-tiny", "base-tiny"]

    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({**yaml.safe_load(study.read_text()), "quantized_base_rows": False}))
    result = run_snakemake(tmp_path, off, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base-tiny.nf4" not in result.stdout and "base-tiny" in _planned(result)["generate"]
    assert load_study(off).base_row("tiny-qlora") == "base-tiny"


@pytest.fixture(scope="module")
def peaked_base(tiny_base, tmp_path_factory):
    """The tiny base with weights 8x the init scale: peaked logits, so 4-bit rounding visibly moves the loss
    (at init scale every logit is near zero and any model's loss is about log(vocab))."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("peaked")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 2:
                weight.mul_(8)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_base / name).is_file():
            shutil.copy(tiny_base / name, out / name)
    write_json(out / "base.json", {"path": str(out), "source": "tiny"})
    return out


def test_the_nf4_base_row_is_the_quantized_base(peaked_base, tiny_tokens, tmp_path):
    """`tunelab generate` of base-m.nf4 loads the base in nf4 as the QLoRA run does: its test loss is that of
    the quantized base, not of the full-precision base-m row."""
    study = tmp_path / "study.yaml"
    study.write_text("name: q\ndata: {source: synthetic:100}\nmodels: {m: {source: tiny}}\n"
                     "runs: [{name: run-l, model: m}, {name: run-q, model: m, quantization: nf4}]\n"
                     "generation: {max_new_tokens: 2, batch_size: 16, latency_requests: 1}\n")
    losses = {}
    for row in ("base-m", "base-m.nf4"):
        assert main(["generate", "--config", str(study), "--run", row, "--base", str(peaked_base),
                     "--data", str(tiny_tokens / "data"), "--tokens", str(tiny_tokens / "tokens"),
                     "--out", str(tmp_path / row)]) == 0
        losses[row] = read_json(tmp_path / row / "eval.json")["test_loss"]
    # the QLoRA run's base as its own generate job loads it under the adapter (generation.loading)
    train = load_study(study).run("run-q").train
    qlora_start = modeling.load_model(read_json(peaked_base / "base.json")["path"], train, for_training=False).eval()
    assert type(qlora_start.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    tokenizer = modeling.load_tokenizer(peaked_base)
    expected = mean_loss(qlora_start, read_jsonl(tiny_tokens / "tokens" / "test.jsonl"), 16, tokenizer.pad_token_id,
                         modeling.autocast(train, torch.device("cpu")))
    assert losses["base-m.nf4"] == pytest.approx(expected, rel=1e-5), losses
    assert abs(losses["base-m.nf4"] - losses["base-m"]) > 0.005, losses  # which 4-bit rounding has moved


RECORDS = 60
REFERENCES = [f"answer {i} is {i + 3}" for i in range(RECORDS)]


def _fake_row(root, run: str, right: float, seed: int, test_loss: float, trained: bool) -> None:
    """A row's results files; quality from tunelab's own scorer on answers right with share `right`."""
    correct = np.random.default_rng(seed).random(RECORDS) < right
    predictions = [ref if ok else "no idea" for ref, ok in zip(REFERENCES, correct)]
    corpus, samples = score(predictions, REFERENCES, MetricsConfig(bertscore=False))
    out = root / "runs" / run
    write_jsonl(out / "sample_scores.jsonl", samples)
    write_json(out / "scores.json", corpus)
    write_json(out / "eval.json", {"test_loss": test_loss, "latency_p50_seconds": 0.01, "empty_predictions": 0})
    if trained:
        write_json(out / "merge.json", {"size_bytes": 1_000_000, "max_logit_difference_vs_trained": 0.001})
        write_json(out / "train_metrics.json", {
            "trainable_parameters": 10, "peak_memory_gib": 1.0, "memory_kind": "cuda", "tokens_per_second": 100.0,
            "padding_fraction": 0.1, "wall_seconds": 1.0, "final_validation_loss": 1.0,
            "loss_curve": [[1, 3.0], [2, 2.0]], "validation_loss_curve": []})


def test_each_run_is_reported_against_its_own_base_row(tmp_path):
    """run-q (nf4) is measured against base-m.nf4, which it beats; run-l against base-m, which it does not beat
    on test loss and only ties on quality: the columns, the verdict line and the table say so."""
    study = tmp_path / "study.yaml"
    study.write_text("name: q\ndata: {source: synthetic:500}\nmodels: {m: {source: tiny}}\n"
                     "runs: [{name: run-l, model: m}, {name: run-q, model: m, quantization: nf4}]\n"
                     "metrics: {bertscore: false}\nmerge: {score: false}\n")
    _fake_row(tmp_path, "base-m", 0.5, 0, 1.0, trained=False)
    _fake_row(tmp_path, "base-m.nf4", 0.05, 1, 3.0, trained=False)
    _fake_row(tmp_path, "run-l", 0.52, 2, 1.2, trained=True)
    _fake_row(tmp_path, "run-q", 0.9, 3, 2.0, trained=True)
    run_report(load_study(study), tmp_path / "runs", tmp_path / "report")
    with open(tmp_path / "report" / "summary.csv", newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["base-m", "base-m.nf4", "run-l", "run-q"]
    assert rows["base-m.nf4"]["quantization"] == "nf4" and rows["base-m.nf4"]["base_row"] == "base-m.nf4"
    assert rows["run-q"]["base_row"] == "base-m.nf4" and rows["run-l"]["base_row"] == "base-m"
    assert rows["run-q"]["beats_base_test_loss"] == "True" and rows["run-l"]["beats_base_test_loss"] == "False"
    assert float(rows["run-q"]["test_loss_delta_vs_base"]) == pytest.approx(-1.0)
    q, l = rows["run-q"], rows["run-l"]
    for metric in ("exact_match", "bleu", "rouge_l"):
        low, high = float(q[f"{metric}_delta_vs_base_ci95_low"]), float(q[f"{metric}_delta_vs_base_ci95_high"])
        assert 0 < low <= float(q[f"{metric}_delta_vs_base"]) <= high and float(q[f"{metric}_p_vs_base"]) < 0.01
        low, high = float(l[f"{metric}_delta_vs_base_ci95_low"]), float(l[f"{metric}_delta_vs_base_ci95_high"])
        assert low < 0 < high and float(l[f"{metric}_p_vs_base"]) > 0.05, (metric, low, high)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "- Lower test loss than its base row: run-q. Not lower: run-l. Runs trained quantized" in markdown
    table = markdown[markdown.index("## Against its base row"):].splitlines()
    assert table[4].startswith("| run | base row | test loss vs base | exact match vs base | BLEU vs base |")
    row_q = next(line for line in table if line.startswith("| run-q |"))
    assert row_q.startswith("| run-q | base-m.nf4 | 2.000 (-1.000, lower) | +")
    assert row_q.count(" better") == 3 and "not separated" not in row_q
    row_l = next(line for line in table if line.startswith("| run-l |"))
    assert row_l.startswith("| run-l | base-m | 1.200 (+0.200, not lower) |") and row_l.count("not separated") == 3
    assert "Against its base row" in (tmp_path / "report" / "report.html").read_text()
