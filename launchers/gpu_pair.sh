#!/usr/bin/env bash
# bash launchers/gpu_pair.sh 'COMMAND FOR GPU 0' ['COMMAND FOR GPU 1']
#
# One device call on a 2-GPU box (nvidia-h200-x2), two GPU jobs at once: installs the carried wheels (.whl/, from
# `bash launchers/gpu_wheels.sh`) once into /tmp/site, then runs each command with CUDA_VISIBLE_DEVICES=N,
# PYTHONPATH=/tmp/site:$PWD, PYTHON=python3, GPU_CHECK_SITE=/tmp/site and OUT=/tmp/gpuN, and packs every .md,
# .json, .jsonl and .log under /tmp/gpuN into $OUT/gpuN.tgz (the device brings back a few files per call).
# With one command it runs on GPU 0 alone. Each command is ended after PAIR_LIMIT_S seconds (default 540, counted
# from the start of this script) so that the packing still happens inside the device's 10-minute call: a call cut
# off by the device brings nothing back (that lost one 2026-11-29 call). Give the run's timeout_s >= PAIR_LIMIT_S + 40.
# Example (docs/BENCHMARKS.md lists the calls of each session):
#   bash launchers/gpu_pair.sh \
#     'bash launchers/gpu_check.sh --out $OUT --work $OUT/w --budget-s 470 --hard-s 540 pipeline' \
#     'BENCH_TIMEOUT=300 bash launchers/bench_mxfp4.sh fit80'
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-/tmp/gpu_pair_out}
limit=${PAIR_LIMIT_S:-540}
started=$SECONDS
mkdir -p "$final"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
touch /tmp/site/.gptoss_wheels
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
pids=()
left=$((limit - (SECONDS - started)))
for n in 0 1; do
  [ "$n" -eq 0 ] && cmd=${1:-} || cmd=${2:-}
  [ -n "$cmd" ] || continue
  mkdir -p "/tmp/gpu$n"
  (
    export CUDA_VISIBLE_DEVICES=$n PYTHONPATH="/tmp/site:$PWD" PYTHON=python3 GPU_CHECK_SITE=/tmp/site OUT="/tmp/gpu$n"
    export TORCHINDUCTOR_CACHE_DIR="/tmp/inductor$n"
    echo "[gpu $n] $cmd"
    timeout -k 10 "$left" bash -c "$cmd"
    rc=$?
    [ "$rc" -eq 124 ] && echo "[gpu $n] ended at PAIR_LIMIT_S=$limit s"
    echo "[gpu $n] exit $rc"
  ) >"/tmp/gpu$n/console.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for n in 0 1; do
  [ -d "/tmp/gpu$n" ] || continue
  tail -n 40 "/tmp/gpu$n/console.log"
  (cd /tmp && find "gpu$n" \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' -o -name '*.log' \) -size -20M -print0 \
    | tar --null -czf "$final/gpu$n.tgz" -T -)
done
