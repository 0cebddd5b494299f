#!/usr/bin/env bash
# Builds the native extension WITH its CUDA kernels on a machine without a GPU, the way
# scripts/gpu_checks.sh builds it on the GPU machine, and runs the native tests against that
# build (their CPU paths; the CUDA ones need a device). Proves, before any GPU time is spent,
# that the toolkit is found behind a wrapper nvcc, that csrc/cuda compiles for sm_90 and links
# against libcudart, that every plane pass kernel keeps its stores in the PTX, and that a CUDA
# build still passes the CPU tests.
#
# It needs a CUDA build of torch whose CUDA major matches nvcc's: the environment of
# scripts/setup_vision_env.sh has one (torch 2.14.1+cu130, nvcc 13.0 here). The build happens in
# a temporary copy of the tracked files, so the checkout's own (CPU) extension is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_vision_env.sh)
case "$PY" in */*) [ "${PY#/}" = "$PY" ] && PY=$PWD/$PY ;; esac  # absolute: the build runs elsewhere
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch ' + torch.__version__ + ' has no CUDA')"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$tmp"
cd "$tmp"
t0=$(date +%s)
CRBP_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace >build.log 2>&1 \
  || { tail -n 40 build.log; echo "[cuda-build] FAILED"; exit 1; }
grep -m1 "CUDA_HOME=" build.log || true
PYTHONPATH=$tmp "$PY" -c "from crbp_fast.hgru.native import _C; assert _C.with_cuda(), 'built without CUDA'; print('[cuda-build] built with CUDA:', _C.__file__)"
echo "[cuda-build] compiled and linked in $(($(date +%s) - t0)) s"
# The PTX of the CUDA kernels, with the build's own nvcc command (from its log), and a check
# that each plane pass stores its outputs (scripts/check_ptx_stores.py says why).
nvcc_cmd=$(grep -m1 'nvcc .*csrc/cuda/hgru_cuda\.cu' build.log | sed 's/^\[[0-9/]*\] //')
[ -n "$nvcc_cmd" ] || { echo "[cuda-build] FAILED: no nvcc command for csrc/cuda/hgru_cuda.cu in the build log"; exit 1; }
ptx_cmd=$(echo "$nvcc_cmd" | sed -E 's/ -MD -MF [^ ]+//; s/ -c -c / -c /; s/ -o [^ ]+hgru_cuda\.o/ -o hgru_cuda.ptx/; s/-gencode=arch=compute_([0-9]+),code=sm_[0-9]+/-arch=sm_\1/g; s/ -c / -ptx /')
eval "$ptx_cmd" >ptx.log 2>&1 || { tail -n 20 ptx.log; echo "[cuda-build] FAILED: PTX of hgru_cuda.cu"; exit 1; }
"$PY" scripts/check_ptx_stores.py hgru_cuda.ptx csrc/cpu/plane_passes.h csrc/cuda/hgru_cuda.cu || { echo "[cuda-build] FAILED"; exit 1; }
PYTHONPATH=$tmp "$PY" -m pytest tests/hgru/test_native_backend.py tests/hgru/test_native_tracked.py -q -p no:cacheprovider
