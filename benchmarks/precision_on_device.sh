#!/usr/bin/env bash
# Every GPU step of issue 22 in one device call (carry .bench/wheels: torchao for the GPU machine,
# which has no registry):
#   bash benchmarks/precision_on_device.sh [--shapes 7b,0.5b]  -> $OUT/merged.json, $OUT/precision/*, $OUT/linear/*
# In order: merged_on_device.py checks the merged q/k/v and gate/up products (~1 min); precision_bench.py
# (the arguments go to it); LOAD=1 adds what loading takes on the device (precision_bench --load: 7B
# int4 and int8 built on the device against placed from the CPU one Linear at a time); last the
# products alone (linear_bench.py; LINEAR_ARGS passes it options), in what is left of LINEAR_BUDGET
# seconds (default 560) since the start, so a call that runs short still brings the decode figures.
# SKIP_PRECISION=1 / SKIP_LINEAR=1 leave those parts out.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/out}"
mkdir -p "$out/linear" "$out/precision" "$out/load"
python3 -m pip install -q --no-deps .bench/wheels/torchao-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
PYTHONUNBUFFERED=1 python3 benchmarks/merged_on_device.py --out "$out/merged.json" 2>&1 | tail -8
if [ -z "${SKIP_PRECISION:-}" ]; then
    PYTHONUNBUFFERED=1 python3 benchmarks/precision_bench.py --out "$out/precision" "$@" 2>&1 \
        | grep -v "Loading weights\|_pytree" | tee "$out/precision/log.txt"
fi
if [ -n "${LOAD:-}" ]; then
    PYTHONUNBUFFERED=1 python3 benchmarks/precision_bench.py --shapes 7b --weights int4,int8 --load --out "$out/load" 2>&1 \
        | grep -v "Loading weights\|_pytree" | tee "$out/load/log.txt"
fi
left=$(( ${LINEAR_BUDGET:-560} - SECONDS ))
if [ -z "${SKIP_LINEAR:-}" ] && [ "$left" -gt 30 ]; then
    PYTHONUNBUFFERED=1 timeout "$left" python3 benchmarks/linear_bench.py --out "$out/linear" \
        ${LINEAR_ARGS:-} 2>&1 | tee "$out/linear/log.txt"
fi
