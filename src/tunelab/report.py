"""Stage `report`: the study's answer in ten seconds: a tested verdict, one headline table, four plots.

Reads `results/runs/<run>/{train_metrics.json, eval.json, scores.json, sample_scores.jsonl}` for the study's
runs and reference rows; writes `results/report/{summary.csv, report.md, report.html}` and PNG plots. Every
quality figure is on a 0-100 scale with its 95 % interval. A run is called best only when a paired bootstrap
test over the same test records separates it from every other run (Holm-corrected, stats.py); speed and
memory are ranked only beyond their measured per-step spread. Needs only the results files, numpy and
matplotlib (no torch), so it renders on a laptop after `dvc pull`.
Run: `tunelab report --config config.yaml --runs results/runs --out results/report`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from tunelab import stats
from tunelab.artifacts import atomic_file, invalidate, read_json, read_jsonl, write_text
from tunelab.config import Study
from tunelab.errors import TunelabError
from tunelab.report_render import QUALITY, html_page, markdown_page, number, plots, quality

log = logging.getLogger(__name__)
PRIMARY_ORDER = ("exact_match", "bertscore_f1", "rouge_l", "bleu", "codebleu")  # metrics.primary: auto
LATENCY = ("latency_p50_seconds", "latency_p95_seconds", "ttft_p50_seconds", "per_token_latency_p50_seconds",
           "latency_requests", "generated_tokens_per_second")
# the full table's order; any other key a row carries follows these
COLUMNS = ("run", "model", "method", "quantization", "attention", "precision", "export", "size_on_disk_mb",
           "merge_max_logit_difference", "pruned_share", "trainable_parameters", "train_tokens_per_second",
           "padding_fraction", "peak_memory_gib", "memory_kind", "train_wall_seconds", "gpus", "nodes",
           "gpu_hours", "final_validation_loss",
           "test_loss", *LATENCY, "empty_predictions",
           *(f"{q}{suffix}" for q in QUALITY for suffix in ("", "_ci95_low", "_ci95_high")),
           "base_row", "beats_base_test_loss", "test_loss_delta_vs_base",
           *(f"{q}{suffix}" for q in QUALITY for suffix in ("_delta_vs_base", "_delta_vs_base_ci95_low",
                                                            "_delta_vs_base_ci95_high", "_p_vs_base")), "p_vs_base")


def run_report(study: Study, runs_dir: Path, out: Path) -> list[dict]:
    """Collect every run's results, test the verdict, then write the CSV, Markdown and HTML reports and plots."""
    rows = collect(study, runs_dir)
    primary = primary_metric(study.metrics.primary, rows)
    samples = {row["run"]: _samples(runs_dir / row["run"] / "sample_scores.jsonl") for row in rows}
    verdict = _verdict(rows, primary, samples)
    invalidate(out / "report.html")
    _write_csv(out / "summary.csv", rows)
    curves = {r["run"]: read_json(runs_dir / r["run"] / "train_metrics.json") for r in rows
              if r.get("export") == "as trained"}
    figures = plots(rows, curves, primary)
    for name, png in figures.items():
        with atomic_file(out / name) as tmp:
            tmp.write_bytes(png)
    footer = provenance_footer(runs_dir, rows)
    setup = setup_lines(study, runs_dir.parent / "base", len(next(iter(samples.values()), [])))
    write_text(out / "report.md", markdown_page(study.name, rows, verdict, primary, footer, setup))
    write_text(out / "report.html", html_page(study.name, rows, verdict, primary, figures, full_columns(rows), footer,
                                              setup))
    log.info("report of %d runs written to %s", len(rows), out)
    return rows


