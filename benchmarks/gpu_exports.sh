#!/usr/bin/env bash
# One GPU-machine call for issue 14's export speed: greedy generation tokens/s of the bf16 merged model, its int8
# export and its pruned int8 export (prune_amount 0.2), Qwen2.5-1.5B shapes, batch 1 and 16, exactly 128 new
# tokens, 3 interleaved repeats (python -m tunelab.generation.export_bench). Run from the repo root with the wheels
# (bitsandbytes, pydantic, ...) in $WHEELS; results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
started=$(date +%s)
timeout "${LIMIT:-240}" python3 -m tunelab.generation.export_bench --arch qwen2.5-1.5b --batch 1 16 --new-tokens 128 \
  --repeats 3 --call "${CALL:-gpu}" --commit "${COMMIT:-}" --out $OUT 2>&1 | grep -v "cast from" > $OUT/exports.log
echo "rc ${PIPESTATUS[0]}"; grep -E "tok/s|sizes" $OUT/exports.log; tail -5 $OUT/exports.log
echo "total: $(( $(date +%s) - started )) s"
