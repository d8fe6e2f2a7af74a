#!/usr/bin/env bash
# The performance issue's GPU figures in one run (< 5 minutes on an H200). Usage: bench/gpu_check.sh OUT_DIR
# Sections: checks, decode, scheduler (issue 13: 64 concurrent gpt2 requests x 128 tokens through the decode
# scheduler vs one alone; goals >= 20x tokens/s, p95 per-token latency <= 2x), xl, quant, train. Without a GPU
# the scheduler section is only a CPU smoke check: bench/gpu_check.sh OUT --only scheduler --model tiny
# Then the classroom case (issue 12): 8 gpt2-shaped jobs at 4 x 128 co-batched vs one after another, while 4 users
# compare (goals: >= 3x the aggregate tokens/s, peak memory <= 1.5x one job) -> OUT/classroom.json. Skipped
# without a GPU, or with CLASSROOM=0.
set -uo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
PYTHONUNBUFFERED=1 timeout 290 python3 bench/gpu_bench.py --out "$out/gpu_check.json" "${@:2}" 2>&1 | tee "$out/gpu_check.log"
if [ "${CLASSROOM:-1}" != "0" ] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/classroom.py --device cuda --model gpt2 --uniform --students 8 \
    --comparers 4 --json "$out/classroom.json" 2>&1 | tee "$out/classroom.log"
fi
# Issue 17: data-parallel training, 1 GPU vs all of them under torchrun (same global batch; gpt2-shaped random
# weights) -> OUT/ddp.json. With one GPU (or none) it says so there instead: nothing is measured. DDP=0 skips it.
if [ "${DDP:-1}" != "0" ]; then
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
  if [ "${ngpu:-0}" -gt 1 ]; then
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/ddp.py --nproc "$ngpu" --json "$out/ddp.json" 2>&1 | tee "$out/ddp.log"
  else
    msg="1 vs N GPUs: not measured (this machine has ${ngpu:-0} GPU(s); the comparison needs at least 2)"
    echo "$msg" | tee "$out/ddp.log"
    printf '{"measured": false, "gpus": %s, "reason": "%s"}\n' "${ngpu:-0}" "$msg" > "$out/ddp.json"
  fi
fi
