"""Stage `report`: every run of the study in one table, a few plots and a short verdict.

Reads `results/runs/<run>/{train_metrics.json, eval.json, scores.json}` for the study's runs and
reference rows; writes `results/report/{summary.csv, report.md, report.html}` and PNG plots. Needs only
the results files and matplotlib (no torch), so it renders on a laptop after `dvc pull`.
Run: `tunelab report --config config.yaml --runs results/runs --out results/report`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from pathlib import Path

from tunelab.artifacts import atomic_file, invalidate, read_json, write_text
from tunelab.config import Study
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
QUALITY = ("bleu", "rouge_l", "bertscore_f1", "codebleu")
COLUMNS = ("run", "model", "method", "quantization", "attention", "precision", "export", "size_on_disk_mb",
           "merge_max_logit_difference", "pruned_share", "trainable_parameters", "train_tokens_per_second",
           "padding_fraction", "peak_memory_gib", "memory_kind", "train_wall_seconds", "final_validation_loss",
           "test_loss", "latency_seconds_mean", "generated_tokens_per_second", "empty_predictions", *QUALITY,
           *(f"{q}_delta_vs_base" for q in QUALITY), "test_loss_delta_vs_base")
PLOTS = {"loss_curves.png": "Training and validation loss", "quality_vs_memory.png": "Quality against peak memory",
         "quality_vs_speed.png": "Quality against training speed (Pareto front marked)",
         "latency.png": "Generation latency per test record"}


def run_report(study: Study, runs_dir: Path, out: Path) -> list[dict]:
    """Collect every run's results, then write the CSV, the Markdown and HTML reports and the plots."""
    rows = collect(study, runs_dir)
    invalidate(out / "report.html")
    _write_csv(out / "summary.csv", rows)
    curves = {r["run"]: read_json(runs_dir / r["run"] / "train_metrics.json") for r in rows
              if r.get("export") == "as trained"}
    figures = _plots(rows, curves)
    for name, png in figures.items():
        with atomic_file(out / name) as tmp:
            tmp.write_bytes(png)
    verdict = _verdict(rows)
    write_text(out / "report.md", _markdown(study, rows, verdict))
    write_text(out / "report.html", _html(study, rows, verdict, figures))
    log.info("report of %d runs written to %s", len(rows), out)
    return rows


def collect(study: Study, runs_dir: Path) -> list[dict]:
    """One row per run of the study, reference rows first; quality deltas against the model's base."""
    rows = []
    for model in dict.fromkeys(r.model for r in study.runs):
        rows.append(_evaluated(runs_dir / study.reference_name(model), study.reference_name(model), model, None))
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
    bases = {row["model"]: row for row in rows if row["method"] == "base"}
    for row in rows:
        base = bases[row["model"]]
        for metric in (*QUALITY, "test_loss"):
            if row.get(metric) is not None and base.get(metric) is not None:
                row[f"{metric}_delta_vs_base"] = row[metric] - base[metric]
    return rows


def _evaluated(run_dir: Path, name: str, model: str, train) -> dict:
    """The columns every row has: what was run (`train` is None for a base), and its test-split figures."""
    evaluation, scores = read_json(run_dir / "eval.json"), read_json(run_dir / "scores.json")
    return {"run": name, "model": model, "method": train.method if train else "base",
            "quantization": train.quantization if train else "none", "attention": train.attention if train else "",
            "precision": train.precision if train else "",
            **{k: evaluation.get(k) for k in ("test_loss", "latency_seconds_mean", "generated_tokens_per_second",
                                              "empty_predictions")},
            **{k: scores.get(k) for k in QUALITY}}


def _trained(run_dir: Path) -> dict:
    """A trained run's own columns: its merge and what training cost."""
    merge, metrics = read_json(run_dir / "merge.json"), read_json(run_dir / "train_metrics.json")
    return {"export": "as trained", "size_on_disk_mb": merge["size_bytes"] / 1e6,
            "merge_max_logit_difference": merge["max_logit_difference_vs_trained"],
            "trainable_parameters": metrics["trainable_parameters"], "peak_memory_gib": metrics["peak_memory_gib"],
            "memory_kind": metrics["memory_kind"], "train_tokens_per_second": metrics["tokens_per_second"],
            "padding_fraction": metrics["padding_fraction"], "train_wall_seconds": metrics["wall_seconds"],
            "final_validation_loss": metrics["final_validation_loss"]}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in COLUMNS} for row in rows)


def _cell(value) -> object:
    return "" if value is None else round(value, 6) if isinstance(value, float) else value


def _primary(rows: list[dict]) -> str:
    """The quality column the verdict and plots rank by: BERTScore F1 where scored, else ROUGE-L, else BLEU."""
    for metric in ("bertscore_f1", "rouge_l", "bleu", "codebleu"):
        if any(row.get(metric) is not None for row in rows):
            return metric
    raise TunelabError("report: no run has a quality score (turn on at least one metric)")


