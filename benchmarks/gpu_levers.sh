#!/usr/bin/env bash
# One GPU-machine call (issue 12): the fast path's equivalence check (toy confident model), then tunelab (kernels
# liger, offloaded checkpoints), the plain loop and Unsloth (peer script carried in a git-ignored folder) on the
# same 7B weights, then tunelab alone with train.checkpoint_layers $LAYERS (default "14 0": only the first 14 / no
# layers checkpointed, the others not recomputed): the speed that memory buys, against Unsloth of the same call.
# Run from the directory holding src/ and peer_unsloth.py, with the wheels in $WHEELS; everything it writes is
# packed into $OUT/levers.tgz (a call returns at most 8 files). $EXTRA_WHEELS (optional): wheels installed into
# /tmp/site-extra for a later call on the same machine. Stops its steps in time for a 600 s call.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
started=$(date +%s)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - started) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
if [ -n "${EXTRA_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-extra \
    "$EXTRA_WHEELS"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
W=/tmp/levers && rm -rf $W && mkdir -p $W
timeout 120 python3 -m tunelab.kernels.check --out $W/check > $W/check.log 2>&1
echo "check rc $?: $(( $(date +%s) - started )) s"; grep -A12 '"passed"' $W/check.log | head -14
cp $W/check/check.json $W/kernels-check.json; rm -rf $W/check
timeout $(( $(left) - 100 )) python3 -m tunelab.bench --arch qwen2.5-7b --method lora --quantization nf4 none \
  --attention sdpa --kernels liger --checkpoint-offload on --steps 18 --windows 3 --peer peer_unsloth.py \
  --call "${CALL:-gpu}" --commit "${COMMIT:-}" --model-root /tmp/models --out $W/b7 2>&1 | grep -v "it/s]" > $W/bench7.log
grep -A8 "| config" $W/bench7.log | head -8; echo "bench: $(( $(date +%s) - started )) s"
timeout $(left) python3 -m tunelab.bench --arch qwen2.5-7b --method lora --quantization nf4 none --attention sdpa \
  --kernels liger --checkpoint-offload on --checkpoint-layers ${LAYERS:-14 0} --sides tunelab --steps 15 --windows 3 \
  --call "${CALL:-gpu}" --commit "${COMMIT:-}" --model-root /tmp/models --out $W/levers 2>&1 | grep -v "it/s]" \
  > $W/levers.log
grep -A8 "| config" $W/levers.log | head -8
cat $W/b7/results.jsonl $W/levers/results.jsonl 2>/dev/null | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['side'], r['quantization'], r.get('checkpointing'), round(r['tok_s']), [round(x) for x in r['tok_s_range']], r['peak_gib'])"
tar czf $OUT/levers.tgz -C $W .
echo "total: $(( $(date +%s) - started )) s"
