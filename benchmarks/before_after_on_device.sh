#!/usr/bin/env bash
# The engine before and after a change on the GPU, in one device call (same machine, same hour):
# gpu_bench.py's ingest, response and decode parts with their self-checks (graph replay == static
# steps, bit for bit; attention and scoring kernels against torch), and the decode kernel over very
# long contexts. The older version is a `git archive` tree made on the dev machine:
#
#   mkdir -p .bench/trees/before && git archive <sha> livevlm_ros benchmarks | tar -x -C .bench/trees/before
#   # then, with the device tool (carry .bench):
#   bash benchmarks/before_after_on_device.sh before=.bench/trees/before head=.
#
# Everything lands in $OUT: gpu_<label>.json, decode_<label>.json, logs.tgz.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", transformers.__version__, torch.cuda.get_device_name())'
for pair in "$@"; do
  label=${pair%%=*}; tree=${pair#*=}
  timeout 300 python3 "$tree/benchmarks/gpu_bench.py" --out "$out/logs/gpu_$label" \
    --skip hf,hf_static,capacity,long_run --lengths 256 > "$out/logs/gpu_$label.log" 2>&1
  echo "== gpu_bench $label rc=$?"; tail -20 "$out/logs/gpu_$label.log"
  cp "$out/logs/gpu_$label/results.json" "$out/gpu_$label.json" 2>/dev/null
  timeout 120 python3 benchmarks/decode_long_context.py --tree "$tree" --out "$out/decode_$label.json" \
    > "$out/logs/decode_$label.log" 2>&1
  echo "== decode_long_context $label rc=$?"; cat "$out/logs/decode_$label.log" | cut -c1-300
done
tar -czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
