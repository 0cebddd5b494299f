#!/usr/bin/env bash
# Runs the test suite (sets up the environment first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m pytest tests -q "$@"
