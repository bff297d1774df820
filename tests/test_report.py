"""The report on fake runs whose results files this test writes: one run clearly better, two indistinguishable.
The verdict names the better run only when a paired test separates it, lists the tied set otherwise, ranks speed
and memory only beyond their per-step spread; the page renders in a real headless Chromium."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tunelab.artifacts import write_json, write_jsonl
from tunelab.config import MetricsConfig, load_study
from tunelab.errors import TunelabError
from tunelab.report import primary_metric, run_report
from tunelab.report_render import number
from tunelab.score import score

RECORDS = 120
REFERENCES = [f"{i} {i + 7}" if i % 2 else f"word{i} word{i + 1}" for i in range(RECORDS)]
CATEGORIES = ["add" if i % 2 else "copy" for i in range(RECORDS)]
# run: (share of records answered right, seed of which ones, median tokens/s per step, median GiB per step)
RUNS = {"base-m": (0.05, 0, None, None), "run-good": (0.9, 1, 1000.0, 10.0), "run-b": (0.5, 2, 1010.0, 10.02),
        "run-c": (0.52, 3, 2000.0, 5.0)}
GPUS = {"run-good": 2, "run-b": 1, "run-c": 1}  # what each trained on (0 for every run of a CPU study)


def _study(root: Path, runs: list[str], memory_kind: str = "cuda") -> Path:
    """A study file and the results files of its runs, the quality ones computed by tunelab's own scorer."""
    study = root / "study.yaml"
    entries = ", ".join(f"{{name: {r}, model: m}}" for r in runs)
    study.write_text(f"name: fake\ndata: {{source: synthetic:500, test_size: {RECORDS}}}\n"
                     f"models: {{m: {{source: tiny}}}}\nruns: [{entries}]\nmetrics: {{bertscore: false}}\n"
                     "merge: {score: false}\n")  # no merged rows: these fake runs have no merged model
    for run in ["base-m", *runs]:
        right, seed, speed, memory = RUNS[run]
        correct = np.random.default_rng(seed).random(RECORDS) < right
        predictions = [ref if ok else "wrong answer" for ref, ok in zip(REFERENCES, correct)]
        corpus, samples = score(predictions, REFERENCES, MetricsConfig(bertscore=False), CATEGORIES)
        out = root / "runs" / run
        write_jsonl(out / "sample_scores.jsonl", samples)
        write_json(out / "scores.json", corpus)
        write_json(out / "eval.json", {"test_loss": 1.5, "latency_p50_seconds": 0.0123, "latency_p95_seconds": 0.02,
                                       "generated_tokens_per_second": 10740.3, "empty_predictions": 0})
        if run == "base-m":
            continue
        steps = np.random.default_rng(seed + 10).normal(1, 0.01, size=(50, 2))
        write_json(out / "merge.json", {"size_bytes": 1_046_000_000, "max_logit_difference_vs_trained": 0.003873})
        write_json(out / "train_metrics.json", {
            "trainable_parameters": 1046, "peak_memory_gib": memory, "memory_kind": memory_kind,
            "tokens_per_second": speed, "padding_fraction": 0.1, "wall_seconds": 10740.0, "nodes": 1,
            "gpus": 0 if memory_kind == "cpu_rss" else GPUS[run],
            "final_validation_loss": 1.2, "loss_curve": [[1, 3.0], [2, 2.0]], "validation_loss_curve": [[2, 2.1]],
            "step_tokens_per_second": [[i, speed * f] for i, f in enumerate(steps[:, 0], 2)],
            "step_peak_memory_gib": [[i, memory * f] for i, f in enumerate(steps[:, 1], 2)],
            "provenance": {"git_commit": "0123456789abcdef", "git_dirty": False,
                           "versions": {"torch": "2.13.0", "peft": "0.21.2", "deepspeed": None},
                           "container": {"APPTAINER_NAME": "train.sif"}}})
    return study


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    run_report(load_study(_study(root, ["run-good", "run-b", "run-c"])), root / "runs", root / "report")
    return root / "report"


def _verdict(report: Path) -> list[str]:
    lines = (report / "report.md").read_text().splitlines()
    return [line for line in lines[:lines.index("| run | method | quantization | peak GiB | train tokens/s | "
                                                 "GPUs (GPU-h) | exact match | BLEU | ROUGE-L | "
                                                 "latency p50 (batch 1, ms) |")]
            if line.startswith("- ")]


def test_a_clearly_better_run_is_named_best(three_runs):
    verdict = _verdict(three_runs)
    assert verdict[0].startswith("- Best exact match: **run-good** (")
    assert re.search(r"\*\*run-good\*\* \(\d+\.\d \[\d+\.\d, \d+\.\d\]\)", verdict[0])
    assert verdict[1].startswith("- Better than the untrained base on exact match (paired bootstrap, p < 0.05): "
                                 "run-good, run-b, run-c.")
    rows = {row["run"]: row for row in csv.DictReader(open(three_runs / "summary.csv"))}
    assert float(rows["run-good"]["p_vs_base"]) < 0.01 and rows["base-m"]["p_vs_base"] == ""


