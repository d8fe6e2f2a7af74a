#!/usr/bin/env bash
# Issue 28's GPU figures in one run, under 9 minutes (H100/H200), all through the one decode engine
# (core.generate: the decode scheduler, its KV slots, a model runner replaying a CUDA graph per batch bucket):
#   - 64 concurrent gpt2 requests x 128 tokens vs one alone (goals: >= 20x its tok/s, p95 per-token latency <= 2x)
#   - batch-1 decode (goal >= 1,500 tok/s on an H200; the old per-request CUDA-graphed loop did 1,355)
#   - a compare's latency during another user's evaluation (9 models, context 1024, 32K tokens)
#   - then, while time is left: the classroom case (8 co-batched jobs while 4 users compare) and, with 2+ GPUs,
#     data-parallel training.
# Usage: bench/gpu_check.sh OUT_DIR. Anything it cannot do (no GPU, out of time) is printed as "not measured".
# Without a GPU it runs the same sections as a CPU smoke check on tiny shapes (a minute or two).
set -uo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
budget=530  # seconds: 9 minutes less the start-up and a margin
start=$SECONDS
left() { echo $(( budget - (SECONDS - start) )); }

# part NAME SECONDS CMD...: run CMD for at most SECONDS (less if the budget has less left), else say why not
part() {
  local name="$1" want="$2"; shift 2
  local have; have=$(left)
  if [ "$have" -lt 30 ]; then
    echo "[$name] not measured (the 9-minute budget is spent)" | tee -a "$out/summary.txt"
    return
  fi
  [ "$want" -gt "$have" ] && want=$have
  timeout "$want" "$@"
  local rc=$?
  if [ $rc -eq 124 ]; then
    echo "[$name] not measured (stopped after $want s)" | tee -a "$out/summary.txt"
  elif [ $rc -ne 0 ]; then
    echo "[$name] failed (exit $rc; see $out/$name.log)" | tee -a "$out/summary.txt"
  fi
}

: > "$out/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then gpu=1; else gpu=0; fi
if [ $gpu = 1 ]; then
  engine_args=(--out "$out/gpu_check.json" --only checks,decode,scheduler,eval_compare)
else
  echo "no GPU: a CPU smoke check on tiny shapes; the GPU goals are not measured" | tee -a "$out/summary.txt"
  engine_args=(--out "$out/gpu_check.json" --quick --model tiny --only checks,decode,scheduler,eval_compare)
fi
part engine 330 python3 bench/gpu_bench.py "${engine_args[@]}" 2>&1 | tee "$out/engine.log"
grep "^\[summary\]" "$out/engine.log" >> "$out/summary.txt" || true

if [ $gpu = 1 ] && [ "${CLASSROOM:-1}" != "0" ]; then
  part classroom 150 python3 bench/classroom.py --device cuda --model gpt2 --uniform --students 8 \
    --comparers 4 --json "$out/classroom.json" 2>&1 | tee "$out/classroom.log"
else
  echo "[classroom] not measured (no GPU, or CLASSROOM=0)" | tee -a "$out/summary.txt"
fi

ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${DDP:-1}" != "0" ] && [ "${ngpu:-0}" -gt 1 ]; then
  part ddp 120 python3 bench/ddp.py --nproc "$ngpu" --json "$out/ddp.json" 2>&1 | tee "$out/ddp.log"
else
  msg="1 vs N GPUs: not measured (this machine has ${ngpu:-0} GPU(s); the comparison needs at least 2)"
  echo "[ddp] $msg" | tee -a "$out/summary.txt"
  printf '{"measured": false, "gpus": %s, "reason": "%s"}\n' "${ngpu:-0}" "$msg" > "$out/ddp.json"
fi
echo "== summary ($(( SECONDS - start )) s) =="
cat "$out/summary.txt"
