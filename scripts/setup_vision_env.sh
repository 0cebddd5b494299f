#!/usr/bin/env bash
# Sets up .venv-vision, the environment of the parts that need torchvision (crbp_fast.tasks.panoptic,
# crbp_fast.models.RecurrentFPN, tests/panoptic), and prints the python to use.
#
# Why a second environment: the core .venv has the CPU build of torch 2.13, and every torchvision
# wheel on the index is built against a CUDA build of torch, so `import torchvision` fails beside
# it ("operator torchvision::nms does not exist"). The CUDA build of torch 2.14.1 with
# torchvision 0.29.1 runs on a CPU; it costs ~5.5 GB, so the core install stays lean and only
# this environment pays it. The package is installed editable without its native extension
# (CRBP_FAST_NO_EXT=1): the vision parts use the reference backend and need no compiler.
#
# - A machine whose python3 already imports torchvision and torchmetrics (the GPU image): that
#   python, as is (no package index is assumed there).
# - Anywhere else: .venv-vision in the checkout (git-ignored).
# Idempotent: a second run installs nothing unless the package's metadata changed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${CRBP_VISION_TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${CRBP_VISION_TORCHVISION_VERSION:-0.29.1}"

log() { echo "[setup-vision] $*" >&2; }

if python3 -c "import torchvision, torchmetrics, pycocotools" 2>/dev/null; then
  PY=python3
  log "using $(command -v python3) with its torchvision"
  if ! $PY -c "import crbp_fast" 2>/dev/null; then
    CRBP_FAST_NO_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e . >&2
  fi
else
  if [ ! -x .venv-vision/bin/python ]; then
    log "creating .venv-vision"
    python3 -m venv .venv-vision
    .venv-vision/bin/python -m pip install -q --upgrade pip >&2
  fi
  PY=.venv-vision/bin/python
  if ! $PY -c "import torchvision" 2>/dev/null; then
    log "installing torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION} (~5.5 GB)"
    $PY -m pip install -q "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" >&2
  fi
  stamp=.venv-vision/.crbp_fast-installed
  if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing torchmetrics, pycocotools and crbp_fast's dependencies"
    # torch is pinned in the same command so that no dependency resolves to another torch.
    $PY -m pip install -q "torch==${TORCH_VERSION}" torchmetrics pycocotools numpy scipy matplotlib tqdm \
      pytest pybind11 ninja triton >&2
    CRBP_FAST_NO_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e . >&2
    touch "$stamp"
  fi
fi
echo "$PY"
