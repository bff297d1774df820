#!/usr/bin/env bash
# Build a flash-attn 2 wheel for the benchmark machine, from PyPI's source distribution, in minutes instead of
# hours: Hopper only (sm_90), bf16, head dimension 128 (both Qwen2.5-1.5B and -7B), and without the dropout,
# ALiBi, softcap, sliding-window and uneven-head-dim variants, which flash-attn's setup.py offers as
# FLASHATTENTION_DISABLE_* switches. The kernels that remain are the release's own, unchanged; calls outside
# that set fail with flash-attn's own "This flash attention build does not support ..." error.
#
#   bash scripts/flash-attn-wheel.sh SDIST OUTDIR   # SDIST: flash_attn-2.8.3.post2.tar.gz from PyPI
#
# Needs nvcc, ninja and the CUDA build of torch that the wheel will run with (no network). A cluster image
# builds the full flash-attn instead (containers/train.def). BENCHMARKS.md says how the bench used this.
set -euo pipefail
sdist=$(realpath "$1")
out=$(realpath -m "$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tar xzf "$sdist" -C "$work" --exclude='*/csrc/composable_kernel' --exclude='*/csrc/cutlass/test' \
    --exclude='*/csrc/cutlass/examples' --exclude='*/csrc/cutlass/tools' --exclude='*/csrc/cutlass/python'
cd "$work"/flash_attn-*

python3 - <<'PY'
import re
from pathlib import Path

kernels = [f"csrc/flash_attn/src/flash_{kind}_hdim128_bf16{causal}_sm80.cu"
           for kind in ("fwd", "bwd", "fwd_split") for causal in ("", "_causal")]
setup = Path("setup.py").read_text()
setup, found = re.subn(r'(name="flash_attn_2_cuda",\s*sources=\[)[^\]]*\]',
                       lambda m: m.group(1) + ", ".join(f'"{p}"' for p in ["csrc/flash_attn/flash_api.cpp", *kernels]) + "]",
                       setup)
assert found == 1, "setup.py: the flash_attn_2_cuda sources list was not found"
for switch in ("DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K", "LOCAL"):
    setup, found = re.subn(rf'# ("-DFLASHATTENTION_DISABLE_{switch}",)', r"\1", setup)
    assert found == 1, f"setup.py: FLASHATTENTION_DISABLE_{switch} was not found"
Path("setup.py").write_text(setup)

header = Path("csrc/flash_attn/src/static_switch.h")
text = header.read_text()
only_bf16 = ('#define FP16_SWITCH(COND, ...) [&] { TORCH_CHECK(!(COND), "This flash attention build has bf16 kernels '
             'only."); using elem_type = cutlass::bfloat16_t; return __VA_ARGS__(); }()\n')
only_128 = ('#define HEADDIM_SWITCH(HEADDIM, ...) [&] { TORCH_CHECK(HEADDIM > 96 && HEADDIM <= 128, "This flash '
            'attention build has head dimension 128 only."); constexpr static int kHeadDim = 128; '
            'return __VA_ARGS__(); }()\n')
text, found = re.subn(r"#define FP16_SWITCH\(COND, \.\.\.\).*?\}\(\)\n", lambda _: only_bf16, text, flags=re.S)
assert found == 1, "static_switch.h: FP16_SWITCH was not found"
text, found = re.subn(r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)\n", lambda _: only_128, text, flags=re.S)
assert found == 1, "static_switch.h: HEADDIM_SWITCH was not found"
header.write_text(text)
PY

export FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-8}" NVCC_THREADS="${NVCC_THREADS:-2}"
python3 -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$out" . 2>&1 | grep -v '^ *ptxas info' | tail -40
ls -la "$out"/flash_attn-*.whl