def test_indistinguishable_runs_are_listed_as_tied(tmp_path):
    run_report(load_study(_study(tmp_path, ["run-b", "run-c"])), tmp_path / "runs", tmp_path / "report")
    verdict = _verdict(tmp_path / "report")
    assert verdict[0].startswith("- No single best exact match: ")
    assert re.findall(r"\*\*([\w-]+)\*\*", verdict[0]) in (["run-c", "run-b"], ["run-b", "run-c"])


def test_speed_and_memory_are_ranked_beyond_their_spread_only(three_runs, tmp_path):
    verdict = _verdict(three_runs)
    assert re.match(r"- Fastest training: \*\*run-c\*\* \(median 2,0\d\d tokens/s per step", verdict[2])
    assert re.match(r"- Least GPU memory: \*\*run-c\*\* \(median 5.0\d GiB", verdict[3])
    root = tmp_path / "close"
    root.mkdir()
    run_report(load_study(_study(root, ["run-good", "run-b"])), root / "runs", root / "report")
    verdict = _verdict(root / "report")
    assert verdict[2].startswith("- Fastest training: not separated beyond per-step spread: run-b, run-good")
    assert verdict[3].startswith("- Least GPU memory: not separated beyond per-step spread: run-good, run-b")


def test_cpu_memory_is_rss_and_not_ranked(tmp_path):
    run_report(load_study(_study(tmp_path, ["run-good", "run-c"], "cpu_rss")), tmp_path / "runs", tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "- Peak memory is the process's RSS on CPU (interpreter and libraries included): shown, not ranked." \
        in markdown
    assert "| run | method | quantization | peak RSS GiB (CPU) |" in markdown and "Least" not in markdown
    # trained on the CPU: no GPU was paid for, and the table says so instead of showing a cost
    row = next(line for line in markdown.splitlines() if line.startswith("| run-c |"))
    assert row.split(" | ")[5] == "0 (CPU)", row
    rows = {row["run"]: row for row in csv.DictReader(open(tmp_path / "report" / "summary.csv"))}
    assert (rows["run-c"]["gpus"], rows["run-c"]["gpu_hours"]) == ("0", "0.0")


def test_headline_table_is_short_consistent_and_0_to_100(three_runs):
    lines = (three_runs / "report.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    header = table[0].strip("| ").split(" | ")
    assert len(header) <= 10
    good = dict(zip(header, table[2].strip("| ").split(" | ")))
    assert good["peak GiB"] == "10.00" and good["train tokens/s"] == "1,000" and good["latency p50 (batch 1, ms)"] \
        == "12.30"
    for metric in ("exact match", "BLEU", "ROUGE-L"):
        figure, low, high = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", good[metric]).groups())
        assert 0 <= low <= figure <= high <= 100
    assert float(good["exact match"].split()[0]) > 80  # a 0-100 scale, not 0-1
    # what training cost: 2 GPUs for 10,740 s are 5.97 GPU-hours; a base row trained nothing
    base = dict(zip(header, table[1].strip("| ").split(" | ")))
    assert good["GPUs (GPU-h)"] == "2 (5.97)" and base["run"] == "base-m" and base["GPUs (GPU-h)"] == "–"
    rows = {row["run"]: row for row in csv.DictReader(open(three_runs / "summary.csv"))}
    assert [rows[run]["gpu_hours"] for run in ("run-good", "run-b", "base-m")] == ["5.966667", "2.983333", ""]
    assert [rows[run]["gpus"] for run in ("run-good", "run-b", "base-m")] == ["2", "1", ""]
    assert "| run | add | copy |" in lines  # exact match per task family
    assert not re.search(r"\d[eE][+-]\d", "\n".join(lines))


def test_footer_names_what_produced_the_results(three_runs):
    """The commit, package versions and image recorded by training, in both pages' footer."""
    for page in ("report.md", "report.html"):
        footer = (three_runs / page).read_text().rsplit("Provenance.", 1)[1]
        assert "commit: 0123456789ab" in footer and "torch 2.13.0" in footer and "peft 0.21.2" in footer
        assert "APPTAINER_NAME=train.sif" in footer and "deepspeed" not in footer  # not installed: not listed


def test_number_formatting_is_one_style():
    assert [number(v) for v in (10740.3, 1046, 0.003873, 0.0006, 1.074, 0.0, None)] == [
        "10,740", "1,046", "0.00387", "0.000600", "1.07", "0", "–"]


def test_full_table_keeps_every_column_and_any_new_one(tmp_path):
    study = _study(tmp_path, ["run-good"])
    metrics = tmp_path / "runs" / "run-good" / "eval.json"
    metrics.write_text(metrics.read_text().replace('"test_loss"', '"mfu": 0.41, "test_loss"'))
    run_report(load_study(study), tmp_path / "runs", tmp_path / "report")
    from tunelab import report

    original = report._evaluated
    try:  # a column another stage adds to the rows lands in summary.csv and the HTML's full table
        report._evaluated = lambda *args: {**original(*args), "energy_kwh": 8}
        run_report(load_study(study), tmp_path / "runs", tmp_path / "report2")
    finally:
        report._evaluated = original
    columns = next(csv.reader(open(tmp_path / "report2" / "summary.csv")))
    assert {"exact_match", "exact_match_ci95_low", "exact_match[add]", "latency_p95_seconds", "energy_kwh"} <= set(columns)
    page = (tmp_path / "report2" / "report.html").read_text()
    assert "<th>energy_kwh</th>" in page and "<th>generation tokens/s (batched)</th>" in page


def test_report_needs_no_training_or_scoring_packages(three_runs, tmp_path):
    """A laptop after `dvc pull`: `tunelab report` runs with the core install (no torch, sacrebleu, rouge-score)."""
    blocked = "', '".join(("torch", "transformers", "peft", "bitsandbytes", "sacrebleu", "rouge_score", "bert_score"))
    command = (f"import sys; [sys.modules.__setitem__(m, None) for m in ('{blocked}',)]; "
               f"from tunelab.cli import main; sys.exit(main(['report', '--config', 'study.yaml', '--runs', 'runs', "
               f"'--out', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", command], cwd=three_runs.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "summary.csv").read_text() == (three_runs / "summary.csv").read_text()


PROBE_ERRORS = ("<script>window.problems = []; addEventListener('error', e => problems.push(e.message || "
                "'failed to load ' + (e.target.alt || e.target.src)), true);</script>")
PROBE_IMAGES = (  # each image's width, and whether its last pixel row is drawn (a truncated PNG's is not)
    "<script>addEventListener('load', () => { document.body.dataset.images = [...document.images].map(i => {"
    "const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
    "const g = c.getContext('2d'); g.drawImage(i, 0, 0); if (!c.width) return '0:none';"
    "const row = g.getImageData(0, c.height - 1, c.width, 1).data.filter((v, k) => k % 4 === 3);"
    "return c.width + ':' + (row.every(a => a === 255) ? 'whole' : 'cut'); }).join(' ');"
    "document.body.dataset.problems = problems.join(' | '); });</script>")


def test_html_renders_in_headless_chromium(three_runs, tmp_path):
    """The page as a browser shows it: no console error, every plot decoded, verdict and tables present."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: run scripts/setup.sh (it installs Debian's chromium)"
    page = (three_runs / "report.html").read_text()
    probed = tmp_path / "report.html"  # the page plus two probe scripts that record errors and image sizes
    probed.write_text(page.replace("<head>", "<head>" + PROBE_ERRORS, 1).replace("</body>", PROBE_IMAGES + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--window-size=1280,2000"]
    result = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert result.returncode == 0 and not console, console or result.stderr[-2000:]
    dom = result.stdout
    images = [image.split(":") for image in re.search(r'data-images="([^"]*)"', dom).group(1).split()]
    assert len(images) == 4 and all(int(width) > 300 and drawn == "whole" for width, drawn in images), images
    assert 'data-problems=""' in dom
    assert "Best exact match: <b>run-good</b>" in dom
    headline = re.search(r"<table class=\"headline\">(.*?)</table>", dom).group(1)
    assert headline.count("<th>") <= 10 and headline.count("<tr>") == 1 + len(RUNS)
    assert re.search(r"<details><summary>All columns \(\d+\)</summary><table class=\"full\">", dom)
    shot = subprocess.run([*flags, f"--screenshot={tmp_path / 'report.png'}", (three_runs / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and (tmp_path / "report.png").stat().st_size > 50_000


def test_missing_per_record_scores_or_primary_is_one_error(tmp_path):
    study = load_study(_study(tmp_path, ["run-b"]))
    (tmp_path / "runs" / "run-b" / "sample_scores.jsonl").unlink()
    with pytest.raises(TunelabError, match="run-b/sample_scores.jsonl is missing: .*dvc pull"):
        run_report(study, tmp_path / "runs", tmp_path / "report")
    assert not (tmp_path / "report").exists()
    with pytest.raises(TunelabError, match="metrics.primary bertscore_f1 is in no run's scores.json"):
        primary_metric("bertscore_f1", [{"exact_match": 1.0}])


def test_the_setup_lines_name_the_prompt_format_and_a_gguf_models_round_trip(tmp_path):
    from tunelab.report import setup_lines

    gguf = tmp_path / "Small.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    study_file = tmp_path / "study.yaml"
    study_file.write_text("name: real\ndata: {source: data/alpaca.json, prompt_format: chat_template}\n"
                          f"models: {{small: {{source: {gguf}}}}}\nruns: [{{name: small-lora, model: small}}]\n")
    study = load_study(study_file)
    generic = setup_lines(study, tmp_path / "base", 48)
    assert "48 test records" in generic[0] and "each model's own chat template" in generic[0]
    assert generic[1].startswith(f"Model small: `{gguf}`, a GGUF file dequantised")
    write_json(tmp_path / "base" / "small" / "base.json", {"gguf": str(gguf), "gguf_sha256": "ab" * 32,
                                                            "dtype": "fp32", "source": str(gguf)})
    recorded = setup_lines(study, tmp_path / "base", 48)[1]
    assert "from Small.Q4_1.gguf (sha256 abababababab) to fp32" in recorded and "not its original release" in recorded
