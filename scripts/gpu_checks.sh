#!/usr/bin/env bash
# The GPU checks, as one prepared run for the GPU machine (an H200 or H100 image: python3 with a
# CUDA torch and triton, nvcc somewhere, maybe a read-only site-packages, no package index).
#
#   bash scripts/gpu_checks.sh smoke    # <= 4 min: versions, CUDA build, the compiled gpu tests of
#                                       #   native and of Triton (one config), the paper-shape
#                                       #   checks, fp32 bandwidth
#   bash scripts/gpu_checks.sh full     # <= 6 min: bf16 bandwidth, bench memory (crbp N=1..80,
#                                       #   bptt N=1..20), bench speed of every backend x conv
#                                       #   engine, bench panoptic --preset coco (2 x 800x1216,
#                                       #   ResNet-50, width 256; BPTT 1-5, C-RBP 5-20; needs the
#                                       #   image's torchvision), then the whole test suite on the
#                                       #   GPU (autotuned) with what is left
#   bash scripts/gpu_checks.sh targets  # <= 3 min: the speed targets of issue 11 (crbp_fast bench
#                                       #   targets: B=32, N=20, K=15 crbp iteration vs the published
#                                       #   algorithm and BPTT-6, gradients, step and VJP ratios)
#   CRBP_GPU_DRYRUN=1 OUT=DIR bash scripts/gpu_checks.sh smoke|full|targets   # the same stages on CPU, tiny
#
# Send smoke, then full, back to back on one warm machine: full reuses smoke's in-place build.
# Everything goes to $OUT (the device tool's folder; a new temporary folder when OUT is unset),
# at most 8 files, at most one folder deep:
#   run.log       everything every stage printed, in order
#   summary.txt   one line per stage: PASS / FAIL / TIMEOUT / NOT REACHED, seconds, why
#   build.log     the whole output of the extension build
#   tests-*.xml   JUnit reports of the pytest stages (smoke: gpu + paper; full: full)
#   bandwidth.jsonl    Triton pass bandwidth rows (fp32 in smoke, bf16 in full)
#   targets.json  targets only: the measured ratios with met / missed (commit it under
#                 benchmarks/results/ as targets-<device>.json)
#   records/      full only: the bench records (<device>.jsonl) and their two plots; the panoptic
#                 rows (preset panoptic-coco) are appended to the same <device>.jsonl after the
#                 plots are drawn (their own file or plot would be a 9th file): commit those rows
#                 under benchmarks/results/panoptic/, the others under benchmarks/results/
# Each stage runs under its own `timeout`, clipped to what is left of the mode's budget; a
# stage that fails does not stop the next ones. A failed CUDA build is logged in full and the
# run goes on without the native extension (Triton and torch), saying so. Exit 0 when every
# stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE="${1:-smoke}"
case "$MODE" in
  smoke) BUDGET=235 ;;
  full) BUDGET=355 ;;
  targets) BUDGET=175 ;;
  *) echo "gpu_checks.sh: expected 'smoke', 'full' or 'targets', got '$MODE'" >&2; exit 2 ;;
esac
DRY="${CRBP_GPU_DRYRUN:-0}"
OUT="${OUT:-$(mktemp -d -t crbp-gpu-checks.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0

export PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=30  # progress bars would fill the log's tail
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build: nothing written to site-packages
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

say() { echo "$*" | tee -a "$LOG"; }

if [ "$DRY" = 1 ]; then
  # CPU stand-in: the project's environment, Triton in its interpreter, tiny shapes, no CUDA.
  PY=$(bash scripts/setup_env.sh 2>>"$LOG") || { say "setup_env.sh failed (see $LOG)"; exit 1; }
  export TRITON_INTERPRET=1
  export CUDA_VISIBLE_DEVICES=""
  SHAPE_BENCH=(--batch 2 --size 12 --channels 3 --kernel-size 3 --repeats 2 --warmup 1 --no-rss --adjoint-steps 3)
  MEM_CRBP=(1 2 4)
  MEM_BPTT=(1 2)
  SPEED_STEPS=(2)
  BW_ARGS=(--shape 1 3 9 7 --kernel-size 3 --repeats 2 --device cpu)
  BF16=float32  # the CPU kernels have no bfloat16 storage: the stage's plumbing runs in float32
  PANOPTIC=(--preset cpu --size 64 96 --batch 1 --fpn-width 16 --bptt-steps 1 2 --crbp-steps 2 4 --cell-backend torch)
  TARGETS=(--quick --repeats 2 --device cpu)
