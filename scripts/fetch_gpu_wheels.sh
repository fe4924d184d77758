#!/usr/bin/env bash
# Download the pure-Python / manylinux wheels that scripts/gpu_check.sh installs on a GPU
# machine with no network (python 3.12, x86-64; torch, cupy, h5py, click, tqdm, numpy, pyyaml
# are already there). Usage: scripts/fetch_gpu_wheels.sh [DIR]   (default: .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PY:-python3}"
mkdir -p "$DEST"
# Keep the wheels out of git (the device tool carries them as an ignored path).
if [ -d .git ] && ! git check-ignore -q "$DEST/x.whl" 2>/dev/null; then
    echo "/${DEST#./}/" >> .git/info/exclude
fi
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
# zarr 3 and its needs (numcodecs, donfig, google-crc32c); spikingjelly 2.0.0 for the baseline
# and its logger (loguru). Pinned to the versions the CPU environment tests against.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    spikingjelly==2.0.0 loguru==0.7.3
ls -l "$DEST"
