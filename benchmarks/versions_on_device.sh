#!/usr/bin/env bash
# Quality of several code versions side by side, and GPU memory/speed before and after, in one
# device call (16 CPU cores + one H100). The versions are `git archive` trees of this repo made on
# the dev machine (livevlm_ros/ and benchmarks/, with the current quality_bench.py copied in):
#
#   for pair in before:<sha> head:HEAD ...; do l=${pair%%:*}; mkdir -p .bench/trees/$l
#     git archive ${pair#*:} livevlm_ros benchmarks | tar -x -C .bench/trees/$l
#     cp benchmarks/quality_bench.py .bench/trees/$l/benchmarks/; done
#   # then, with the device tool: bash benchmarks/versions_on_device.sh .bench/jobs.txt  (carry .bench)
#
# Each line of the jobs file: LABEL POLICY-SPEC FRAMES SEEDS SEED_START. Quality jobs run on the
# CPU, one thread each, 13 at a time (float32, as on the dev machine); meanwhile gpu_bench.py runs
# for the trees named in GPU_TREES on the GPU. Everything lands in $OUT.
set -uo pipefail
jobs_file=$1
out=${OUT:-/tmp/out}
model=$(pwd)/models/livevlm-demo
mkdir -p "$out/q"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1

run_job() {   # label spec frames seeds start
  local name="$1_${2//[:=]/-}_f$3_s$5"
  CUDA_VISIBLE_DEVICES= timeout 560 python3 ".bench/trees/$1/benchmarks/quality_bench.py" --model "$model" \
    --policies "$2" --frames "$3" --seeds "$4" --seed-start "$5" --label "$1" --out "$out/q/$name.json" \
    > "$out/q/$name.log" 2>&1 && echo "done $name" || echo "FAILED $name"
}
export -f run_job
export model out

grep -v '^#' "$jobs_file" | xargs -r -P "${PARALLEL:-13}" -L 1 bash -c 'run_job "$@"' _ &
quality=$!

for tree in ${GPU_TREES:-}; do
  python3 ".bench/trees/$tree/benchmarks/gpu_bench.py" --out "$out/gpu_$tree" --skip hf,capacity \
    --lengths 256,1024 --long-frames 20000 > "$out/gpu_$tree.log" 2>&1
  echo "gpu $tree rc=$?"; tail -12 "$out/gpu_$tree.log"
done
wait $quality
# one JSON with every job's rows (the file count that comes back is limited)
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted((out / "q").glob("*.json"))}
(out / "quality_versions.json").write_text(json.dumps(merged))
print(len(merged), "quality jobs finished")
PY
tar -czf "$out/logs.tgz" -C "$out" q $(cd "$out" && ls -d gpu_* 2>/dev/null) && rm -rf "$out/q" "$out"/gpu_*/ 