else
  PY=python3
  SHAPE_BENCH=(--paper --repeats 5 --warmup 2)
  MEM_CRBP=(1 5 10 20 40 80)
  MEM_BPTT=(1 5 10 20)
  SPEED_STEPS=(6 20)
  BW_ARGS=(--repeats 20)
  BF16=bfloat16
  PANOPTIC=(--preset coco --device cuda)
  TARGETS=(--repeats 3 --device cuda)
fi
# The panoptic stage needs torchvision: CRBP_VISION_PY if set; on the GPU image its python3 (which
# has torchvision); on CPU the vision environment of scripts/setup_vision_env.sh (resolved when
# the stage runs; CI has set it up by then).
VPY="${CRBP_VISION_PY:-}"
# The budget counts from here: the dry run's environment set-up (a reinstall after a source change)
# is not part of what the GPU machine spends.
START=$(date +%s)

# stage NAME SECONDS CMD...: run CMD under `timeout`, clipped to the budget left; log and summarise.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 10 ]; then
    printf '%-22s NOT REACHED  (%ss of the %ss budget left)\n' "$name" "$left" "$BUDGET" >>"$SUMMARY"
    say "== $name: not reached ($left s of the budget left)"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say ""
  say "== $name (limit ${limit}s, $(date +%T))"
  local t0 rc
  t0=$(date +%s)
  # a stage may be a function of this script: `timeout` runs it in a child bash (exported below)
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' "$name" "$@"; fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local secs=$(($(date +%s) - t0)) status=PASS why=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=TIMEOUT why="killed after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status=FAIL why="exit $rc"
  fi
  [ "$status" != PASS ] && FAILED=1
  printf '%-22s %-12s %4ss  %s\n' "$name" "$status" "$secs" "$why" >>"$SUMMARY"
  say "== $name: $status (${secs}s) $why"
  [ "$status" = PASS ]
}

versions() {
  if [ "$DRY" = 1 ]; then
    echo "DRY RUN on CPU: $(uname -m), $(nproc) cores; no CUDA build, Triton in the interpreter, tiny shapes"
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || return 1
  fi
  "$PY" - <<'PYEOF' || return 1
import os, sys, sysconfig
import numpy, torch
try:
    import triton
    tv = triton.__version__
except Exception as err:  # noqa: BLE001
    tv = f"unavailable ({err})"
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("triton", tv, "numpy", numpy.__version__)
purelib = sysconfig.get_paths()["purelib"]
print("site-packages", purelib, "writable" if os.access(purelib, os.W_OK) else "read-only")
print("TF32 defaults: matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
PYEOF
  if [ "$DRY" != 1 ]; then
    "$PY" scripts/cuda_home.py || return 1
    nvcc --version | tail -2
  fi
}

build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: no CUDA build; the CPU extension of scripts/setup_env.sh is used" | tee "$OUT/build.log"
    "$PY" -c "from crbp_fast.hgru.native import _C; print('native extension:', _C.__file__, 'cuda', _C.with_cuda())"
    return
  fi
  # In place (the checkout is on PYTHONPATH): works with a read-only site-packages; ninja
  # rebuilds only what changed, so full after smoke on a warm machine costs seconds.
  echo "CRBP_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} $PY setup.py build_ext --inplace" >"$OUT/build.log"
  CRBP_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/build.log"
  [ "$rc" -eq 0 ] || { echo "build failed (exit $rc); the whole log is build.log"; return "$rc"; }
  "$PY" -c "from crbp_fast.hgru.native import _C; assert _C.with_cuda(), 'built without CUDA'; print('native CUDA built:', _C.__file__)"
}

pytest_stage() {  # pytest_stage NAME SECONDS XML-SUFFIX PYTEST-ARGS...
  local name=$1 limit=$2 xml=$3
  shift 3
  stage "$name" "$limit" "$PY" -m pytest -p no:cacheprovider -v -rfEs --junitxml="$OUT/tests-$xml.xml" "$@"
}

bench() { "$PY" -m crbp_fast.cli bench "$@"; }

bench_panoptic() {
  local vpy=$VPY
  if [ -z "$vpy" ]; then
    if [ "$DRY" = 1 ]; then vpy=$(bash scripts/setup_vision_env.sh) || return 1; else vpy=$PY; fi
  fi
  "$vpy" -m crbp_fast.cli bench panoptic "$@"
}

export -f versions build bench bench_panoptic
export DRY PY VPY OUT

say "gpu_checks.sh $MODE$([ "$DRY" = 1 ] && echo ' (dry run)') -> $OUT, budget ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '-dirty')"
stage versions 40 versions
if ! stage build 170 build; then
  say "!! the native extension did not build: the stages below run without it (Triton and torch only)"
  export CRBP_FAST_NO_EXT=1
fi

