"""How the report looks: the headline table, number formatting, the Markdown and HTML pages, the plots.

One number style everywhere: quality 0-100 with one decimal and its interval (`31.2 [29.9, 32.6]`), thousands
separated, fixed point (never `1.074e+04`), `–` where a figure was not measured.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re

QUALITY = {"exact_match": "exact match", "bleu": "BLEU", "rouge_l": "ROUGE-L", "bertscore_f1": "BERTScore F1",
           "codebleu": "CodeBLEU"}
PLOTS = {"loss_curves.png": "Training and validation loss", "quality_vs_memory.png": "Quality against peak memory",
         "quality_vs_speed.png": "Quality against training speed (* = Pareto front)",
         "latency.png": "Per-request latency (batch 1)"}
MISSING = "–"
LABELS = {"latency_p50_seconds": "latency p50 (batch 1, s)", "latency_p95_seconds": "latency p95 (batch 1, s)",
          "ttft_p50_seconds": "time to first token p50 (batch 1, s)",
          "per_token_latency_p50_seconds": "per-token latency p50 (batch 1, s)",
          "latency_requests": "latency requests (batch 1)",
          "generated_tokens_per_second": "generation tokens/s (batched)"}  # the full table's names for these keys
NOTES = ("Quality figures are 0-100 with their bootstrap 95 % interval over test records. Peak memory is the GPU's "
         "peak allocation (memory_kind cuda) or, on CPU, the process's peak RSS. Latency is per request at batch 1 "
         "(p50); generation tokens/s (batched) is in the full table. GPUs (GPU-h): the GPUs a run trained on and "
         "its training cost, train wall time x GPUs in GPU-hours; 0 (CPU) for a run trained on the CPU. "
         "Runs are scored as they trained (adapters on "
         "their base); export rows (`<run>.<format>`) are the quantized merged model, scored the same way. "
         "Every column is in summary.csv.")

BASE_NOTE = ("Each row is measured against the untrained base it starts from: base-<model>.<nf4|int8> (the base "
             "loaded in that quantization, as QLoRA loads it) for a run trained quantized and its merged and exported "
             "rows, base-<model> for the others. Quality: the difference to that base row with its paired bootstrap "
             "95 % interval and p (better or worse only where p < 0.05).")


def number(value) -> str:
    """A figure in the report's one style: thousands separated, fixed point, at most three significant
    decimals below 1."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}" if abs(value) >= 100 else "0"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.{min(6, 2 - math.floor(math.log10(abs(value))))}f}"


def quality(row: dict, metric: str) -> str:
    """`31.2 [29.9, 32.6]`: a 0-100 figure and its 95 % interval."""
    if row.get(metric) is None:
        return MISSING
    return f"{row[metric]:.1f} [{row[f'{metric}_ci95_low']:.1f}, {row[f'{metric}_ci95_high']:.1f}]"


def headline(rows: list[dict], primary: str) -> tuple[list[str], list[list[str]]]:
    """At most 10 columns: what ran, what it cost (memory, speed, GPUs and GPU-hours), up to three quality figures
    (the primary first; every one is in the full table), latency."""
    scored = [m for m in QUALITY if any(row.get(m) is not None for row in rows)]
    shown = [primary, *[m for m in scored if m != primary][:2]]
    shown.sort(key=list(QUALITY).index)
    rss = any(row.get("memory_kind") == "cpu_rss" for row in rows)
    header = ["run", "method", "quantization", "peak RSS GiB (CPU)" if rss else "peak GiB", "train tokens/s",
              "GPUs (GPU-h)", *(QUALITY[m] for m in shown), "latency p50 (batch 1, ms)"]
    body = [[row["run"], row["method"], _quantization(row), number(row.get("peak_memory_gib")),
             number(row.get("train_tokens_per_second")), gpu_cost(row), *(quality(row, m) for m in shown),
             number(row["latency_p50_seconds"] * 1000) if row.get("latency_p50_seconds") is not None else MISSING]
            for row in rows]
    return header, body


def gpu_cost(row: dict) -> str:
    """`2 (5.97)`: the GPUs a run trained on and its GPU-hours; `0 (CPU)` for a run trained on the CPU."""
    if row.get("gpus") is None:
        return MISSING
    return "0 (CPU)" if row["gpus"] == 0 else f"{row['gpus']} ({number(row['gpu_hours'])})"


