#!/usr/bin/env bash
# The main job (sets up the environment first). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m crbp_fast.demo "$@"
