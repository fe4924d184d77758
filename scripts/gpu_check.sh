#!/usr/bin/env bash
# One-shot GPU check for a lent machine with no network (one H200: python 3.12, torch, cupy,
# triton, h5py installed; zarr and spikingjelly come as wheels in .whl/, made here by
# scripts/fetch_gpu_wheels.sh). Steps, each under its own `timeout`, each writing its result to
# $OUT the moment it ends (summary.md is rewritten after every step):
#   a_cuda_tests    every CUDA test but the big and whole-network ones
#   b_kernels_big   cupy vs torch at n = 2**20+37 and at T*n > 2**31 (fp16), all dtypes, LIF/PLIF
#   c_network       MultiStepNet --cupy vs torch backend on the GPU (fp32/fp16/bf16, both layouts)
#   d_train_cli     dvsg-train --cupy --amp --preload gpu, 1 epoch on a small synthetic store,
#                   --resume for one more, dvsg-eval
#   e_epoch_bench   seconds per epoch of dvsg-train at the seed's settings on a full-size store
#                   (1176/288, T=16, b=16, 128 channels), LIF/PLIF x fp16/bf16, beside
#                   SpikingJelly 2.0's DVSGestureNet (torch and triton backends)
#   f_bandwidth     the neuron kernels' GB/s beside the GPU's memory bandwidth
# The step limits add up to BUDGET (480 s) at most, checked before anything runs; the wheel
# install (45 s) and two version/import checks (30 s each) have their own limits: 585 s at
# most in all. $OUT gets at most 8 files: summary.md, one .log per step, e_epoch_bench.json.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--cpu] [--only a,d,...]
#   --dry-run  print every step's limit and commands, check the limits' sum and every step's
#              command (pytest selections collect, scripts parse their arguments); run nothing
#   --cpu      run what a CPU can (step d with CPU flags and tiny sizes) - what `make test` runs;
#              no step limit applies there unless --limit sets one (a loaded CPU is no budget)
#   --only a,d run only these steps;  --limit NAME=SECONDS  another limit for one step
# Device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
MODE=gpu
ONLY=""
LIMIT_OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --cpu) MODE=cpu ;;
        --only) shift; ONLY="${1:-}" ;;
        --limit) shift; LIMIT_OVERRIDES+=("${1:-}") ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

BUDGET=480
INSTALL_LIMIT=45
# name:limit (seconds). Order is run order.
STEPS=(a_cuda_tests:90 b_kernels_big:60 c_network:45 d_train_cli:75 e_epoch_bench:180 f_bandwidth:30)
# --limit NAME=SECONDS replaces a step's limit (the budget check below still applies)
OVERRIDDEN=" "
for o in "${LIMIT_OVERRIDES[@]+"${LIMIT_OVERRIDES[@]}"}"; do
    OVERRIDDEN+="${o%%=*} "
    for i in "${!STEPS[@]}"; do
        [ "${STEPS[$i]%%:*}" = "${o%%=*}" ] && STEPS[$i]="${o%%=*}:${o#*=}"
    done
done

export PY="${PY:-python3}"
export OUT="${OUT:-$ROOT/gpu_out}"
export WORK="${WORK:-${TMPDIR:-/tmp}/dvsg_gpu_check_$$}"
export ROOT MODE PYTHONUNBUFFERED=1
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/dvsg_site}"

if [ "$MODE" = gpu ]; then
    export D_SYNTH="--users 3 --test-users 1" D_T=8
    export D_TRAIN="--cupy --amp --amp-dtype fp16 --preload gpu -b 8 --channels 32"
    export D_EVAL="--preload gpu"
else
    export D_SYNTH="--users 2 --test-users 1" D_T=1
    export D_TRAIN="--amp --amp-dtype bf16 --preload cpu --device cpu -b 8 --channels 2 -j 0"
    export D_EVAL="--preload cpu --device cpu"
fi

# --------------------------------------------------------------------------- the steps
# pytest_step a|b|c [more pytest args]: the CUDA test selection of steps a, b and c.
pytest_step() {
    local which=$1
    shift
    case "$which" in
        a) set -- -m cuda -k "not big and not network" tests "$@" ;;
        b) set -- -m cuda -k big tests/test_cupy_lif.py "$@" ;;
        c) set -- -m cuda tests/test_network_equivalence.py "$@" ;;
    esac
    "$PY" -m pytest -q -p no:cacheprovider -rfE "$@"
}
step_a_cuda_tests() { pytest_step a; }
step_b_kernels_big() { pytest_step b; }
step_c_network() { pytest_step c; }

dvsprep() { "$PY" -c 'import sys; from dvsprep.cli import main; sys.exit(main())' "$@"; }
dvsg_train() { "$PY" -c 'import sys; from dvsg_train.cli import train_main; sys.exit(train_main())' "$@"; }
dvsg_eval() { "$PY" -c 'import sys; from dvsg_train.cli import eval_main; sys.exit(eval_main())' "$@"; }

