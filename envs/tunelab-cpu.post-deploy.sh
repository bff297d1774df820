#!/usr/bin/env bash
# Snakemake runs this in a new tunelab-cpu environment (envs/tunelab-cpu.yaml), from the workflow's directory:
# it installs tunelab itself; every dependency is in the environment already.
set -euo pipefail
pip install --no-cache-dir --no-deps --no-build-isolation .
