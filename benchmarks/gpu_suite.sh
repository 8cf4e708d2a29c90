#!/usr/bin/env bash
# The GPU suite in one command: benchmarks/gpu_suite.sh OUTDIR
#
#   1. bf16 (and fp16) parity of the op against the fp32 reference on CUDA: pytest -m gpu
#   2. the kernel grid (not --quick): Llama-2-7B and SmolLM2 widths, M 1..8192, +-norm, fwd, fwd+bwd
#   3. end to end on a Llama-2-7B-shaped model with random weights, bf16 (no hub needed):
#      dense vs drop vs ours vs the same weights unfused, blocks 21..30 pruned (0.3), rank 256,
#      each sharing the nearest kept block (block 20: the base choice changes no shape, so no
#      timing, and skips the SVD search)
#   4. ratio-vs-M plots of the grid
# Everything lands in OUTDIR: parity.log/.xml, kernels_<gpu>.csv/.md/*.png, model_<gpu>.csv/.md,
# *.log, and summary.txt (one line per step with its exit status and seconds).
# Budget: <= 8 minutes on one H200 including Triton compilation (each step has its own timeout;
# a step that fails or times out does not stop the others; kernel rows are appended to the CSV
# as they are measured, so a timed-out grid keeps what it measured).
#
# Environment: PYTHON (default: python3, with this checkout on PYTHONPATH);
#   FLEXIGPT_SUITE_SMOKE=1 runs every step on the CPU at the smallest shapes (what
#   tests/bench/test_gpu_suite.py does, so the script cannot rot without a GPU).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0          # compiled Triton kernels, never the interpreter, on the GPU
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if [[ ${FLEXIGPT_SUITE_SMOKE:-0} == 1 ]]; then
    DEVICE=cpu
    PARITY=(-m pytest tests/ops -m gpu --collect-only -q -p no:cacheprovider)
    KERNELS=(--shape 2x32x48x4 --budget 0.01 --modes fwd --variants linear,norm+res --threads 1)
    MODEL=(--random tiny --seq-len 16 --new-tokens 4 --rounds 1 --batches 1,2 --bases nearest --threads 1)
    T_PARITY=120 T_KERNELS=120 T_MODEL=120 T_PLOT=60
else
    DEVICE=cuda
    PARITY=(-m pytest tests/ops -m gpu -q -p no:cacheprovider --junitxml "$OUT/parity.xml")
    KERNELS=(--rep-ms 50 --warmup-ms 10)
    MODEL=(--random llama2-7b --rank 256 --blocks 21,22,23,24,25,26,27,28,29,30 --bases nearest)
    T_PARITY=170 T_KERNELS=180 T_MODEL=100 T_PLOT=20
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT/NAME.log, record status and seconds
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    echo "== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))$([[ $rc == 124 || $rc == 137 ]] && echo ' TIMED OUT')" | tee -a "$SUMMARY"
    return 0
}

"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
from flexigpt_kernels.ops import backends
print("backends built:", backends.available_backends())
EOF
if [[ $DEVICE == cuda ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: run with FLEXIGPT_SUITE_SMOKE=1 for the CPU smoke version" >&2
    exit 1
fi

step parity   "$T_PARITY"  "$PY" "${PARITY[@]}"
step kernels  "$T_KERNELS" "$PY" -m flexigpt_kernels.cli bench kernels --device "$DEVICE" --out "$OUT" --no-plot "${KERNELS[@]}"
step model    "$T_MODEL"   "$PY" -m flexigpt_kernels.cli bench model --device "$DEVICE" --out "$OUT" "${MODEL[@]}"
shopt -s nullglob
csvs=("$OUT"/kernels_*.csv)
if (( ${#csvs[@]} )); then
    step plot "$T_PLOT" "$PY" -m flexigpt_kernels.cli bench plot "${csvs[@]}" --out "$OUT"
else
    echo "plot rc=1 seconds=0 (no kernels CSV)" | tee -a "$SUMMARY"
fi

echo "== summary ($OUT/summary.txt)"
cat "$SUMMARY"
if grep -q "rc=[^0]" "$SUMMARY"; then
    exit 1
fi
