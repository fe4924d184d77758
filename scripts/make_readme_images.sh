#!/usr/bin/env bash
# Regenerate the README pictures in docs/images/ from the synthetic release (about 15 s).
# Data goes to an ignored folder (default demo_data/readme); only the PNGs land in docs/images/.
# Usage: bash scripts/make_readme_images.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo_data/readme}
if [ -x .venv/bin/dvsprep ]; then DVSPREP=.venv/bin/dvsprep; else DVSPREP=dvsprep; fi
mkdir -p docs/images
"$DVSPREP" synth "$WORK/raw" --seed 0 --force
"$DVSPREP" convert "$WORK/raw" -o "$WORK/data" --force
"$DVSPREP" frames -T 8 -d "$WORK/data" --force
# One sample of every class (first of each in the test split), T=8 frames left to right.
"$DVSPREP" show "$WORK/data/frames_T8_number.zarr" --split test --label all -o docs/images/classes_T8.png --force
# One sample straight from events.h5: its 8 frames plus x/y-over-time rasters with the frame cuts.
"$DVSPREP" show "$WORK/data/events.h5" --split test --sample 3 -T 8 --scale 1 --columns 8 \
    -o docs/images/sample_events_T8.png --force
# The same sample's frames as an animation.
"$DVSPREP" show "$WORK/data/frames_T8_number.zarr" --split test --sample 3 --fps 4 -o docs/images/sample_T8.gif --force
ls -l docs/images/
