#!/usr/bin/env bash
# GPU check for a lent machine with no network: installs the carried wheels (made here by
# scripts/fetch_gpu_wheels.sh into .whl/; torch, cupy, numpy are the machine's own and are not
# touched), runs every CUDA test, then the one-GPU training benchmark.
# Results land in $OUT (default ./gpu_out): gpu_tests.log, gpu_bench.json, gpu_bench.md,
# gpu_bench.log.
# Device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/dvsg_site}"
PY="${PY:-python3}"
BENCH_ARGS="${BENCH_ARGS:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== environment"
nvidia-smi -L || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
"$PY" -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy: not importable"

echo "== install carried wheels into $SITE (no index, no deps)"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
else
    echo "no wheels in $WHEELS (run scripts/fetch_gpu_wheels.sh here first)"; exit 1
fi
# The project itself, no dependencies; from the source tree if it cannot be built offline.
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$SITE" . >"$OUT/install.log" 2>&1; then
    export PYTHONPATH="$SITE"
else
    echo "project install failed (see install.log); using the source tree"
    export PYTHONPATH="$PWD:$SITE"
fi
"$PY" -c "import zarr, spikingjelly, dvsg_train, dvsprep; print('zarr', zarr.__version__, '- imports ok')" || exit 1

echo "== CUDA tests (+ the cupy kernel tests that run on CPU and nvcc)"
# `python -m pytest` puts the source tree first on sys.path; -p no:cacheprovider keeps it clean.
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cupy_lif.py -m "not cuda" 2>&1 \
    | tail -3 | tee -a "$OUT/gpu_tests.log"

echo "== benchmark (1176/288 samples, T=16, b=16, 128 channels)"
# shellcheck disable=SC2086
timeout 330 "$PY" benchmarks/bench_train_gpu.py --device cuda --json "$OUT/gpu_bench.json" \
    --md "$OUT/gpu_bench.md" $BENCH_ARGS 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
