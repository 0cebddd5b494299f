#!/usr/bin/env bash
# Figure 1 on one GPU, as one prepared command that fits the device tool's 10-minute limit:
# Pathfinder-14 segmentation at 150 x 150, C = 25, k = 15 (the paper's shape), BPTT-6, C-BPTT-6,
# C-RBP-20 and RBP-20 trained side by side (4 processes on the one GPU) on the same data, batch
# and number of optimizer steps, then F1 / IoU per step to T = 40 and Figure 1 a / b / c.
#
#   bash scripts/figure1_gpu.sh                       # ITERS=300 optimizer steps, batch 32
#   ITERS=600 TRAIN_LIMIT=420 bash scripts/figure1_gpu.sh
#   CRBP_GPU_DRYRUN=1 OUT=DIR bash scripts/figure1_gpu.sh   # the same stages on CPU, tiny
#
# UNTESTED ON A GPU: written and dry-run on a CPU machine only. The step time at the paper's
# shape on an H200 with four trainers sharing it is not known; TRAIN_LIMIT caps the training
# stage, and whatever the trainers reached by then (they checkpoint every 50 steps and on
# SIGTERM) is evaluated by `figure1 --evaluate-only`, which records each model's step reached.
#
# Writes as it goes into $OUT (a new temporary folder when unset), at most 8 files, no folders:
#   run.log          every stage's output in order, and the stage summary at the end
#   summary.json     figure1's summary (F1 / IoU per step per model, KS tests, settings, wall time)
#   state_space.png segmentations.png distances.png metric_vs_step.png training_loss.png
#   runs.tar.gz      each model's config.json, log.jsonl and train.out (no checkpoints)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET=${BUDGET:-570}
DRY="${CRBP_GPU_DRYRUN:-0}"
OUT="${OUT:-$(mktemp -d -t crbp-figure1.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
START=$(date +%s)
STAGES=""
FAILED=0
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-/tmp/crbp-figure1-work}

if [ "$DRY" = 1 ]; then
  PY=${PY:-$(bash scripts/setup_env.sh 2>>"$LOG")} || { echo "setup_env.sh failed" | tee -a "$LOG"; exit 1; }
  export CUDA_VISIBLE_DEVICES=""
  ITERS=${ITERS:-3}; TRAIN_LIMIT=${TRAIN_LIMIT:-120}
  ARGS=(--size 32 --length 4 --channels 4 --kernel-size 3 --batch-size 4 --train-images 32 --eval-images 8
        --eval-batch 4 --test-steps 8 --pca-images 3 --train-eval-every 0 --train-eval-images 4
        --models bptt:2 cbptt:2 crbp:4 rbp:4 --parallel 4 --threads 1 --data-workers 1 --device cpu)
else
  PY=${PY:-python3}
  ITERS=${ITERS:-300}; TRAIN_LIMIT=${TRAIN_LIMIT:-400}
  ARGS=(--size 150 --length 14 --channels 25 --kernel-size 15 --batch-size 32 --lr 1e-3
        --train-images "$((ITERS * 32 < 9600 ? ITERS * 32 : 9600))" --eval-images 256 --eval-batch 32
        --test-steps 40 --pca-images 16 --train-eval-every 0 --train-eval-images 128 --checkpoint-every 50
        --parallel 4 --threads 2 --data-workers 12 --device cuda)
fi
[ "$DRY" = 1 ] && rm -rf "$WORK"
FIG=(-m crbp_fast.cli figure1 --out "$WORK" --iterations "$ITERS" "${ARGS[@]}" --no-progress --report-every 30)

say() { echo "$*" | tee -a "$LOG"; }
stage() {  # stage NAME SECONDS CMD...: under `timeout` (SIGTERM first: figure1 checkpoints its trainers)
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then STAGES+="$(printf '%-14s NOT REACHED' "$name")"$'\n'; FAILED=1; return 1; fi
  say ""; say "== $name (limit ${limit}s, $(date +%T))"
  local t0=$(date +%s) rc
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local status=PASS
  # the train stage's time limit is planned: the trainers checkpoint and `evaluate` takes over
  [ "$rc" -eq 124 ] && status=TIMEOUT && [ "$name" = train ] && status="TIME LIMIT"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAIL(exit $rc)"
  [ "$status" != PASS ] && [ "$status" != "TIME LIMIT" ] && FAILED=1
  STAGES+="$(printf '%-14s %-14s %4ss' "$name" "$status" "$(($(date +%s) - t0))")"$'\n'
  say "== $name: $status"
  [ "$status" = PASS ]
}

say "figure1_gpu.sh$([ "$DRY" = 1 ] && echo ' (dry run)') -> $OUT, budget ${BUDGET}s, ITERS=$ITERS, commit $(git rev-parse --short HEAD 2>/dev/null)"
stage versions 30 bash -c "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available())'"
# data + training; at TRAIN_LIMIT the trainers are stopped (each checkpoints) and evaluated as they are
stage train "$TRAIN_LIMIT" "$PY" "${FIG[@]}"
TRAIN_OK=$?
if [ "$TRAIN_OK" -eq 0 ]; then
  say "(figure1 finished its evaluation in the train stage)"
else
  stage evaluate 150 "$PY" "${FIG[@]}" --evaluate-only
fi
cp "$WORK/summary.json" "$OUT/" 2>/dev/null
for f in state_space segmentations distances metric_vs_step training_loss; do
  cp "$WORK/figures/$f.png" "$OUT/" 2>/dev/null
done
(cd "$WORK" && tar czf "$OUT/runs.tar.gz" runs/*/config.json runs/*/log.jsonl runs/*/train.out settings.json timing.json 2>/dev/null)
FILES=$(find "$OUT" -type f | wc -l)
[ "$FILES" -gt 8 ] && { STAGES+="output rules   FAIL           $FILES files (at most 8)"$'\n'; FAILED=1; }
say ""
say "== summary: $(($(date +%s) - START))s of ${BUDGET}s, $FILES files in $OUT"
printf '%s' "$STAGES" | tee -a "$LOG"
exit "$FAILED"
