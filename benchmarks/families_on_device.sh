#!/usr/bin/env bash
# Every GPU step of the model-families comparison (issue 21), in one device call:
#   bash benchmarks/families_on_device.sh            -> $OUT/families/{results.json,summary.txt,log.txt}
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/out}/families"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/family_bench.py --out "$out" "$@" 2>&1 | grep -v "Loading weights" | tee "$out/log.txt"
