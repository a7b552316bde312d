#!/usr/bin/env bash
# Every GPU step of issue 22 in one device call (carry .bench: .bench/wheels holds torchao for the GPU
# machine, which has no registry; .bench/old_quantized_linear.py, if there, is timed beside):
#   bash benchmarks/precision_on_device.sh [--shapes 7b,0.5b]  -> $OUT/back.tar (every result file)
# In order: merged_on_device.py checks the merged q/k/v and gate/up products and streams_on_device.py
# split products on two streams (~1 min); precision_bench.py (the arguments go to it); PROFILE=1 adds
# where an int4 answer token's GPU time goes (profile_answer.py, graph replay, int8 KV); LOAD=1 what
# loading takes on the device (precision_bench --load; beside it the code in .bench/old/ if there, and
# with LOAD_EXPANDABLE=1 under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); MEMORY=1 where a
# placed 7B int4 engine's memory goes (memory_breakdown.py; MEMORY_EXPANDABLE=1 again under
# expandable_segments); OVERHEAD=1 (first) what CUDA holds beyond torch, step by step (cuda_overhead.py);
# OLD_WEIGHTS: what the baseline loads (int4); last the products alone (linear_bench.py;
# LINEAR_ARGS passes it options), in what is left of LINEAR_BUDGET seconds (default 560) since the
# start, so a call that runs short still brings the decode figures. TUNE=1 runs the products first
# and precision_bench twice: with the defaults, and with the one-row settings the sweep chose
# (--gemv-from; GEMV_FROM=linear.json: another run's; TUNED_ARGS: its own arguments; TUNED_ONLY=1:
# only then). SKIP_PRECISION=1 / SKIP_LINEAR=1 / SKIP_CHECKS=1 / SKIP_MERGED=1
# leave those parts out. Every part writes under $WORK/back (default /tmp/work/back), which is packed
# into $OUT/back.tar after each part (a device call brings back 8 files at most, and a call cut short
# still brings what was done).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/out}"
work="${WORK:-/tmp/work}"
back="$work/back"
mkdir -p "$out" "$back" "$work/linear" "$work/precision" "$work/tuned" "$work/load"
pack() { tar -cf "$out/back.tar" -C "$work" back; }
python3 -m pip install -q --no-deps .bench/wheels/torchao-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$back/gpu.txt"
python3 -c "import torch, transformers, triton, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$back/gpu.txt"
against=()
[ -f .bench/old_quantized_linear.py ] && against=(--against .bench/old_quantized_linear.py)
if [ -z "${SKIP_CHECKS:-}" ]; then
    [ -z "${SKIP_MERGED:-}" ] && PYTHONUNBUFFERED=1 python3 benchmarks/merged_on_device.py --out "$work/merged.json" 2>&1 \
        | tail -8 | tee "$back/checks.txt"; cp "$work/merged.json" "$back/" 2>/dev/null
    PYTHONUNBUFFERED=1 python3 benchmarks/streams_on_device.py "${against[@]}" 2>&1 | tail -4 | tee -a "$back/checks.txt"
fi
if [ -n "${OVERHEAD:-}" ]; then
    PYTHONUNBUFFERED=1 python3 benchmarks/cuda_overhead.py --out "$work/overhead" 2>&1 | tee "$back/overhead_log.txt"
    cp "$work/overhead/cuda_overhead.json" "$back/"; pack
fi
pack
linear() {
    local left=$(( ${LINEAR_BUDGET:-560} - SECONDS ))
    if [ -z "${SKIP_LINEAR:-}" ] && [ "$left" -gt 30 ]; then
        PYTHONUNBUFFERED=1 timeout "$left" python3 benchmarks/linear_bench.py --out "$work/linear" \
            ${LINEAR_ARGS:-} 2>&1 | tee "$work/linear/log.txt"
        cp "$work/linear/linear.json" "$back/linear.json"; cp "$work/linear/log.txt" "$back/linear_log.txt"; pack
    fi
}
precision() {   # precision [extra precision_bench arguments] -- the script's own arguments follow
    local dir="$1"; shift
    PYTHONUNBUFFERED=1 python3 benchmarks/precision_bench.py --out "$work/$dir" "$@" 2>&1 \
        | grep -v "Loading weights\|_pytree" | tee "$work/$dir/log.txt"
    cp "$work/$dir/precision.json" "$back/$dir.json"; cp "$work/$dir/log.txt" "$back/${dir}_log.txt"; pack
}
[ -n "${TUNE:-}" ] && linear
if [ -z "${SKIP_PRECISION:-}" ]; then
    [ -z "${TUNED_ONLY:-}" ] && precision precision "$@"
    if [ -n "${TUNE:-}" ] && [ -f "${GEMV_FROM:-$work/linear/linear.json}" ]; then
        if [ -n "${TUNED_ARGS:-}" ]; then set -- $TUNED_ARGS; fi
        precision tuned --gemv-from "${GEMV_FROM:-$work/linear/linear.json}" "$@"
    fi
fi
if [ -n "${PROFILE:-}" ]; then
    PYTHONUNBUFFERED=1 python3 benchmarks/profile_answer.py --shape 7b --weights int4 --kv int8 --modes graph \
        --rows 30 --out "$back/profile_int4.txt" 2>&1 | grep -v "Loading weights\|_pytree" | tail -3
    pack
fi
load() {   # load <name> [environment assignments]: precision_bench --load (from .bench/old/ for the name "old")
    local name="$1" script=benchmarks/precision_bench.py; shift
    [ "$name" = old ] && script=.bench/old/benchmarks/precision_bench.py
    mkdir -p "$work/$name"
    env "$@" PYTHONUNBUFFERED=1 python3 "$script" --shapes 7b --weights "${LOAD_WEIGHTS:-int4,int8}" --load \
        --out "$work/$name" 2>&1 | grep -v "Loading weights\|_pytree" | tee "$back/${name}_log.txt"
    cp "$work/$name/load.json" "$back/$name.json"; pack
}
if [ -n "${LOAD:-}" ]; then
    load load
    # the same call's baseline: the code before, if carried (git archive <commit> livevlm_ros benchmarks)
    [ -f .bench/old/benchmarks/precision_bench.py ] && LOAD_WEIGHTS=${OLD_WEIGHTS:-int4} load old
    [ -n "${LOAD_EXPANDABLE:-}" ] && LOAD_WEIGHTS=int4 load load_expandable PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
if [ -n "${MEMORY:-}" ]; then   # where a placed 7B int4 engine's device memory goes
    PYTHONUNBUFFERED=1 python3 benchmarks/memory_breakdown.py --out "$work/memory" 2>&1 \
        | grep -v "Loading weights\|_pytree" | tee "$back/memory_log.txt"
    cp "$work/memory/memory_breakdown.json" "$back/"; pack
fi
if [ -n "${MEMORY_EXPANDABLE:-}" ]; then
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 python3 benchmarks/memory_breakdown.py \
        --out "$work/memory_expandable" 2>&1 | grep -v "Loading weights\|_pytree" | tee "$back/memory_expandable_log.txt"
    cp "$work/memory_expandable/memory_breakdown.json" "$back/memory_breakdown_expandable.json"; pack
fi
[ -z "${TUNE:-}" ] && linear
true
