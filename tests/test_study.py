"""The whole tiny study through Snakemake, as the README's main command runs it, and the effect it promises:
fine-tuning turns a base that solves none of the tasks into runs that solve them."""

from __future__ import annotations

import csv
import math
from collections import Counter
import json

import numpy as np
import pytest
import yaml

from tunelab.artifacts import read_json, read_jsonl
from conftest import DEMO, REPO, run_snakemake

BASES = ["base-tiny", "base-tiny.nf4"]  # the untrained base, and it in nf4 as tiny-qlora loads it
RUNS = [*BASES, "tiny-lora", "tiny-qlora", "tiny-adalora", "tiny-full"]
TRAINED = RUNS[len(BASES):]
FAMILIES = {"copy", "reverse", "shift", "add"}
MERGED = [f"{run}.merged" for run in TRAINED]
EXPORTS = ["tiny-lora.nf4", "tiny-lora.int8", "tiny-lora.pruned_int8"]
PLOTS = ["loss_curves.png", "quality_vs_memory.png", "quality_vs_speed.png", "latency.png"]


def exact_matches(workdir, run) -> list[tuple[str, bool]]:
    """(task family, whitespace-normalised prediction == reference) of each test record, in test order."""
    rows = read_jsonl(workdir / "results" / "runs" / run / "generations.jsonl")
    return [(row["category"], " ".join(row["prediction"].split()) == " ".join(row["reference"].split()))
            for row in rows]


