#!/usr/bin/env bash
# Snakemake runs this in a new tunelab-gpu environment (envs/tunelab-gpu.yaml), from the workflow's directory:
# it builds flash-attn and deepspeed against the environment's torch, for A100 (sm_80) and H100 (sm_90), at the
# versions and hashes of containers/requirements-gpu.txt (as containers/train.def does), then installs tunelab.
set -euo pipefail
: "${CUDA_HOME:?set CUDA_HOME to a CUDA 13.0 toolkit (nvcc), e.g. after module load cuda/13.0}"
cuda_lock=$(mktemp --suffix=.txt)
trap 'rm -f "$cuda_lock"' EXIT
awk '/^[a-z0-9]/ { take = $1 ~ /^(flash-attn|deepspeed)==/ } take' containers/requirements-gpu.txt > "$cuda_lock"
export TORCH_CUDA_ARCH_LIST="8.0;9.0" FLASH_ATTN_CUDA_ARCHS="80;90" FLASH_ATTENTION_FORCE_BUILD=TRUE
pip install --no-cache-dir --no-deps --require-hashes --no-build-isolation -r "$cuda_lock"
pip install --no-cache-dir --no-deps --no-build-isolation .
