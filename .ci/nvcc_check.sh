#!/usr/bin/env bash
# Usage: .ci/nvcc_check.sh [csrc/x.cu ...]   (default: every csrc/*.cu)
# Compiles CUDA sources for sm_80 and sm_90a with the flags cpp_extension
# uses, so a CUDA compile error cannot land even though CI has no GPU and a
# CPU-only torch. Objects are thrown away; nothing here runs.
#
# The CPU torch wheel ships the c10/ATen CUDA headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is enough to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/shim/c10/cuda/impl"
echo '#pragma once' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"

inc=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
abi=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
flags=(-std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -DTORCH_EXTENSION_NAME=_C -DFASTDL_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI="$abi"
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
       -Icsrc -I"$out/shim")

jobs=${NVCC_JOBS:-$(nproc)}
status=0
pids=()
names=()
srcs=("$@")
[ ${#srcs[@]} -gt 0 ] || srcs=(csrc/*.cu)
for src in "${srcs[@]}"; do
  name=$(basename "$src" .cu)
  ( start=$(date +%s)
    if nvcc "${flags[@]}" $inc -c "$src" -o "$out/$name.o" > "$out/$name.log" 2>&1; then
      echo "nvcc ok   $src ($(( $(date +%s) - start ))s)"
    else
      echo "nvcc FAIL $src"; grep -E "error" "$out/$name.log" | cut -c1-400 | head -20; exit 1
    fi ) &
  pids+=($!); names+=("$src")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
