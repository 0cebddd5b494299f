#!/usr/bin/env bash
# The main job: the benchmark suite on this machine's default device (sets up the environment
# first). CPU: the --quick preset (about a minute); CUDA: the --paper preset. Extra arguments
# go to `crbp-fast bench all`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m crbp_fast.cli bench all "$@"