def setup_lines(study: Study, base_dir: Path, test_records: int) -> list[str]:
    """What every row shares: the data, the prompt format, and each model's source; for a GGUF model, the file it
    was dequantised from (its `base.json` beside the runs, where present), since its weights carry that file's
    quantisation."""
    prompt = {"alpaca": "the Alpaca template", "chat_template": "each model's own chat template"}
    lines = [f"Data: {study.data.source}, {test_records} test records. Prompt format: "
             f"{prompt[study.data.prompt_format]} (`data.prompt_format`), for the base rows and every run alike."]
    for name in dict.fromkeys(row.model for row in study.runs):
        source, base_json = study.models[name].source, base_dir / name / "base.json"
        line = f"Model {name}: `{source}`"
        base = read_json(base_json) if base_json.is_file() else {}
        if base.get("gguf"):
            line += (f", dequantised by the base stage from {Path(base['gguf']).name} (sha256 "
                     f"{base['gguf_sha256'][:12]}) to {base['dtype']}: the model after that file's quantisation round "
                     "trip, not its original release")
        elif study.models[name].is_gguf:
            line += ", a GGUF file dequantised by the base stage: the model after its quantisation round trip"
        lines.append(line + ".")
    return lines


def provenance_footer(runs_dir: Path, rows: list[dict]) -> str:
    """What produced the results: the project's git commits, the package versions and container images of the
    training runs (train_metrics.json's provenance), and the BERTScore model (scores.json)."""
    found: dict[str, set[str]] = {"commit": set(), "packages": set(), "container": set(), "BERTScore model": set()}
    for row in rows:
        run_dir = runs_dir / row["run"]
        if (run_dir / "train_metrics.json").is_file():
            provenance = read_json(run_dir / "train_metrics.json").get("provenance") or {}
            if provenance.get("git_commit"):
                found["commit"].add(provenance["git_commit"][:12] + (" (with local changes)"
                                                                     if provenance.get("git_dirty") else ""))
            found["packages"].add(", ".join(f"{name} {version}" for name, version in
                                            sorted((provenance.get("versions") or {}).items()) if version))
            found["container"].update(f"{k}={v}" for k, v in (provenance.get("container") or {}).items())
        model = read_json(run_dir / "scores.json").get("bertscore_model")
        if model:
            found["BERTScore model"].add(str(model))
    parts = [f"{name}: {'; '.join(sorted(values))}" for name, values in found.items() if any(values)]
    return "Provenance. " + ". ".join(parts or ["not recorded"]) + "."


def collect(study: Study, runs_dir: Path) -> list[dict]:
    """One row per run of the study, reference rows first; deltas against each row's base row (`base_row`:
    `base-<model>.<nf4|int8>` for a run trained quantized, its merged row and exports; else `base-<model>`)."""
    rows = [{**_evaluated(runs_dir / name, name, model, None), "quantization": quantization}
            for name, (model, quantization) in study.reference_rows.items()]
    rows += [{**_evaluated(runs_dir / run.name, run.name, run.model, run.train), **_trained(runs_dir / run.name)}
             for run in study.runs]
    for name, source in study.merged_runs.items():  # what merging costs: the merged model as its own row
        run, merge = study.run(source), read_json(runs_dir / source / "merge.json")
        rows.append({**_evaluated(runs_dir / name, name, run.model, run.train), "export": "merged",
                     "size_on_disk_mb": merge["size_bytes"] / 1e6,
                     "merge_max_logit_difference": merge["max_logit_difference_vs_trained"]})
    for name, (source, export_format) in study.export_runs.items():
        run = study.run(source)
        export = read_json(runs_dir / name / "export.json")
        rows.append({**_evaluated(runs_dir / name, name, run.model, run.train), "export": export_format,
                     "size_on_disk_mb": export["size_bytes"] / 1e6, "pruned_share": export.get("pruned_share")})
    by_name = {row["run"]: row for row in rows}
    for row in rows:
        row["base_row"] = study.base_row(row["run"])
        base = by_name[row["base_row"]]
        if row["method"] != "base" and row.get("test_loss") is not None and base.get("test_loss") is not None:
            row["beats_base_test_loss"] = row["test_loss"] < base["test_loss"]
        for metric in (*QUALITY, "test_loss"):
            if row.get(metric) is not None and base.get(metric) is not None:
                row[f"{metric}_delta_vs_base"] = row[metric] - base[metric]
    return rows


