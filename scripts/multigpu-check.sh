#!/usr/bin/env bash
# The multi-GPU figures issue 13 still lacks, on the 2-H200 device machine, in one call of at most 10 minutes: 7B
# LoRA under ZeRO-2 on the fast path (Liger), 2 GPUs against 1; 7B full fine-tuning under ZeRO-3, per-GPU peak
# against the 1-GPU peak (fp32 master weights both); 1.5B LoRA, 2 GPUs against 1, three interleaved repeats; two
# one-GPU launchers at a c10d rendezvous against the single launcher's loss curve (scripts/multigpu_bench.py PLAN).
# Run from the repo root there, with this worktree's src/ and scripts/ copied to .dev/$DEV (default multi) and the
# wheels in .whl: installs DeepSpeed 0.19.8 (the pure-Python wheel built with DS_BUILD_OPS=0), hjson, pydantic and
# liger-kernel into /tmp/site. STRATEGY=fsdp|ddp: another strategy than DeepSpeed; ONLY: case names; BUDGET:
# seconds after which no further case starts. Results in $OUT: results.jsonl (rows for benchmarks/results.jsonl),
# runs.jsonl (every run), summary.json and log.txt (the verdict against issue 13's targets at its end).
set -uo pipefail
# That machine shares its GPUs' host: NVLink multicast stays off in every process (real clusters keep NVLS).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
root=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$root"/.whl/deepspeed-0.19.8-*.whl "$root"/.whl/hjson-*.whl "$root"/.whl/pydantic-2*.whl \
    "$root"/.whl/pydantic_core-*.whl "$root"/.whl/annotated_types-*.whl "$root"/.whl/typing_inspection-*.whl \
    "$root"/.whl/liger_kernel-*.whl || exit 1
cd "$root/.dev/${DEV:-multi}" || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m | head -4
python3 -c "import deepspeed, torch, transformers, peft, liger_kernel; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())"
python3 scripts/multigpu_bench.py plan --out "$OUT" --budget "${BUDGET:-480}" --call "${CALL:-dist-3}" \
    --commit "${COMMIT:-}" ${ONLY:+--only $ONLY} ${STRATEGY:+--strategy $STRATEGY} 2>&1 \
    | grep -v -E "Warning|warn\(|^W1|^\s*$" | tee "$OUT/log.txt"
