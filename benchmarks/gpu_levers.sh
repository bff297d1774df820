#!/usr/bin/env bash
# One GPU-machine call (issue 12): the fast path's equivalence check (toy confident model), then tunelab (kernels
# liger, offloaded checkpoints), the plain loop and Unsloth (peer script carried in a git-ignored folder) on the
# same 7B weights, then tunelab alone with train.checkpoint_layers $LAYERS (default "14 0": only the first 14 / no
# layers checkpointed, the others not recomputed): the speed that memory buys, against Unsloth of the same call.
# Run from the directory holding src/ and peer_unsloth.py, with the wheels in $WHEELS; results under $OUT.
# $EXTRA_WHEELS (optional): wheels installed into /tmp/site-extra for a later call on the same machine.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
if [ -n "${EXTRA_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-extra \
    "$EXTRA_WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
started=$(date +%s)
timeout 120 python3 -m tunelab.kernels.check --out $OUT/check > $OUT/check.log 2>&1
echo "check rc $?: $(( $(date +%s) - started )) s"; tail -30 $OUT/check.log | grep -v "it/s]"
cp $OUT/check/check.json $OUT/kernels-check.json; rm -rf $OUT/check
python3 -m tunelab.bench --arch qwen2.5-7b --method lora --quantization nf4 none --attention sdpa --kernels liger \
  --checkpoint-offload on --steps 18 --windows 3 --peer peer_unsloth.py --call "${CALL:-gpu}" --commit "${COMMIT:-}" \
  --model-root /tmp/models --out $OUT/b7 2>&1 | grep -v "it/s]" > $OUT/bench7.log
tail -12 $OUT/bench7.log; echo "bench: $(( $(date +%s) - started )) s"
python3 -m tunelab.bench --arch qwen2.5-7b --method lora --quantization nf4 none --attention sdpa --kernels liger \
  --checkpoint-offload on --checkpoint-layers ${LAYERS:-14 0} --sides tunelab --steps 15 --windows 3 \
  --call "${CALL:-gpu}" --commit "${COMMIT:-}" --model-root /tmp/models --out $OUT/levers 2>&1 | grep -v "it/s]" \
  > $OUT/levers.log
tail -8 $OUT/levers.log
echo "total: $(( $(date +%s) - started )) s"
