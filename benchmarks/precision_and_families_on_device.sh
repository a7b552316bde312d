#!/usr/bin/env bash
# Every GPU step of issues 21 and 22 in one device call (carry .bench/wheels: torchao for the GPU
# machine, which has no registry):
#   bash benchmarks/precision_and_families_on_device.sh  -> $OUT/families/*, $OUT/precision/*
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/out}"
mkdir -p "$out/families" "$out/precision"
python3 -m pip install -q --no-deps .bench/wheels/torchao-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
PYTHONUNBUFFERED=1 timeout 150 python3 benchmarks/family_bench.py --out "$out/families" \
    --models llava-ov-7b,qwen2.5-vl-7b,qwen3-vl-8b 2>&1 | grep -v "Loading weights" | tee "$out/families/log.txt"
PYTHONUNBUFFERED=1 python3 benchmarks/precision_bench.py --out "$out/precision" "$@" 2>&1 \
    | grep -v "Loading weights" | tee "$out/precision/log.txt"
