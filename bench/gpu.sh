#!/usr/bin/env bash
# The GPU measurements of the README's benchmark table in one run on a lent device (228 s on an H200):
# the rollout engine against HF generate at 150M, batch 256 (its correctness check first), then
# training tokens/s and MFU at 1B and 150M, context 2048. Logs and the JSON summary go to $OUT (or bench/out).
#   run: bash bench/gpu.sh        (one call, timeout_s 600)
set -u
py=${PYTHON:-python3}
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 270 "$py" bench/rollout.py --device cuda --scale 150M 2>&1 | tee "$out/rollout.txt"
timeout 280 "$py" bench/train.py --device cuda --scales 1B 150M --budget-s 150 --json "$out/train.json" 2>&1 \
  | tee "$out/train.txt"