step_d_train_cli() {
    set -e
    local w="$WORK/d" ckpt
    rm -rf "$w" && mkdir -p "$w"
    # shellcheck disable=SC2086
    dvsprep synth "$w/raw" $D_SYNTH -j 8
    dvsprep convert "$w/raw" -o "$w/data" -j 8
    dvsprep frames -T "$D_T" -d "$w/data" -j 8
    # --T-max fixed: the cosine schedule must not change when the run is extended
    local args=(--data "$w/data" -T "$D_T" --T-max 2 --out-dir "$w/runs" --run-name d)
    # shellcheck disable=SC2086
    dvsg_train "${args[@]}" $D_TRAIN --epochs 1
    ckpt="$w/runs/d/checkpoint_latest.pt"
    # shellcheck disable=SC2086
    dvsg_train "${args[@]}" $D_TRAIN --epochs 2 --resume "$ckpt"
    # shellcheck disable=SC2086
    dvsg_eval --checkpoint "$ckpt" --data "$w/data" $D_EVAL --png "$w/confusion.png"
    "$PY" - "$w/runs/d/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["epoch"] for r in rows] == [0, 1], rows
print("d: epochs", [r["epoch"] for r in rows], "s/epoch", [round(r["epoch_seconds"], 2) for r in rows])
EOF
}

step_e_epoch_bench() {
    "$PY" benchmarks/bench_train_gpu.py --work "$WORK/e" --json "$OUT/e_epoch_bench.json" \
        --time-limit 170
}

step_f_bandwidth() { "$PY" benchmarks/bench_lif_bandwidth.py --time-limit 25; }

export -f step_a_cuda_tests step_b_kernels_big step_c_network step_d_train_cli \
    step_e_epoch_bench step_f_bandwidth dvsprep dvsg_train dvsg_eval pytest_step

# --------------------------------------------------------------------------- plan and checks
selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",${1%%_*},"* ]]; }

total=0
for s in "${STEPS[@]}"; do total=$((total + ${s##*:})); done
if [ "$total" -gt "$BUDGET" ]; then
    echo "error: step limits add up to $total s, over the $BUDGET s budget" >&2
    exit 1
fi

if [ "$DRY" = 1 ]; then
    echo "plan: ${#STEPS[@]} steps, limits add up to $total s (budget $BUDGET s; install $INSTALL_LIMIT s)"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fail=0
    # the three test selections collect in parallel (each imports the test modules)
    for w in a b c; do
        (pytest_step "$w" --collect-only 2>&1 | grep -c '::' >"$WORK.collect_$w") &
    done
    mkdir -p "$(dirname "$WORK")"
    wait
    for s in "${STEPS[@]}"; do
        name=${s%%:*}; limit=${s##*:}
        echo "== step $name: timeout $limit s"
        declare -f "step_$name" | sed -n '3,$p' | sed '$d'
        case "$name" in
            a_*|b_*|c_*)   # the selection must collect tests (they are skipped without CUDA)
                n=$(cat "$WORK.collect_${name%%_*}" 2>/dev/null || echo 0)
                rm -f "$WORK.collect_${name%%_*}"
                echo "   collects $n tests"
                [ "$n" -gt 0 ] || { echo "error: step $name selects no test" >&2; fail=1; } ;;
            e_*) "$PY" benchmarks/bench_train_gpu.py --dry-run || fail=1 ;;
            f_*) "$PY" benchmarks/bench_lif_bandwidth.py --dry-run || fail=1 ;;
        esac
    done
    exit $fail
fi

# --------------------------------------------------------------------------- run
mkdir -p "$OUT" "$WORK"
SUMMARY="$OUT/summary.md"
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) mode=$MODE"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1; else echo "no nvidia-smi"; fi
    timeout 30 "$PY" - <<'EOF' 2>&1
import sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
for name in ("cupy", "triton"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "not importable:", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
EOF
    echo '```'
} >"$SUMMARY"

if [ "$MODE" = gpu ]; then
    echo "== install carried wheels into $SITE (no index, no deps)"
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS (run scripts/fetch_gpu_wheels.sh first)" | tee -a "$SUMMARY"
        exit 1
    fi
    timeout "$INSTALL_LIMIT" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$SUMMARY" 2>&1 \
        || { echo "wheel install failed" | tee -a "$SUMMARY"; exit 1; }
fi
# The source tree first: the tests, benchmarks and CLIs all use this checkout's code.
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
timeout 30 "$PY" -c "import zarr, dvsg_train, dvsprep; print('zarr', zarr.__version__, '- imports ok')" \
    >>"$SUMMARY" 2>&1 || { echo "imports failed" | tee -a "$SUMMARY"; exit 1; }
{ echo; echo "| step | limit s | exit | seconds |"; echo "| --- | --- | --- | --- |"; } >>"$SUMMARY"

status=0
for s in "${STEPS[@]}"; do
    name=${s%%:*}; limit=${s##*:}
    selected "$name" || continue
    if [ "$MODE" = cpu ] && [ "$name" != d_train_cli ]; then
        continue
    fi
    if [ "$MODE" = cpu ] && [[ "$OVERRIDDEN" != *" $name "* ]]; then
        limit=0            # timeout 0: none (the GPU limits do not measure a shared CPU)
    fi
    echo "== $name (timeout $limit s)"
    t0=$(date +%s)
    timeout -k 5 "$limit" bash -c "step_$name" >"$OUT/$name.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "TIMED OUT after $limit s" >>"$OUT/$name.log"
    echo "| $name | $limit | $rc | $dt |" >>"$SUMMARY"
    tail -n 5 "$OUT/$name.log"
    [ "$rc" = 0 ] || status=1
done
if [ -f "$WORK/e/bench.md" ]; then
    { echo; cat "$WORK/e/bench.md"; } >>"$SUMMARY"
fi
grep -h '^|' "$OUT/f_bandwidth.log" 2>/dev/null >>"$SUMMARY" || true
cat "$SUMMARY"
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
exit $status
