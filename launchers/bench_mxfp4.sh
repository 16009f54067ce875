#!/usr/bin/env bash
# Issue 14's GPU measurements (one H200): tok/s and peak memory of MXFP4-resident experts against bf16, each row
# beside `python -m gptoss_hpc.plan`'s estimate. Run from the repo root with the bench's environment (torch,
# transformers, peft, hydra-core, omegaconf; PYTHONPATH=$PWD). Each part fits one 10-minute call:
#   bash launchers/bench_mxfp4.sh 20b       # 20b: bf16 train=fast, mxfp4 at 4x2048 / 2x2048 / 1x2048
#   bash launchers/bench_mxfp4.sh 120b      # 120b mxfp4 at 4x2048 (best on an H200) / 2x2048, and the <= 78 GiB
#                                           # candidates 1x2048 and 4x2048 with recompute
#   bash launchers/bench_mxfp4.sh fit80     # 120b's two <= 78 GiB candidates (an 80 GB H100): 1x2048 x 8 and
#                                           # 4x2048 x 2 with recompute
#   bash launchers/bench_mxfp4.sh presets   # attention and all_linear, mxfp4, 20b and 120b at 2x2048
#   bash launchers/bench_mxfp4.sh quick     # the headline rows in one call: 20b bf16 and mxfp4 2x2048 (<= 24 GiB),
#                                           # 120b mxfp4 4x2048 (best) and 1x2048 (<= 78 GiB); 2 timed steps each
#   bash launchers/bench_mxfp4.sh check     # loss/LoRA grads of MXFP4 vs the bf16-dequantized model (20b 8 layers,
#                                           # 120b 4 layers), peak memory of each, compiled dequant ms per layer
# Writes $OUT/mxfp4_<part>.json (bench rows), .log, and .md (measured vs plan). Every stack is train=fast
# (packed, compiled layers, no recompute) with 16,384 tokens per optimizer step.
set -uo pipefail
part=${1:?usage: bash launchers/bench_mxfp4.sh quick|20b|120b|fit80|presets|check}
out=${OUT:-logs/bench}
py=${PYTHON:-python}
limit=${BENCH_TIMEOUT:-560}
mkdir -p "$out"
if [ "$part" = check ]; then
  timeout $((limit / 2)) "$py" -m gptoss_hpc.bench mxfp4 --layers 8 --json "$out/mxfp4_check_20b.json" 2>&1 \
    | tee "$out/mxfp4_check_20b.log"
  timeout $((limit / 2)) "$py" -m gptoss_hpc.bench mxfp4 model=gpt_oss_120b --layers 4 --json "$out/mxfp4_check_120b.json" \
    2>&1 | tee "$out/mxfp4_check_120b.log"
  exit 0
fi
mx="model.experts_dtype=mxfp4"
b4="train.per_device_train_batch_size=4 train.gradient_accumulation_steps=2"
b2="train.per_device_train_batch_size=2 train.gradient_accumulation_steps=4"
b1="train.per_device_train_batch_size=1 train.gradient_accumulation_steps=8"
steps=(--steps 3 --warmup 2)
case "$part" in
  quick) steps=(--steps 2 --warmup 1); variants=(
    "20b bf16 4x2048=model.experts_dtype=bfloat16 $b4"
    "20b mxfp4 2x2048=$mx $b2"
    "120b mxfp4 4x2048=model=gpt_oss_120b $mx $b4"
    "120b mxfp4 1x2048=model=gpt_oss_120b $mx $b1") ;;
  20b) variants=(
    "20b bf16 4x2048=model.experts_dtype=bfloat16 $b4"
    "20b mxfp4 4x2048=$mx $b4"
    "20b mxfp4 2x2048=$mx $b2"
    "20b mxfp4 1x2048=$mx $b1") ;;
  120b) variants=(
    "120b mxfp4 4x2048=model=gpt_oss_120b $mx $b4"
    "120b mxfp4 2x2048=model=gpt_oss_120b $mx $b2"
    "120b mxfp4 1x2048=model=gpt_oss_120b $mx $b1"
    "120b mxfp4 4x2048 recompute=model=gpt_oss_120b $mx $b4 train.gradient_checkpointing=true") ;;
  fit80) variants=(
    "120b mxfp4 1x2048=model=gpt_oss_120b $mx $b1"
    "120b mxfp4 4x2048 recompute=model=gpt_oss_120b $mx $b4 train.gradient_checkpointing=true") ;;
  presets) variants=(
    "20b mxfp4 attention 2x2048=lora=attention $mx $b2"
    "20b mxfp4 all_linear 2x2048=lora=all_linear $mx $b2"
    "120b mxfp4 attention 2x2048=model=gpt_oss_120b lora=attention $mx $b2"
    "120b mxfp4 all_linear 2x2048=model=gpt_oss_120b lora=all_linear $mx $b2") ;;
  *) echo "unknown part $part: use quick, 20b, 120b, fit80, presets or check" >&2; exit 2 ;;
esac
args=()
for v in "${variants[@]}"; do args+=(--variant "$v"); done
# the bench saves its JSON after every stack: a timeout keeps the rows measured so far
timeout "$limit" "$py" -m gptoss_hpc.bench train train=fast "${steps[@]}" --no-configured --no-peak \
  "${args[@]}" --json "$out/mxfp4_$part.json" 2>&1 | tee "$out/mxfp4_$part.log"
status=${PIPESTATUS[0]}
if [ -f "$out/mxfp4_$part.json" ]; then
  "$py" -m gptoss_hpc.plan --compare "$out/mxfp4_$part.json" | tee "$out/mxfp4_$part.md"
fi
exit "$status"
