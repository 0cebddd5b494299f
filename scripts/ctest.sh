#!/usr/bin/env bash
# Builds the CPU kernels of the native extension against LibTorch with CMake and runs their C++
# tests (tests/cpp) with ctest: a Release build, then an AddressSanitizer + UndefinedBehavior-
# Sanitizer build (kernels still -O3, tests -O0; CRBP_CTEST_SANITIZE=0 skips it). Uses the torch
# of the python that scripts/setup_env.sh sets up (CRBP_PYTHON overrides it). Build trees stay in
# build/cmake and build/cmake-asan (git-ignored), so a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CRBP_PYTHON:-$(bash scripts/setup_env.sh)}
case "$PY" in */*) export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH" ;; esac  # the venv's cmake, ninja
prefix=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi

log() { echo "[ctest] $*" >&2; }

build_and_test() {  # build dir, build type, extra cmake arguments
  local dir=$1 type=$2 start=$SECONDS
  shift 2
  cmake -S . -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE="$type" -DCMAKE_PREFIX_PATH="$prefix" "$@" >/dev/null
  cmake --build "$dir" -j "${MAX_JOBS:-$(nproc)}"
  ctest --test-dir "$dir" --output-on-failure
  log "$dir ($type $*): built and tested in $((SECONDS - start)) s"
}

build_and_test build/cmake Release -DCRBP_SANITIZE=OFF
if [ "${CRBP_CTEST_SANITIZE:-1}" != 0 ]; then
  build_and_test build/cmake-asan Debug -DCRBP_SANITIZE=ON
fi
