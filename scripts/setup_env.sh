#!/usr/bin/env bash
# Sets up the environment that the README's commands run in, and prints the python to use.
#
# - A machine whose python3 already has a CUDA-enabled torch (a GPU image): that python, as is
#   (no package index is assumed; the extension builds against its torch).
# - Anywhere else: a local virtual environment .venv with the CPU build of torch pinned
#   (an unpinned torch would pull gigabytes of CUDA packages).
# Idempotent: a second run only re-installs the package when its sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CPU_VERSION="${CRBP_TORCH_VERSION:-2.13.0}"

log() { echo "[setup] $*" >&2; }

if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=python3
  log "using $(command -v python3) with its CUDA torch"
  if ! $PY -c "import crbp_fast.hgru.native._C" 2>/dev/null || [ -n "${CRBP_REINSTALL:-}" ]; then
    if $PY -c "import os, sysconfig, sys; sys.exit(0 if os.access(sysconfig.get_paths()['purelib'], os.W_OK) else 1)"; then
      $PY -m pip install -q --no-build-isolation --no-deps -e . >&2
    else
      # A read-only site-packages (the GPU image): build in place; the README's commands run
      # from the checkout, which `python -m` puts on sys.path.
      log "site-packages is read-only: building the extension in place"
      $PY setup.py -q build_ext --inplace >&2
    fi
  fi
else
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >&2
  fi
  PY=.venv/bin/python
  if ! $PY -c "import torch" 2>/dev/null; then
    log "installing torch==${TORCH_CPU_VERSION} (CPU build)"
    $PY -m pip install -q "torch==${TORCH_CPU_VERSION}" >&2
  fi
  stamp=.venv/.crbp_fast-installed
  if [ ! -f "$stamp" ] || [ -n "$(find setup.py crbp_fast csrc -newer "$stamp" -type f 2>/dev/null | head -1)" ] || [ -n "${CRBP_REINSTALL:-}" ]; then
    log "installing crbp_fast and its dependencies"
    $PY -m pip install -q triton numpy scipy matplotlib tqdm pytest pytest-benchmark pybind11 ninja cmake >&2
    $PY -m pip install -q --no-build-isolation -e . >&2
    touch "$stamp"
  fi
fi
echo "$PY"
