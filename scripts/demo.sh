#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic release, on the CPU:
#   synth -> convert -> frames -> verify -> a short dvsg-train run -> dvsg-eval.
# Usage: bash scripts/demo.sh [WORK_DIR]   (default demo_data/; rerunning replaces its contents)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo_data}
BIN=.venv/bin
[ -x "$BIN/dvsprep" ] || BIN=$(dirname "$(command -v dvsprep)")
T=${DEMO_T:-8}
EPOCHS=${DEMO_EPOCHS:-20}
CHANNELS=${DEMO_CHANNELS:-8}
start=$(date +%s)
set -x
"$BIN/dvsprep" synth "$WORK/raw" --force
"$BIN/dvsprep" convert "$WORK/raw" -o "$WORK/data" --force
"$BIN/dvsprep" frames -T "$T" -d "$WORK/data" --force
"$BIN/dvsprep" verify "$WORK/data/frames_T${T}_number.zarr"
"$BIN/dvsg-train" --data "$WORK/data/frames_T${T}_number.zarr" -T "$T" -b 8 --epochs "$EPOCHS" \
    --channels "$CHANNELS" --lr 0.02 --device cpu --out-dir "$WORK/runs" --run-name demo --force -q
"$BIN/dvsg-eval" --checkpoint "$WORK/runs/demo/checkpoint_max.pt" --data "$WORK/data/frames_T${T}_number.zarr" \
    --device cpu --force
set +x
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $WORK/ (curves: $WORK/runs/demo/)"
