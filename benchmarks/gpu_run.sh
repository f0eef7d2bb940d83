#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (see README, "Benchmarks"):
#   correctness of the Triton kernels on the device, then the GPU presets of the benchmarks.
# Results land in benchmarks/results/ (named after the device) and, on the device tool, in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu_env.txt"

status=0
# Each step has its own time limit so one slow step cannot use up a lease (10 minutes a call).
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt" || status=1
timeout 240 python3 benchmarks/bench_ihl.py --preset gpu 2>&1 | tee "$OUT/bench_ihl_gpu.txt" || status=1
timeout 150 python3 benchmarks/bench_fisher.py --preset gpu --quick 2>&1 | tee "$OUT/bench_fisher_gpu.txt" || status=1
timeout 120 python3 benchmarks/bench_fisher.py --preset gpu --memory 2>&1 | tee "$OUT/bench_fisher_memory_gpu.txt" || status=1
[ "$OUT" != benchmarks/results ] && cp benchmarks/results/*_h[12]00* "$OUT/" 2>/dev/null
exit $status