if [ "$MODE" = smoke ]; then
  # One Triton config per kernel (no autotuning) keeps the compile time of the smoke run small.
  NATIVE_TESTS=(tests/hgru/test_native_backend.py tests/hgru/test_native_tracked.py)
  [ "${CRBP_FAST_NO_EXT:-0}" = 1 ] && NATIVE_TESTS=()
  GPU_ONLY=(-m gpu)
  TRITON_TRACKED=(tests/hgru/test_triton_tracked.py)
  # On CPU every gpu test skips: run the files' CPU tests instead (not the Triton tracked passes':
  # under the interpreter they alone take two minutes, and the test command runs them anyway).
  [ "$DRY" = 1 ] && GPU_ONLY=() && TRITON_TRACKED=()
  CRBP_FAST_TRITON_ONE_CONFIG=1 pytest_stage "gpu tests" 120 smoke "${GPU_ONLY[@]}" "${NATIVE_TESTS[@]}" \
    tests/hgru/test_triton_backend.py "${TRITON_TRACKED[@]}" tests/hgru/test_tracked_step.py
  CRBP_FAST_TRITON_ONE_CONFIG=1 pytest_stage "paper-shape checks" 90 paper tests/hgru/test_paper_shape.py
  stage "bandwidth fp32" 45 "$PY" -m crbp_fast.hgru.triton.bandwidth --dtype float32 "${BW_ARGS[@]}" --out "$OUT/bandwidth.jsonl"
elif [ "$MODE" = targets ]; then
  # With the fused tracked passes (opt-in on CUDA until their gpu tests have passed): the run
  # also checks their gradients against the published algorithm's (worst relative error <= 1e-4).
  CRBP_FAST_CUDA_TRACKED=1 stage "bench targets" 120 bench targets "${TARGETS[@]}" --out "$OUT/targets.json"
else
  # The records first (the README's GPU table is filled from them; rows are kept as measured),
  # then the whole suite with what is left of the budget.
  mkdir -p "$OUT/records"
  ENGINES=(--backends torch triton native)
  [ "${CRBP_FAST_NO_EXT:-0}" = 1 ] && ENGINES=(--backends torch triton)
  stage "bandwidth bf16" 30 "$PY" -m crbp_fast.hgru.triton.bandwidth --dtype "$BF16" "${BW_ARGS[@]}" --out "$OUT/bandwidth.jsonl"
  stage "bench memory crbp" 40 bench memory "${SHAPE_BENCH[@]}" --algorithms crbp --steps "${MEM_CRBP[@]}" \
    --backends triton --conv fft --out "$OUT/records"
  stage "bench memory bptt" 40 bench memory "${SHAPE_BENCH[@]}" --algorithms bptt --steps "${MEM_BPTT[@]}" \
    --backends triton --conv fft --out "$OUT/records"
  stage "bench speed" 110 bench speed "${SHAPE_BENCH[@]}" "${ENGINES[@]}" --conv direct fft --algorithms bptt crbp \
    --speed-steps "${SPEED_STEPS[@]}" --compile-timeout 40 --out "$OUT/records"
  stage "bench plot" 15 bench plot --records "$OUT"/records/*.jsonl --out "$OUT/records"
  # One Triton config per kernel: no autotuning inside the measured iteration (its trial buffers
  # would count in the CUDA peak, and its compile time at every FPN level's shape is not needed).
  CRBP_FAST_TRITON_ONE_CONFIG=1 stage "bench panoptic" 60 bench_panoptic "${PANOPTIC[@]}" --out "$OUT/records"
  IGNORE=()
  [ "${CRBP_FAST_NO_EXT:-0}" = 1 ] && IGNORE=(--ignore=tests/hgru/test_native_backend.py --ignore=tests/hgru/test_native_tracked.py)
  pytest_stage "test suite" 200 full tests "${IGNORE[@]}" --ignore=tests/hgru/test_paper_shape.py
fi

# The device tool brings back at most 8 files, at most two folders down; this run promises one.
FILES=$(find "$OUT" -type f | wc -l)
DEEP=$(find "$OUT" -mindepth 3 | wc -l)
if [ "$FILES" -gt 8 ] || [ "$DEEP" -gt 0 ]; then
  printf '%-22s FAIL          %s files (at most 8), %s paths deeper than one folder\n' "output rules" "$FILES" "$DEEP" >>"$SUMMARY"
  FAILED=1
fi
say ""
say "== summary: gpu_checks.sh $MODE$([ "$DRY" = 1 ] && echo ' (dry run)'), $(($(date +%s) - START))s of ${BUDGET}s, $FILES files in $OUT"
tee -a "$LOG" <"$SUMMARY"
exit "$FAILED"