def _quantization(row: dict) -> str:
    """How the scored weights were stored: a run's training quantization, or an export's format."""
    return f"{row['export']} export" if row.get("export") not in (None, "as trained") else row["quantization"]


def categories(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Exact match per task family (a column per category), where the test records carry one."""
    names = list(dict.fromkeys(k for row in rows for k in row if k.startswith("exact_match[")))
    if not names:
        return [], []
    return (["run", *(n.removeprefix("exact_match[").removesuffix("]") for n in names)],
            [[row["run"], *(f"{row[n]:.1f}" if row.get(n) is not None else MISSING for n in names)] for row in rows])


def against_base(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each run, merged row and export against its base row: test loss, and every scored quality metric's
    difference with its paired 95 % interval and p (better/worse where the paired test separates them)."""
    measured = [row for row in rows if row["method"] != "base" and row.get("base_row")]
    metrics = [m for m in QUALITY if any(row.get(f"{m}_p_vs_base") is not None for row in measured)]
    if not measured:
        return [], []
    header = ["run", "base row", "test loss vs base", *(f"{QUALITY[m]} vs base" for m in metrics)]
    body = [[row["run"], row["base_row"], _loss_against_base(row), *(_difference(row, m) for m in metrics)]
            for row in measured]
    return header, body


def _loss_against_base(row: dict) -> str:
    if row.get("test_loss_delta_vs_base") is None:
        return MISSING
    outcome = "lower" if row["beats_base_test_loss"] else "not lower"
    return f"{row['test_loss']:.3f} ({row['test_loss_delta_vs_base']:+.3f}, {outcome})"


def _difference(row: dict, metric: str) -> str:
    """`+3.1 [+1.2, +5.0] p 0.002 better`: the difference to the base row, its paired interval, the test."""
    p = row.get(f"{metric}_p_vs_base")
    if p is None:
        return MISSING
    delta = row[f"{metric}_delta_vs_base"]
    outcome = ("better" if delta > 0 else "worse") if p < 0.05 else "not separated"
    shown = f"{p:.4f}" if p < 0.001 else f"{p:.3f}"
    return (f"{delta:+.1f} [{row[f'{metric}_delta_vs_base_ci95_low']:+.1f}, "
            f"{row[f'{metric}_delta_vs_base_ci95_high']:+.1f}] p {shown} {outcome}")


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def markdown_page(study: str, rows: list[dict], verdict: list[str], primary: str, footer: str = "",
                  setup: list[str] = ()) -> str:
    lines = [f"# Study {study}", "", *(f"- {line}" for line in verdict), "", *_markdown_table(*headline(rows, primary))]
    if setup:
        lines += ["", *(f"- {line}" for line in setup)]
    header, body = categories(rows)
    if header:
        lines += ["", "## Exact match per task family", "", *_markdown_table(header, body)]
    header, body = against_base(rows)
    if header:
        lines += ["", "## Against its base row", "", BASE_NOTE, "", *_markdown_table(header, body)]
    lines += ["", NOTES, ""]
    lines += [f"## {title}\n\n![{title}]({name})\n" for name, title in PLOTS.items()]
    if footer:
        lines += ["---", "", footer, ""]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table class='{css}'><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def html_page(study: str, rows: list[dict], verdict: list[str], primary: str, figures: dict[str, bytes],
              columns: list[str], footer: str = "", setup: list[str] = ()) -> str:
    """One self-contained page: verdict, headline table, plots inlined as data URIs, the full table collapsed."""
    points = "".join(f"<li>{_bold(line)}</li>" for line in verdict)
    category_header, category_body = categories(rows)
    per_category = (f"<h2>Exact match per task family</h2>{_html_table(category_header, category_body)}"
                    if category_header else "")
    base_header, base_body = against_base(rows)
    per_base = (f"<h2>Against its base row</h2><p class='notes'>{html.escape(BASE_NOTE)}</p>"
                f"{_html_table(base_header, base_body)}" if base_header else "")
    images = "".join(f"<figure><img alt='{html.escape(PLOTS[name])}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'><figcaption>{html.escape(PLOTS[name])}</figcaption></figure>"
                     for name, png in figures.items())
    full = _html_table([LABELS.get(c, c) for c in columns], [[number(row.get(c)) for c in columns] for row in rows],
                       "full")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Study {html.escape(study)}</title><link rel='icon' href='data:,'><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}table{border-collapse:collapse;"
            "font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
            "td:first-child,th{text-align:left}.verdict{font-size:15px;background:#f4f7fb;padding:.6em 2em}"
            "figure{display:inline-block;margin:.5em;max-width:48%}img{max-width:100%}"
            "figcaption,.notes{font-size:12px;color:#555}.full{font-size:11px}</style></head><body>"
            f"<h1>Study {html.escape(study)}</h1><ul class='verdict'>{points}</ul>"
            f"{_html_table(*headline(rows, primary), 'headline')}"
            + "".join(f"<p class='notes'>{_code(line)}</p>" for line in setup)
            + f"{per_category}{per_base}"
            f"<p class='notes'>{html.escape(NOTES)}</p>{images}"
            f"<details><summary>All columns ({len(columns)})</summary>{full}</details>"
            f"<footer class='notes'>{html.escape(footer)}</footer></body></html>")


