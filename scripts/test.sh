#!/usr/bin/env bash
# The test command: set up .venv, then run the whole test suite (the tiny study end to end included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
