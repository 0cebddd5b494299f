#!/usr/bin/env bash
# Runs the test suite (sets up the environments first): the core tests, then tests/panoptic.
# Extra arguments go to the core run's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
"$PY" -m pytest tests -q "$@"
# The parts that need torchvision (the panoptic task) run in their own environment
# (scripts/setup_vision_env.sh: ~80 s and ~5.7 GB the first time). CRBP_SKIP_VISION=1 leaves
# them out, saying so.
if [ "${CRBP_SKIP_VISION:-0}" = 1 ]; then
  echo "[test] CRBP_SKIP_VISION=1: tests/panoptic NOT run" >&2
else
  bash scripts/test_vision.sh
fi
