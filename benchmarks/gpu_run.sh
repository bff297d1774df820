#!/usr/bin/env bash
# One GPU-machine call (issue 12): the fast path's equivalence check, then tunelab (kernels liger, offloaded
# checkpoints), the plain loop and Unsloth (the peer script, carried in a git-ignored folder) on the same 7B weights,
# side by side, then both under a 15 GiB memory cap (the largest micro-batch that fits).
# Run from the directory holding src/ and peer_unsloth.py, with the wheels in $WHEELS; results under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
started=$(date +%s)
timeout 120 python3 -m tunelab.kernels.check --out $OUT/check 2>&1 | tee $OUT/check.log | grep -v "it/s]" | tail -40
echo "check: $(( $(date +%s) - started )) s"
python3 -m tunelab.bench --arch qwen2.5-7b --method lora --quantization nf4 none --attention sdpa --kernels liger \
  --checkpoint-offload on --steps 18 --windows 3 --peer peer_unsloth.py --call "${CALL:-gpu}" --commit "${COMMIT:-}" \
  --memory-budget-gib 15 --budget-steps 6 --budget-start 16 --budget-peer-timeout 150 \
  --model-root /tmp/models --out $OUT/b7 2>&1 | grep -v "it/s]" > $OUT/bench7.log
tail -25 $OUT/bench7.log
echo "total: $(( $(date +%s) - started )) s"