def _evaluated(run_dir: Path, name: str, model: str, train) -> dict:
    """The columns every row has: what was run (`train` is None for a base), and its test-split figures."""
    evaluation, scores = read_json(run_dir / "eval.json"), read_json(run_dir / "scores.json")
    row = {"run": name, "model": model, "method": train.method if train else "base",
           "quantization": train.quantization if train else "none", "attention": train.attention if train else "",
           "precision": train.precision if train else "",
           **{k: evaluation.get(k) for k in ("test_loss", *LATENCY, "empty_predictions")}}
    for metric in QUALITY:
        if scores.get(metric) is not None:
            row[metric] = scores[metric]
            row[f"{metric}_ci95_low"], row[f"{metric}_ci95_high"] = scores[f"{metric}_ci95"]
    for category, value in scores.get("exact_match_by_category", {}).items():
        row[f"exact_match[{category}]"] = value
    return row


def _trained(run_dir: Path) -> dict:
    """A trained run's own columns: its merge, what training cost, and the per-step series behind the spread."""
    merge, metrics = read_json(run_dir / "merge.json"), read_json(run_dir / "train_metrics.json")
    return {"export": "as trained", "size_on_disk_mb": merge["size_bytes"] / 1e6,
            "merge_max_logit_difference": merge["max_logit_difference_vs_trained"],
            "trainable_parameters": metrics["trainable_parameters"], "peak_memory_gib": metrics["peak_memory_gib"],
            "memory_kind": metrics["memory_kind"], "train_tokens_per_second": metrics["tokens_per_second"],
            "padding_fraction": metrics["padding_fraction"], "train_wall_seconds": metrics["wall_seconds"],
            **_gpu_cost(metrics), "final_validation_loss": metrics["final_validation_loss"],
            "_step_tokens_per_second": [v for _, v in metrics.get("step_tokens_per_second", [])],
            "_step_peak_memory_gib": [v for _, v in metrics.get("step_peak_memory_gib", [])]}


def _gpu_cost(metrics: dict) -> dict:
    """The GPUs a run trained on (all nodes; 0 on the CPU) and its cost, train wall time x GPUs in GPU-hours
    (0 on the CPU: no GPU was paid for). Unknown (None) for a train_metrics.json older than the `gpus` key."""
    gpus = metrics.get("gpus")
    return {"gpus": gpus, "nodes": metrics.get("nodes"),
            "gpu_hours": None if gpus is None else gpus * metrics["wall_seconds"] / 3600}


def primary_metric(configured: str, rows: list[dict]) -> str:
    """The metric the verdict ranks by: `metrics.primary`, or the first of PRIMARY_ORDER that was scored."""
    scored = [m for m in PRIMARY_ORDER if any(row.get(m) is not None for row in rows)]
    if not scored:
        raise TunelabError("report: no run has a quality score (turn on at least one metric)")
    if configured == "auto":
        return scored[0]
    if configured not in scored:
        raise TunelabError(f"report: metrics.primary {configured} is in no run's scores.json (scored: "
                           f"{', '.join(scored)}); rerun score, or set metrics.primary to one of those")
    return configured


def full_columns(rows: list[dict]) -> list[str]:
    """COLUMNS that a row fills, then any other key the rows carry (columns other stages add); `_` keys are
    the report's own working data."""
    extra = dict.fromkeys(k for row in rows for k in row if k not in COLUMNS and not k.startswith("_"))
    return [c for c in (*COLUMNS, *extra) if any(row.get(c) not in (None, "") for row in rows)]


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = full_columns(rows)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in columns} for row in rows)