def exact_match_by_family(matches: list[tuple[str, bool]]) -> dict[str, float]:
    """Exact match in percent per task family."""
    by_family: dict[str, list[bool]] = {}
    for family, correct in matches:
        by_family.setdefault(family, []).append(correct)
    return {family: 100 * sum(hits) / len(hits) for family, hits in by_family.items()}


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign (McNemar) test on the discordant pairs: P(>= wins of wins+losses) under p=0.5."""
    pairs = wins + losses
    return sum(math.comb(pairs, k) for k in range(wins, pairs + 1)) / 2 ** pairs


def summary(workdir):
    with open(workdir / "results" / "report" / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_has_one_filled_row_per_run(tiny_study):
    rows = summary(tiny_study)
    assert [row["run"] for row in rows] == RUNS + MERGED + EXPORTS
    for row in rows:
        for column in ("exact_match", "exact_match_ci95_low", "rouge_l", "bertscore_f1", "test_loss"):
            assert row[column] != "", f"{row['run']}: {column} is empty"
        assert "bleu" not in row, "the tiny study turns BLEU off (one-token answers)"
    for row in rows[len(BASES):len(RUNS)]:  # the trained runs
        for column in ("trainable_parameters", "train_tokens_per_second", "padding_fraction", "peak_memory_gib",
                       "train_wall_seconds", "rouge_l_delta_vs_base", "bertscore_f1_delta_vs_base", "p_vs_base"):
            assert row[column] != "", f"{row['run']}: {column} is empty"
        assert all(0 <= float(row[metric]) <= 100 for metric in ("exact_match", "rouge_l", "bertscore_f1"))
        # the training cost: GPUs x train wall time (0 GPUs and 0 GPU-hours where it trained on the CPU)
        assert abs(float(row["gpu_hours"]) - int(row["gpus"]) * float(row["train_wall_seconds"]) / 3600) < 1e-5, row


def test_fine_tuning_beats_the_untrained_base_on_test_loss(tiny_study):
    rows = {row["run"]: row for row in summary(tiny_study)}
    base = float(rows["base-tiny"]["test_loss"])
    assert float(rows["base-tiny.nf4"]["test_loss"]) != base  # 4-bit rounding moves the untrained base
    for run in TRAINED:
        assert float(rows[run]["test_loss"]) < base, f"{run} did not learn"
        assert rows[run]["beats_base_test_loss"] == "True", f"{run} does not beat {rows[run]['base_row']}"
        assert rows[run]["base_row"] == ("base-tiny.nf4" if run == "tiny-qlora" else "base-tiny")
        generations = read_jsonl(tiny_study / "results" / "runs" / run / "generations.jsonl")
        empty = sum(not g["prediction"].strip() for g in generations)
        assert empty <= len(generations) // 10, f"{run}: {empty}/{len(generations)} empty answers"


def test_every_family_is_tested_and_tagged_through_generation(tiny_study):
    test = read_jsonl(tiny_study / "results" / "data" / "test.jsonl")
    counts = Counter(record["category"] for record in test)
    assert set(counts) == FAMILIES and min(counts.values()) >= 20, counts  # enough for a per-family claim
    for run in RUNS + EXPORTS:
        assert [family for family, _ in exact_matches(tiny_study, run)] == [r["category"] for r in test], run


def test_the_untrained_base_solves_no_family(tiny_study):
    base = exact_match_by_family(exact_matches(tiny_study, "base-tiny"))
    assert set(base) == FAMILIES and max(base.values()) <= 5, base


def test_the_best_run_solves_every_family(tiny_study):
    scores = {run: exact_matches(tiny_study, run) for run in TRAINED}
    best = max(TRAINED, key=lambda run: sum(correct for _, correct in scores[run]))
    by_family = exact_match_by_family(scores[best])
    assert set(by_family) == FAMILIES and min(by_family.values()) >= 80, (best, by_family)


def test_every_trained_run_beats_the_base_in_a_paired_test(tiny_study):
    base = [correct for _, correct in exact_matches(tiny_study, "base-tiny")]
    for run in TRAINED:
        trained = [correct for _, correct in exact_matches(tiny_study, run)]
        wins = sum(t and not b for t, b in zip(trained, base))
        losses = sum(b and not t for t, b in zip(trained, base))
        assert sign_test_p(wins, losses) < 0.05, f"{run}: {wins} wins, {losses} losses vs the base"


def test_every_run_directory_is_complete(tiny_study):
    steps = yaml.safe_load((tiny_study / "tiny.yaml").read_text())["train"]["max_steps"]
    for run in TRAINED:
        run_dir = tiny_study / "results" / "runs" / run
        metrics = read_json(run_dir / "train_metrics.json")
        assert metrics["run"] == run and metrics["steps"] == steps
        for name in ("generations.jsonl", "eval.json", "scores.json", "merge.json", "logs/train.log",
                     "profile/trace.json.gz", "profile/key_averages.txt", "merged/model.safetensors"):
            assert (run_dir / name).is_file(), f"{run}: {name} is missing"
    assert read_json(tiny_study / "results" / "runs" / "tiny-qlora" / "train_metrics.json")[
        "config"]["quantization"] == "nf4"
    adalora = read_json(tiny_study / "results" / "runs" / "tiny-adalora" / "train_metrics.json")
    assert adalora["adalora_rank_budget"]["final"] < adalora["adalora_rank_budget"]["initial"]


def test_quantized_exports_are_scored_next_to_their_run(tiny_study):
    rows = {row["run"]: row for row in summary(tiny_study)}
    merged_size = float(rows["tiny-lora"]["size_on_disk_mb"])
    assert float(rows["tiny-lora.nf4"]["size_on_disk_mb"]) < float(rows["tiny-lora.int8"]["size_on_disk_mb"]) < merged_size
    pruned, int8 = rows["tiny-lora.pruned_int8"], rows["tiny-lora.int8"]
    share = float(pruned["pruned_share"])  # 20 % of the MLP channels: about 9 % of all parameters
    assert 0.05 < share < 0.2
    assert float(pruned["size_on_disk_mb"]) <= (1 - share + 0.05) * float(int8["size_on_disk_mb"])
    for name in EXPORTS:
        assert rows[name]["export"] == name.split(".")[1] and rows[name]["bertscore_f1"] != ""
        assert float(rows[name]["test_loss"]) < float(rows["base-tiny"]["test_loss"])


def paired_interval(workdir, row: str, reference: str, metric: str) -> tuple[float, float, float]:
    """Mean per-record difference `row` - `reference` in `metric` over the test records and its paired bootstrap
    95 % interval (2,000 resamples, seeded)."""
    runs = workdir / "results" / "runs"
    scores, references = (read_jsonl(runs / name / "sample_scores.jsonl") for name in (row, reference))
    differences = np.array([p[metric] - q[metric] for p, q in zip(scores, references, strict=True)])
    means = differences[np.random.default_rng(0).integers(0, len(differences), (2000, len(differences)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(differences.mean()), float(low), float(high)


def test_pruned_export_ties_the_int8_export(tiny_study):
    """After its recovery fine-tune the pruned export is not worse than the unpruned int8 export: the paired
    bootstrap interval of the per-record BERTScore F1 and ROUGE-L differences (95 %) reaches 0 or above.
    Measured 2026-12-01: BERTScore [-1.77, 0.16], ROUGE-L [-4.17, 2.50]; pruned without recovery (recovery_steps 0)
    it fails: BERTScore [-1.48, -0.25], ROUGE-L [-10.0, -1.67] (issue 14)."""
    for metric in ("bertscore_f1", "rouge_l"):
        mean, low, high = paired_interval(tiny_study, "tiny-lora.pruned_int8", "tiny-lora.int8", metric)
        print(f"{metric}: pruned - int8 = {mean:.4f}, 95 % interval [{low:.4f}, {high:.4f}]")
        assert high >= 0, f"{metric}: the pruned export is worse than int8 (interval [{low:.4f}, {high:.4f}])"


def test_merged_models_are_scored_as_rows_and_equal_their_runs(tiny_study):
    """<run>.merged rows: the merged model generated and scored like a run; merging an fp32 run costs nothing."""
    rows = {row["run"]: row for row in summary(tiny_study)}
    for name in MERGED:
        run, merged = rows[name.removesuffix(".merged")], rows[name]
        assert merged["export"] == "merged" and merged["bertscore_f1"] != ""
        assert float(merged["merge_max_logit_difference"]) < 1e-3
        if run["quantization"] == "none":
            assert float(merged["test_loss"]) == pytest.approx(float(run["test_loss"]), rel=1e-4)


# The QLoRA row is evaluated as it trained (fp32 on the plain 4-bit layout): bitsandbytes' CPU inference path,
# which computes in bf16 on an AVX512-BF16 CPU, made its test loss 1 % lower than its exact merge's (issue 14).
def test_the_qlora_merge_scores_as_its_trained_run(tiny_study):
    rows = {row["run"]: row for row in summary(tiny_study)}
    assert float(rows["tiny-qlora.merged"]["test_loss"]) == pytest.approx(float(rows["tiny-qlora"]["test_loss"]),
                                                                          rel=1e-4)
    assert exact_matches(tiny_study, "tiny-qlora.merged") == exact_matches(tiny_study, "tiny-qlora")


def test_report_files_and_plots(tiny_study):
    report = tiny_study / "results" / "report"
    for plot in PLOTS:
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / plot).stat().st_size > 10_000
    markdown = (report / "report.md").read_text()
    assert all(f"| {run} |" in markdown for run in RUNS)
    assert markdown.startswith("# Study tiny\n\n- Best exact match: ") or markdown.startswith(
        "# Study tiny\n\n- No single best exact match: ")
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
    assert sorted(set(planned)) == sorted(["tiny-lora", "tiny-lora.merged", *EXPORTS]), result.stdout[-3000:]
    assert "report" in result.stdout


def test_the_study_runs_on_the_repositorys_alpaca_records(tmp_path):
    study = yaml.safe_load((REPO / "studies" / "tiny.yaml").read_text())
    study["data"].update(source=str(DEMO), test_size=24, max_length=128)
    study["models"]["tiny"]["tiny"].update(warmup_steps=100)
    study["train"].update(max_steps=60, eval_every=30)
    for run in study["runs"]:
        if run["method"] == "adalora":  # its schedule must leave a budgeting phase within 60 steps
            run["adalora"].update(tinit=10, tfinal=20)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(study))
    result = run_snakemake(tmp_path, tmp_path / "demo.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    assert read_json(tmp_path / "results" / "data" / "stats.json")["records"] == len(json.loads(DEMO.read_text()))
    assert [row["run"] for row in summary(tmp_path)] == RUNS + MERGED + EXPORTS
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


def test_synthetic_families_are_correct_input_dependent_and_keep_their_category(tmp_path):
    """The study's data, without the study: every family's answer follows from its input, no family answers
    with a constant, records are unique, and `category` survives the data stage's split."""
    from tunelab.config import DataConfig
    from tunelab.data import run_data
    from tunelab.synthetic import alpaca_records

    records = alpaca_records(400)
    assert len({(r["instruction"], r["input"], r["output"]) for r in records}) == 400
    for record in records:
        operand = record["input"] or record["instruction"].removeprefix("Repeat the number ").removesuffix(".")
        answer = {"copy": lambda: operand, "reverse": lambda: operand[::-1],
                  "shift": lambda: "".join(str((int(d) + 1) % 10) for d in operand),
                  "add": lambda: str(int(operand.split(" + ")[0]) + int(operand.split(" + ")[1]))}[record["category"]]
        assert record["output"] == answer(), record
    answers = Counter((r["category"], r["output"]) for r in records)
    assert all(count <= 10 for count in answers.values()), answers.most_common(3)
    run_data(DataConfig(source="synthetic:400", test_size=40), tmp_path)
    assert {r["category"] for r in read_jsonl(tmp_path / "test.jsonl")} == FAMILIES


def test_the_warm_up_text_holds_the_skills_but_not_the_tasks():
    """The base's warm-up documents practise every skill, but never show the Alpaca prompt or one of the
    study's instructions: what the base lacks is what fine-tuning teaches."""
    from tunelab.synthetic import alpaca_records, generic_text

    documents = generic_text(400)
    text = "\n".join(documents)
    for cue in ("again", "backwards", "plus one", "sum"):
        assert f"### Task: {cue}" in text, cue
    for marker in ("### Instruction", "### Response", "Below is an instruction"):
        assert marker not in text, marker
    for instruction in {record["instruction"] for record in alpaca_records(400)}:
        assert instruction not in text, instruction
