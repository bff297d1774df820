#!/usr/bin/env bash
# Create .venv: the CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build), then
# tunelab with the exact CPU versions of envs/constraints-cpu.txt. Reinstalls when either file changes.
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
pip_install torch==2.13.0
pip_install -c envs/constraints-cpu.txt -e '.[train,workflow,serve,dev]'
.venv/bin/python -m pip check
touch "$stamp"
