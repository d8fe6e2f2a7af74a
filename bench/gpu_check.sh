#!/usr/bin/env bash
# The performance issue's GPU figures in one run (< 5 minutes on an H200). Usage: bench/gpu_check.sh OUT_DIR
# Sections: checks, decode, scheduler (issue 13: 64 concurrent gpt2 requests x 128 tokens through the decode
# scheduler vs one alone; goals >= 20x tokens/s, p95 per-token latency <= 2x), xl, quant, train. Without a GPU
# the scheduler section is only a CPU smoke check: bench/gpu_check.sh OUT --only scheduler --model tiny
set -uo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
PYTHONUNBUFFERED=1 timeout 290 python3 bench/gpu_bench.py --out "$out/gpu_check.json" "${@:2}" 2>&1 | tee "$out/gpu_check.log"
