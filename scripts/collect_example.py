"""Copy what a finished study produced into a folder that can be committed and re-rendered: per run its
results files (no model weights, no generations: they hold the dataset's texts), each model's base.json
(no local paths), the report's Markdown, CSV and plots, and the study file.

  python scripts/collect_example.py --config studies/smollm2-alpaca.yaml --results results --out docs/example-study
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RUN_FILES = ("eval.json", "scores.json", "sample_scores.jsonl", "train_metrics.json", "merge.json", "export.json")
REPORT_FILES = ("report.md", "summary.csv", "loss_curves.png", "quality_vs_memory.png", "quality_vs_speed.png",
                "latency.png")


def collect(config: Path, results: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.rmtree(out / "base", ignore_errors=True)
    for run in sorted(p for p in (results / "runs").iterdir() if p.is_dir()):
        for name in RUN_FILES:
            if (run / name).is_file():
                (out / "runs" / run.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / name, out / "runs" / run.name / name)
    for base in sorted((results / "base").glob("*/base.json")):
        record = json.loads(base.read_text(encoding="utf-8"))
        record.pop("path", None)  # this machine's folders
        if record.get("gguf"):
            record["gguf"] = Path(record["gguf"]).name
        (out / "base" / base.parent.name).mkdir(parents=True, exist_ok=True)
        (out / "base" / base.parent.name / "base.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for name in REPORT_FILES:
        shutil.copyfile(results / "report" / name, out / name)
    shutil.copyfile(config, out / "study.yaml")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    collect(arguments.config, arguments.results, arguments.out)
