#!/usr/bin/env bash
# The main job: set up .venv, then run the tiny study (studies/tiny.yaml) offline on this machine's CPUs.
# Extra arguments go to snakemake, e.g. `bash scripts/study.sh --config study=config.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
snakemake --cores "$(nproc)" --config study=studies/tiny.yaml "$@"
echo "report: $PWD/results/report/report.md"
