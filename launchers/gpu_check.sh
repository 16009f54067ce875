#!/usr/bin/env bash
# bash launchers/gpu_check.sh [--cpu] [--budget-s S] [PHASE ...]      PHASE: pipeline configs bench 2gpu knobs[:A-B] long[:PART]
#                                                                          pipeline120b[:LAYERS] fit:SIZE@GIB
#
# The GPU check (issue 13): on a bare GPU box (no internet; torch, transformers, accelerate installed; every other
# package brought as wheels in .whl/), write a synthetic gpt-oss-20b checkpoint and run the real pipeline
# train -> merge -> eval -> serve with cluster=local and the shipped defaults, then train=default / train=reference
# (with `python -m gptoss_hpc.bench train` beside them), 2 GPUs (phase 2gpu) and the GPU knob list (phase knobs).
# One table: stage/config, pass/fail, wall s, peak GPU GiB, trainer tok/s vs bench tok/s, tokens per step.
# Results go to $OUT (gpu_check.md, gpu_check.json) when $OUT is set. Each phase is self-contained (the machine
# is wiped between commands) and stops starting new runs after --budget-s (default 480 s).
#
# GPU-only knob list (what CPU CI cannot run; the rest runs on CPU in tests/test_knob_combinations.py), phase
# `knobs`, entries of gptoss_hpc.bench.gpu_check_knobs.GPU_KNOBS on a 4-layer 20b-shaped checkpoint:
#   0  experts x1  fused_experts, compile_layers, packing                      (train=default)
#   1  experts x1  fused_experts, compile_layers, gradient_checkpointing       (train=reference; the H200 crash)
#   2  experts x1  fused_experts, gradient_checkpointing
#   3  experts x1  compile_layers, gradient_checkpointing                      (layers stay eager, logged)
#   4  experts x1  gradient_checkpointing, packing
#   5  experts x1  fused_experts, packing
#   6  experts x1  compile_layers, packing
#   7  experts x1  no knobs
#   8  experts x1  fused_experts, compile_layers, gradient_checkpointing, packing
#   9  experts x1  fused_experts, compile_layers
#  10  attention x1  default        11  attention x1  reference
#  12  all_linear x1 default        13  all_linear x1 reference
#  14  experts x2    default        15  experts x2    reference               (needs 2 GPUs)
#
# Device commands (each under 10 minutes; see docs/BENCHMARKS.md for results):
#   bash launchers/gpu_check.sh pipeline          bash launchers/gpu_check.sh configs bench
#   bash launchers/gpu_check.sh knobs:0-7         bash launchers/gpu_check.sh knobs:8-13
#   bash launchers/gpu_check.sh 2gpu knobs:14-15  (nvidia-h200-x2)
#   CUDA_VISIBLE_DEVICES=1 GPU_CHECK_SITE=/tmp/site1 bash launchers/gpu_check.sh --work logs/gc120 pipeline120b
#     (nvidia-h200-x2, GPU 1 beside another run on GPU 0; 120b end to end, repeat with the same --work to go on)
#   bash launchers/gpu_check.sh fit:20b@24        (20b's shipped defaults on a 24 GiB card: what train.fit_memory picks,
#                                                 the allocator capped at 24 GiB; fit:120b@80 on nvidia-h200-x2: disk)
#   Long rows (issue 27; gptoss_hpc.bench.gpu_check_long), one command each, in this order on one warm machine:
#   bash launchers/gpu_check.sh long:attn                (~5 min: 32k attention vs the exact reference, mask builder)
#   bash launchers/gpu_check.sh long:bench:16384,32768   (~6 min)   bash launchers/gpu_check.sh long:bench:65536
#   bash launchers/gpu_check.sh long:bench:131072        (~6 min each: bench train rows, plan GiB, MFU, cold start)
#   bash launchers/gpu_check.sh long:train:mix           (~9 min: synthetic 20b + the train stage, shipped defaults)
#   bash launchers/gpu_check.sh --steps 6 --warmup 2 long:train:128k         (~9 min; add --cap-gib 80 on an H200)
#   bash launchers/gpu_check.sh --cpu pipeline configs 2gpu knobs:0-1        (CPU, CI-sized: tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# NCCL_NVLS_ENABLE=0 and the rest of the machine's environment are passed through untouched.
# The carried wheels are for the GPU box's Python (3.12); the CPU form runs in the project's own venv.
if [[ " $* " != *" --cpu "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=${GPU_CHECK_SITE:-/tmp/site}
  # launchers/gpu_pair.sh installs once for both GPUs (a stamp), so that two checks do not write one site at once
  [ -f "$site/.gptoss_wheels" ] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" -m gptoss_hpc.bench.gpu_check "$@"