def _cell(value) -> object:
    return "" if value is None else round(value, 6) if isinstance(value, float) else value


def _samples(path: Path) -> list[dict]:
    if not path.is_file():
        raise TunelabError(f"{path} is missing: the verdict's paired tests need each run's per-record scores "
                           "(dvc pull them with the README's laptop command, or rerun score)")
    return read_jsonl(path)


def _record_values(samples: list[dict], metric: str, run: str) -> np.ndarray:
    """Per-record values for the paired tests (BLEU: its sufficient statistics, the corpus figure's parts)."""
    key = "bleu_stats" if metric == "bleu" else metric
    if any(key not in sample for sample in samples):
        raise TunelabError(f"report: results/runs/{run}/sample_scores.jsonl has no {key!r} per record: rescore "
                           "the run with this tunelab (its paired tests need them)")
    return np.asarray([sample[key] for sample in samples], dtype=float)


def _verdict(rows: list[dict], primary: str, samples: dict[str, list[dict]]) -> list[str]:
    """The verdict's lines: the tested quality ranking, the trained runs against their base, speed, memory."""
    statistic = stats.corpus_bleu if primary == "bleu" else stats.mean
    scored = [row for row in rows if row.get(primary) is not None]
    indices = {row["run"]: [s["index"] for s in samples[row["run"]]] for row in scored}
    if len({tuple(v) for v in indices.values()}) > 1:
        raise TunelabError(f"report: the runs were scored on different test records ({', '.join(indices)}): "
                           "rerun generate and score on the current test split")
    values = {row["run"]: _record_values(samples[row["run"]], primary, row["run"]) for row in scored}
    label, by_run = QUALITY[primary], {row["run"]: row for row in rows}
    if len(values) < 2:
        return [f"Only {', '.join(values)} has {label}: nothing to compare."]
    tied, adjusted = stats.best_or_tied(values, statistic)
    if len(tied) == 1:
        lines = [f"Best {label}: **{tied[0]}** ({quality(by_run[tied[0]], primary)}); a paired bootstrap test "
                 f"separates it from every other run (Holm-adjusted p ≤ {_p(max(adjusted.values()))})."]
    else:
        lines = [f"No single best {label}: " + ", ".join(f"**{r}** ({quality(by_run[r], primary)})" for r in tied)
                 + f" are not separated by a paired bootstrap test (Holm-adjusted p ≥ {stats.ALPHA}); "
                   "more test records or a larger effect would be needed."]
    lines.append(_against_base(rows, primary, values, statistic))
    lines += _cost_lines([r for r in rows if r.get("export") == "as trained"])
    lines.append(_test_loss_against_base(rows))
    _quality_against_base(rows, samples)
    return lines


def _against_base(rows: list[dict], primary: str, values: dict, statistic) -> str:
    """Each trained or exported run against its base row, one paired test each (p recorded per row)."""
    better, not_better = [], []
    for row in rows:
        if row["method"] == "base" or row["run"] not in values or row["base_row"] not in values:
            continue
        row["p_vs_base"] = stats.paired_bootstrap(values[row["run"]], values[row["base_row"]], statistic)
        significant = row["p_vs_base"] < stats.ALPHA and row[f"{primary}_delta_vs_base"] > 0
        (better if significant else not_better).append(row["run"])
    return (f"Better than the untrained base on {QUALITY[primary]} (paired bootstrap, p < {stats.ALPHA}): "
            + (", ".join(better) or "none") + "." + (f" Not shown better: {', '.join(not_better)}." if not_better
                                                    else ""))


