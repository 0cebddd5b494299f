#!/usr/bin/env bash
# Runs the tests that need torchvision (tests/panoptic) in .venv-vision (sets it up first).
# Extra arguments go to pytest. The core run (scripts/test.sh) does not collect tests/panoptic.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_vision_env.sh)
CRBP_VISION_TESTS=1 exec "$PY" -m pytest tests/panoptic -q "$@"
