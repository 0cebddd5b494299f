#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with a CUDA GPU (the device tool's
# H100/H200 image: python3 with a CUDA torch and triton, nvcc, no package index).
#
#   bash scripts/gpu_checks.sh [quick|full]
#
# 1. builds the native extension with its CUDA part;
# 2. runs the GPU-marked tests (Triton, native CUDA, FFT engine) and the whole suite's GPU paths;
# 3. the Triton passes' bandwidth against the device-to-device copy (fp32 and bf16);
# 4. the benchmark suite at the paper shape (memory and speed, every backend and conv engine);
# and copies logs and records to $OUT (the device tool's folder) or benchmarks/results/.
# "quick" (default) keeps the sweep small enough for a 15-minute device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-quick}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
step() { echo; echo "== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (CUDA extension)"
CRBP_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
python3 -c "from crbp_fast.native import _C; print('native CUDA built:', _C.with_cuda())"

step "GPU tests"
python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$DEST/gpu_tests.log" | tail -30

step "Triton bandwidth (fraction of device-to-device copy)"
for dt in float32 bfloat16; do
  python3 -m crbp_fast.triton.bandwidth --dtype $dt --out "$DEST/triton_bandwidth.jsonl" 2>&1 | tail -20
done

step "benchmark suite, paper shape"
if [ "$MODE" = full ]; then
  python3 -m crbp_fast.cli bench all --paper --out "$DEST"
else
  python3 -m crbp_fast.cli bench memory --paper --steps 1 20 80 --algorithms bptt crbp --backends torch triton native --conv fft --out "$DEST"
  python3 -m crbp_fast.cli bench speed --paper --speed-steps 20 --algorithms bptt crbp --backends torch triton native --conv direct fft --repeats 10 --out "$DEST"
fi
ls -la "$DEST"
