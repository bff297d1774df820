#!/usr/bin/env bash
# The multi-GPU figures of issue 13 on the 2-H200 device machine, in one call (run from the repo root there, with
# this worktree copied to .dev/dist and the wheels in .whl): installs DeepSpeed 0.19.8 (pure-Python wheel built
# with DS_BUILD_OPS=0), hjson and pydantic, then scripts/multigpu_bench.py plan (STRATEGY=fsdp|ddp: another strategy
# than DeepSpeed; ONLY: case indices). Results: $OUT/results.jsonl.
set -uo pipefail
# That machine shares its GPUs' host: NVLink multicast stays off in every process (real clusters keep NVLS).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
root=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$root"/.whl/deepspeed-0.19.8-*.whl "$root"/.whl/hjson-*.whl "$root"/.whl/pydantic-2*.whl \
    "$root"/.whl/pydantic_core-*.whl "$root"/.whl/annotated_types-*.whl "$root"/.whl/typing_inspection-*.whl || exit 1
cd "$root/.dev/dist"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m | head -4
python3 -c "import deepspeed, torch, transformers, peft; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())"
python3 scripts/multigpu_bench.py plan --out "$OUT" --budget "${BUDGET:-330}" --call "${CALL:-dist-1}" \
    --commit "${COMMIT:-}" ${ONLY:+--only $ONLY} ${STRATEGY:+--strategy $STRATEGY} 2>&1 | grep -v -E "Warning|warn\(|^W1|^\s*$" | tee "$OUT/log.txt"
