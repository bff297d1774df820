"""The whole tiny study through Snakemake, as the README's main command runs it."""

from __future__ import annotations

import csv
import json

import yaml

from tunelab.artifacts import read_json, read_jsonl
from conftest import DEMO, REPO, run_snakemake

RUNS = ["base-tiny", "tiny-lora", "tiny-adalora", "tiny-full"]
EXPORTS = ["tiny-lora.nf4", "tiny-lora.int8", "tiny-lora.pruned_int8"]
PLOTS = ["loss_curves.png", "quality_vs_memory.png", "quality_vs_speed.png", "latency.png"]


def summary(workdir):
    with open(workdir / "results" / "report" / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_has_one_filled_row_per_run(tiny_study):
    rows = summary(tiny_study)
    assert [row["run"] for row in rows] == RUNS + EXPORTS
    for row in rows:
        for column in ("bleu", "rouge_l", "bertscore_f1", "test_loss", "latency_seconds_mean"):
            assert row[column] != "", f"{row['run']}: {column} is empty"
    for row in rows[1:len(RUNS)]:
        for column in ("trainable_parameters", "train_tokens_per_second", "padding_fraction", "peak_memory_gib",
                       "train_wall_seconds", "bleu_delta_vs_base", "bertscore_f1_delta_vs_base"):
            assert row[column] != "", f"{row['run']}: {column} is empty"
        assert 0 <= float(row["bleu"]) <= 100 and 0 <= float(row["bertscore_f1"]) <= 1


def test_fine_tuning_beats_the_untrained_base_on_test_loss(tiny_study):
    rows = {row["run"]: row for row in summary(tiny_study)}
    base = float(rows["base-tiny"]["test_loss"])
    for run in RUNS[1:]:
        assert float(rows[run]["test_loss"]) < base, f"{run} did not learn"
        generations = read_jsonl(tiny_study / "results" / "runs" / run / "generations.jsonl")
        empty = sum(not g["prediction"].strip() for g in generations)
        assert empty <= len(generations) // 10, f"{run}: {empty}/{len(generations)} empty answers"


def test_every_run_directory_is_complete(tiny_study):
    for run in RUNS[1:]:
        run_dir = tiny_study / "results" / "runs" / run
        metrics = read_json(run_dir / "train_metrics.json")
        assert metrics["run"] == run and metrics["steps"] == 150
        for name in ("generations.jsonl", "eval.json", "scores.json", "merge.json", "logs/train.log",
                     "profile/trace.json.gz", "profile/key_averages.txt", "merged/model.safetensors"):
            assert (run_dir / name).is_file(), f"{run}: {name} is missing"
    assert read_json(tiny_study / "results" / "runs" / "tiny-adalora" / "train_metrics.json")[
        "adalora_rank_budget"]["final"] < 12 * 14


def test_quantized_exports_are_scored_next_to_their_run(tiny_study):
    rows = {row["run"]: row for row in summary(tiny_study)}
    merged_size = float(rows["tiny-lora"]["size_on_disk_mb"])
    assert float(rows["tiny-lora.nf4"]["size_on_disk_mb"]) < float(rows["tiny-lora.int8"]["size_on_disk_mb"]) < merged_size
    assert 0.15 < float(rows["tiny-lora.pruned_int8"]["sparsity"]) < 0.25  # prune_amount 0.2 of the channels
    for name in EXPORTS:
        assert rows[name]["export"] == name.split(".")[1] and rows[name]["bertscore_f1"] != ""
        assert float(rows[name]["test_loss"]) < float(rows["base-tiny"]["test_loss"])


def test_report_files_and_plots(tiny_study):
    report = tiny_study / "results" / "report"
    for plot in PLOTS:
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / plot).stat().st_size > 10_000
    markdown = (report / "report.md").read_text()
    assert all(f"| {run} |" in markdown for run in RUNS) and "Best quality" in markdown
    assert (report / "report.html").read_text().count("data:image/png;base64,") == len(PLOTS)


def test_second_run_has_nothing_to_do(tiny_study):
    result = run_snakemake(tiny_study, tiny_study / "tiny.yaml", "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_run_reruns_only_it_and_the_report(tiny_study, tmp_path):
    study = yaml.safe_load((tiny_study / "tiny.yaml").read_text())
    study["runs"][0]["learning_rate"] = 1.0e-3  # tiny-lora (whose exports come from it) only
    changed = tmp_path / "tiny.yaml"
    changed.write_text(yaml.safe_dump(study))
    result = run_snakemake(tiny_study, changed, "-n")
    planned = [line.split("run=")[1] for line in result.stdout.splitlines() if "wildcards: run=" in line]
    assert sorted(set(planned)) == ["tiny-lora", *sorted(EXPORTS)], result.stdout[-3000:]  # its exports follow it
    assert "report" in result.stdout


def test_the_study_runs_on_the_repositorys_alpaca_records(tmp_path):
    study = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    study["data"].update(source=str(DEMO), test_size=24, max_length=128)
    study["models"]["tiny"]["tiny"].update(warmup_steps=100)
    study["train"].update(max_steps=60, eval_every=30)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(study))
    result = run_snakemake(tmp_path, tmp_path / "demo.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_json(tmp_path / "results" / "data" / "stats.json")["records"] == len(json.loads(DEMO.read_text()))
    assert [row["run"] for row in summary(tmp_path)] == RUNS + EXPORTS
    assert read_json(tmp_path / "results" / "tokens" / "tiny" / "stats.json")["train"]["truncated"] > 0


def test_report_renders_without_training_dependencies(tiny_study, tmp_path):
    """A laptop after `dvc pull`: `tunelab report` needs the results files only, not torch or transformers."""
    import subprocess
    import sys

    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'transformers', 'peft', 'bitsandbytes')]"
    command = (f"{blocked}; from tunelab.cli import main; sys.exit(main(['report', '--config', 'tiny.yaml', "
               f"'--runs', 'results/runs', '--out', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", command], cwd=tiny_study, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "summary.csv").read_text() == (tiny_study / "results" / "report" / "summary.csv").read_text()