def _test_loss_against_base(rows: list[dict]) -> str:
    """Which runs reach a lower test loss than their base row; names the quantized base rows in use."""
    quantization = {row["run"]: row["quantization"] for row in rows if row["method"] == "base"}
    measured = [r for r in rows if r.get("beats_base_test_loss") is not None]
    lower = [r["run"] for r in measured if r["beats_base_test_loss"]]
    quantized = list(dict.fromkeys(r["base_row"] for r in measured if quantization[r["base_row"]] != "none"))
    against = (f" Runs trained quantized (and their merged and exported rows) are measured against the untrained "
               f"quantized base they started from ({', '.join(quantized)}); the others against base-<model>."
               if quantized else "")
    return (f"Lower test loss than its base row: {', '.join(lower) or 'none'}."
            + (f" Not lower: {', '.join(r['run'] for r in measured if not r['beats_base_test_loss'])}."
               if len(lower) < len(measured) else "") + against)


def _quality_against_base(rows: list[dict], samples: dict[str, list[dict]]) -> None:
    """Every scored quality metric of each non-base row against its base row: the paired bootstrap p-value
    (`<metric>_p_vs_base`) and the 95 % interval of the difference (`<metric>_delta_vs_base_ci95_low/high`)."""
    by_name = {row["run"]: row for row in rows}
    for row in rows:
        base = by_name[row["base_row"]]
        if row["method"] == "base":
            continue
        for metric in QUALITY:
            if row.get(metric) is None or base.get(metric) is None:
                continue
            statistic = stats.corpus_bleu if metric == "bleu" else stats.mean
            ours = _record_values(samples[row["run"]], metric, row["run"])
            theirs = _record_values(samples[base["run"]], metric, base["run"])
            row[f"{metric}_p_vs_base"] = stats.paired_bootstrap(ours, theirs, statistic)
            row[f"{metric}_delta_vs_base_ci95_low"], row[f"{metric}_delta_vs_base_ci95_high"] = (
                stats.paired_interval(ours, theirs, statistic))


def _cost_lines(trained: list[dict]) -> list[str]:
    """Fastest training and least memory, claimed only beyond the runs' measured per-step spread."""
    if len(trained) < 2:
        return []
    lines = []
    speed = _separated(trained, "_step_tokens_per_second", higher_is_better=True)
    lines.append(f"Fastest training: {speed}." if speed else "Training speed: not ranked (train_metrics.json has no "
                 "per-step tokens/s to measure run-to-run spread).")
    if any(row["memory_kind"] == "cpu_rss" for row in trained):
        lines.append("Peak memory is the process's RSS on CPU (interpreter and libraries included): shown, not "
                     "ranked.")
    else:
        memory = _separated(trained, "_step_peak_memory_gib", higher_is_better=False)
        lines.append(f"Least GPU memory: {memory}." if memory else "GPU memory: not ranked (train_metrics.json has "
                     "no per-step peak memory to measure run-to-run spread).")
    return lines


def _separated(rows: list[dict], series: str, higher_is_better: bool) -> str | None:
    """The leader by median of a per-step series, alone when it beats every other run by more than the larger
    interquartile range of the two, else with the runs it does not beat so; None when a run has no series."""
    if not rows or any(len(row[series]) < 4 for row in rows):
        return None
    sign = 1 if higher_is_better else -1
    summary = {row["run"]: (float(np.median(row[series])), float(np.subtract(*np.percentile(row[series], [75, 25]))))
               for row in rows}
    leader = max(summary, key=lambda run: sign * summary[run][0])
    level, spread = summary[leader]
    tied = [run for run, (other, other_spread) in summary.items()
            if run != leader and sign * (level - other) <= max(spread, other_spread)]
    unit = "tokens/s" if higher_is_better else "GiB"
    if not tied:
        return f"**{leader}** (median {number(level)} {unit} per step, beyond every other run's per-step spread)"
    return (f"not separated beyond per-step spread: {', '.join([leader, *tied])} (medians "
            + ", ".join(f"{number(summary[r][0])}" for r in [leader, *tied]) + f" {unit})")


def _p(value: float) -> str:
    return f"{value:.4f}" if value < 0.001 else f"{value:.3f}"