def pareto_front(rows: list[dict], quality: str, cost: str, higher_cost_is_better: bool) -> list[str]:
    """Runs that no other run beats on both quality and `cost` (the others are dominated)."""
    sign = 1 if higher_cost_is_better else -1

    def dominates(a: dict, b: dict) -> bool:
        no_worse = a[quality] >= b[quality] and sign * a[cost] >= sign * b[cost]
        return no_worse and (a[quality] > b[quality] or sign * a[cost] > sign * b[cost])

    candidates = [r for r in rows if r.get(quality) is not None and r.get(cost) is not None]
    return [r["run"] for r in candidates if not any(dominates(o, r) for o in candidates)]


def _verdict(rows: list[dict]) -> list[str]:
    quality = _primary(rows)
    trained = [r for r in rows if r["method"] != "base"]
    lines = [f"Best quality ({quality}): **{max(trained, key=lambda r: r[quality])['run']}**."]
    measured = [r for r in trained if r.get("peak_memory_gib") is not None]
    if measured:
        lines.append(f"Least memory: **{min(measured, key=lambda r: r['peak_memory_gib'])['run']}**; "
                     f"fastest training: **{max(measured, key=lambda r: r['train_tokens_per_second'])['run']}**.")
        front = set(pareto_front(measured, quality, "peak_memory_gib", False)) | set(
            pareto_front(measured, quality, "train_tokens_per_second", True))
        dominated = [r["run"] for r in measured if r["run"] not in front]
        lines.append("Dominated on quality against both memory and speed: "
                     + (", ".join(dominated) if dominated else "none") + ".")
    return lines


def _shown_columns(rows: list[dict]) -> list[str]:
    """The columns that at least one row fills."""
    return [c for c in COLUMNS if any(row.get(c) not in (None, "") for row in rows)]


def _markdown(study: Study, rows: list[dict], verdict: list[str]) -> str:
    shown = _shown_columns(rows)
    lines = [f"# Study {study.name}", "", *verdict, "", "| " + " | ".join(shown) + " |",
             "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in shown) + " |" for row in rows]
    lines += ["", "Memory is peak GPU memory allocated (memory_kind cuda) or the process's peak RSS (cpu_rss). "
              "Runs are scored as they trained (adapters on their base); their size_on_disk_mb is that of the "
              "merged model. Merged rows (`<run>.merged`) are that merged model, scored the same way (what merging "
              "costs). Export rows (`<run>.<format>`) are the quantized merged model, scored the same way.", ""]
    lines += [f"## {title}\n\n![{title}]({name})\n" for name, title in PLOTS.items()]
    return "\n".join(lines)


def _html(study: Study, rows: list[dict], verdict: list[str], figures: dict[str, bytes]) -> str:
    """One self-contained page: the table and the plots inlined as data URIs."""
    shown = _shown_columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_format(row.get(c)))}</td>" for c in shown) + "</tr>"
                   for row in rows)
    images = "".join(f"<h2>{html.escape(PLOTS[name])}</h2><img alt='{name}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'>" for name, png in figures.items())
    points = "".join(f"<li>{html.escape(line.replace('**', ''))}</li>" for line in verdict)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(study.name)}</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>"
            f"<h1>Study {html.escape(study.name)}</h1><ul>{points}</ul><table><tr>{head}</tr>{body}</table>{images}")


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _plots(rows: list[dict], curves: dict[str, dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    quality = _primary(rows)
    trained = [r for r in rows if r["method"] != "base" and r.get(quality) is not None]
    memory_unit = "GiB, GPU allocated" if any(r.get("memory_kind") == "cuda" for r in trained) else "GiB, CPU RSS"
    figures = {}

    fig, ax = plt.subplots(figsize=(8, 5))
    for run, metrics in curves.items():
        steps, losses = zip(*metrics["loss_curve"])
        line, = ax.plot(steps, losses, label=f"{run} train", alpha=0.8)
        if metrics["validation_loss_curve"]:
            v_steps, v_losses = zip(*metrics["validation_loss_curve"])
            ax.plot(v_steps, v_losses, "o--", color=line.get_color(), label=f"{run} validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per label token)", title=PLOTS["loss_curves.png"])
    ax.legend(fontsize=8)
    figures["loss_curves.png"] = _png(fig)

    for name, cost, label, higher in (("quality_vs_memory.png", "peak_memory_gib", f"peak memory ({memory_unit})",
                                       False),
                                      ("quality_vs_speed.png", "train_tokens_per_second",
                                       "training speed (non-padding tokens/s)", True)):
        fig, ax = plt.subplots(figsize=(7, 5))
        measured = [row for row in trained if row.get(cost) is not None]
        front = set(pareto_front(measured, quality, cost, higher))
        for row in measured:
            ax.scatter(row[cost], row[quality], marker="*" if row["run"] in front else "o", s=120)
            ax.annotate(row["run"], (row[cost], row[quality]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=label, ylabel=quality, title=PLOTS[name] if "speed" not in name else
               "Quality against training speed (* = Pareto front)")
        figures[name] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["run"] for r in rows], [(r.get("latency_seconds_mean") or 0) * 1000 for r in rows])
    ax.set(ylabel="mean latency per test record (ms)", title=PLOTS["latency.png"])
    ax.tick_params(axis="x", rotation=30)
    figures["latency.png"] = _png(fig)
    return figures


def _png(fig) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()