def _code(line: str) -> str:
    """Markdown `code` as <code>, everything else escaped."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(line))


def _bold(line: str) -> str:
    """The verdict's Markdown `**run**` as <b>, everything else escaped."""
    parts = html.escape(line).split("**")
    return "".join(f"<b>{part}</b>" if i % 2 else part for i, part in enumerate(parts))


def pareto_front(rows: list[dict], quality_key: str, cost: str, higher_cost_is_better: bool) -> list[str]:
    """Runs that no other run beats on both quality and `cost` (the others are dominated)."""
    sign = 1 if higher_cost_is_better else -1

    def dominates(a: dict, b: dict) -> bool:
        no_worse = a[quality_key] >= b[quality_key] and sign * a[cost] >= sign * b[cost]
        return no_worse and (a[quality_key] > b[quality_key] or sign * a[cost] > sign * b[cost])

    candidates = [r for r in rows if r.get(quality_key) is not None and r.get(cost) is not None]
    return [r["run"] for r in candidates if not any(dominates(o, r) for o in candidates)]


def plots(rows: list[dict], curves: dict[str, dict], primary: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    trained = [r for r in rows if r["method"] != "base" and r.get(primary) is not None]
    memory_label = ("peak process RSS on CPU (GiB)" if any(r.get("memory_kind") == "cpu_rss" for r in trained)
                    else "peak GPU memory allocated (GiB)")
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

    for name, cost, label, higher in (("quality_vs_memory.png", "peak_memory_gib", memory_label, False),
                                      ("quality_vs_speed.png", "train_tokens_per_second",
                                       "training speed (non-padding tokens/s)", True)):
        fig, ax = plt.subplots(figsize=(7, 5))
        measured = [row for row in trained if row.get(cost) is not None]
        front = set(pareto_front(measured, primary, cost, higher))
        for row in measured:
            error = [[row[primary] - row[f"{primary}_ci95_low"]], [row[f"{primary}_ci95_high"] - row[primary]]]
            ax.errorbar(row[cost], row[primary], yerr=error, fmt="*" if row["run"] in front else "o", markersize=10,
                        capsize=3)
            ax.annotate(row["run"], (row[cost], row[primary]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=label, ylabel=f"{QUALITY[primary]} (0-100, 95 % interval)", title=PLOTS[name],
               ylim=(0, min(100, max([10] + [row[f"{primary}_ci95_high"] * 1.1 for row in measured]))))
        figures[name] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    timed = [r for r in rows if r.get("latency_p50_seconds") is not None]
    if timed:
        p50 = [r["latency_p50_seconds"] * 1000 for r in timed]
        p95 = [(r.get("latency_p95_seconds") or r["latency_p50_seconds"]) * 1000 for r in timed]
        ax.bar([r["run"] for r in timed], p50, yerr=[[0] * len(timed), [b - a for a, b in zip(p50, p95)]],
               capsize=3, label="p50 (whisker: p95)")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    else:
        ax.text(0.5, 0.5, "no per-request latency in these results (eval.json from an older generate)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set(ylabel="latency per request, batch 1 (ms)", title=PLOTS["latency.png"])
    figures["latency.png"] = _png(fig)
    return figures


def _png(fig) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
