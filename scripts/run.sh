#!/usr/bin/env bash
# The main job: the benchmark suite on this machine's default device (sets up the environment
# first). CPU: the --quick preset (about a minute); CUDA: the --paper preset. Extra arguments
# go to `crbp-fast bench all`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
# Records and plots go to bench-results/ (git-ignored), so the checkout stays clean; the
# committed records in benchmarks/results/ are curated (README: "To commit a run"). A later
# --out in "$@" wins.
exec "$PY" -m crbp_fast.cli bench all --out bench-results "$@"
