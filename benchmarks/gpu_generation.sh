#!/usr/bin/env bash
# One GPU-machine call for issue 12's generation row: the static path's equivalence check against `generate`
# (python -m tunelab.generation.check), then the generation benchmark (default `generate` against the static path,
# Qwen2.5-1.5B and -7B shapes, batch 1 and 32, exactly 256 new tokens, 3 repeats). Run from the directory holding
# src/, with wheels of transformers==5.24.0 (and peft, pydantic, bitsandbytes where the machine lacks them) in
# $WHEELS; results under $OUT. Measured: call gen-20261201-1 took 350 s (check 83 s).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
started=$(date +%s)
timeout 150 python3 -m tunelab.generation.check --out $OUT/check > $OUT/check.log 2>&1
echo "check rc $?: $(( $(date +%s) - started )) s"
rm -rf $OUT/check/base
python3 -m tunelab.generation.bench --arch qwen2.5-1.5b qwen2.5-7b --batch 1 32 --new-tokens 256 --repeats 3 \
  --call "${CALL:-gpu}" --commit "${COMMIT:-}" --out $OUT/bench > $OUT/bench.log 2>&1
echo "bench rc $?"; grep -E "tok/s|first call" $OUT/bench.log
echo "total: $(( $(date +%s) - started )) s"
