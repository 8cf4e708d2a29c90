#!/usr/bin/env bash
# The GPU suite in one command: benchmarks/gpu_suite.sh OUTDIR
#
#   0. build the CUDA extension in place (flexigpt_kernels._C_cuda: the decode kernel runs and its
#      parity tests do not skip), for the visible GPU's architecture only
#   1. parity against the fp32/fp64 reference on CUDA (pytest -m gpu), one step per kernel group:
#      Triton + CUDA decode at bf16/fp16, the C++ backend's routing, fp32 (IEEE and TF32)
#   2. the kernel grid, one step per group so an agreement error in one group does not end the
#      others: decode (M 1, 8, 32; forward, timed inside CUDA graphs so the timings are the
#      kernels', not Python's launch overhead) and prefill/training (M 512..8192, fwd, fwd+bwd),
#      Llama-2-7B and SmolLM2 widths, +-norm
#   3. the multi-slice op (shared_lora_linear_stacked, SmolLM2's qkv and gate_up stacks) vs one
#      call per part vs dense, M 1, 8, 32 timed inside CUDA graphs (so the op must capture) and 512
#   4. end to end on a Llama-2-7B-shaped model with random weights, bf16 (no hub needed):
#      dense vs drop vs ours vs the same weights unfused, blocks 21..30 pruned (0.3), rank 256,
#      each sharing the nearest kept block (block 20: the base choice changes no shape, so no
#      timing, and skips the SVD search)
#   5. one decode step (1 token per sequence after 512, static KV cache) of that pruned model vs
#      the dense one, each captured whole in a CUDA graph and replayed (a model whose capture
#      fails is timed eagerly and says so in the log and the CSV's "step" column)
#   6. ratio-vs-M plots of the grid
# Everything lands in OUTDIR: build.log, parity_*.log/.xml, kernels_<gpu>.csv/.md/*.png,
# stacked_<gpu>.csv, model_<gpu>.csv/.md, decode_graph_<gpu>.csv, *.log, and summary.txt (one line per step with its exit status and seconds).
# Budget: <= 8 minutes on one H200 including the build and Triton compilation (each step has its
# own timeout; a step that fails or times out does not stop the others; kernel rows are appended
# to the CSV as they are measured, so a timed-out grid keeps what it measured).
#
# Environment: PYTHON (default: python3, with this checkout on PYTHONPATH);
#   FLEXIGPT_SUITE_SMOKE=1 runs every step on the CPU at the smallest shapes (what
#   tests/bench/test_bench_smoke.py does, so the script cannot rot without a GPU; the build step
#   only checks that setup.py parses there, and the decode step runs eagerly: no capture on a CPU).
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

SMOKE_SHAPE=(--shape 2x32x48x4 --budget 0.01 --threads 1)
if [[ ${FLEXIGPT_SUITE_SMOKE:-0} == 1 ]]; then
    DEVICE=cpu
    BUILD=("$PY" -c "import ast; ast.parse(open('setup.py').read())")
    PYTEST=(-m pytest -m gpu --collect-only -q -p no:cacheprovider)
    DECODE=("${SMOKE_SHAPE[@]}" --modes fwd --variants linear,norm+res)
    PREFILL=("${SMOKE_SHAPE[@]}" --modes fwd,fwd+bwd --variants linear)
    MODEL=(--random tiny --seq-len 16 --new-tokens 4 --rounds 1 --batches 1,2 --bases nearest --threads 1)
    STACKED=(--m 1,2 --budget 0.01 --threads 1)
    GRAPH=(--random tiny --prompt-len 16 --budget 0.05 --threads 1)
    T_BUILD=60 T_PARITY=120 T_FP32=120 T_DECODE=120 T_PREFILL=120 T_MODEL=120 T_PLOT=60 T_STACKED=120 T_GRAPH=120
else
    DEVICE=cuda
    ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")
    BUILD=(env FLEXIGPT_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace)
    PYTEST=(-m pytest -m gpu -q -p no:cacheprovider)
    DECODE=(--m 1,8,32 --modes fwd --cuda-graphs --rep-ms 50 --warmup-ms 10)
    PREFILL=(--m 512,4096 --modes fwd,fwd+bwd --rep-ms 50 --warmup-ms 10)
    MODEL=(--random llama2-7b --rank 256 --blocks 21,22,23,24,25,26,27,28,29,30 --bases nearest)
    STACKED=(--m 1,8,32,512 --cuda-graphs --rep-ms 50 --warmup-ms 10)
    GRAPH=(--random llama2-7b --rank 256 --blocks 21,22,23,24,25,26,27,28,29,30 --prompt-len 512)
    # 80 + 90 + 45 + 2 x (25 + 40) + 20 + 55 + 45 + 10 = 475 s of step budgets
    T_BUILD=80 T_PARITY=90 T_FP32=45 T_DECODE=25 T_PREFILL=40 T_STACKED=20 T_MODEL=55 T_GRAPH=45 T_PLOT=10
fi
junit() { [[ $DEVICE == cuda ]] && echo "--junitxml=$OUT/$1.xml"; }

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

step build "$T_BUILD" "${BUILD[@]}"
"$PY" -c 'from flexigpt_kernels.ops import library; print("CUDA decode extension:", library.NATIVE_CUDA)' \
    | tee -a "$OUT/environment.txt"
step parity_kernels "$T_PARITY" "$PY" "${PYTEST[@]}" $(junit parity_kernels) \
    tests/ops/test_shared_lora_linear.py tests/ops/test_cpp_backend.py
step parity_fp32    "$T_FP32"   "$PY" "${PYTEST[@]}" $(junit parity_fp32) tests/ops/test_triton_gpu.py
for family in smollm2 llama2-7b; do
    models=(--models "$family")
    [[ $DEVICE == cpu ]] && models=()  # the smoke shape replaces the grid
    step "kernels_decode_$family"  "$T_DECODE"  "$PY" -m flexigpt_kernels.cli bench kernels --device "$DEVICE" \
        --out "$OUT" --no-plot --no-stacked "${models[@]}" "${DECODE[@]}"
    step "kernels_prefill_$family" "$T_PREFILL" "$PY" -m flexigpt_kernels.cli bench kernels --device "$DEVICE" \
        --out "$OUT" --no-plot --no-stacked "${models[@]}" "${PREFILL[@]}"
    [[ $DEVICE == cpu ]] && break  # one family is enough for the smoke run
done
step stacked  "$T_STACKED" "$PY" -m flexigpt_kernels.bench.suite_steps stacked --device "$DEVICE" --out "$OUT" \
    "${STACKED[@]}"
step model    "$T_MODEL"   "$PY" -m flexigpt_kernels.cli bench model --device "$DEVICE" --out "$OUT" "${MODEL[@]}"
step decode_graph "$T_GRAPH" "$PY" -m flexigpt_kernels.bench.suite_steps decode-graph --device "$DEVICE" \
    --out "$OUT" "${GRAPH[@]}"
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
