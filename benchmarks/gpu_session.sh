#!/usr/bin/env bash
# Every GPU figure the README is missing, in priority order, for a device session with little time:
#   bash benchmarks/gpu_session.sh [OUT_DIR] [STEP...]      steps: ctc train job forward pretrain pretrain2 (default: all)
# Each step has its own timeout and writes OUT_DIR/<step>_gpu.json (default OUT_DIR: $OUT or
# benchmarks/results); a step that fails or times out does not stop the next. Dry-run the same script on
# CPU first with QUICK=1 (tiny shapes, CPU device). The timeouts add up to more than one 10-minute device
# call: run `ctc train job` in one call and `forward pretrain` in the next if time allows.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(ctc train job forward pretrain pretrain2)
mkdir -p "$out"
if [ "${QUICK:-0}" = 1 ]; then dev=(--quick); else dev=(--device gpu); fi
pip install --quiet --no-deps -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
for step in "${steps[@]}"; do
  case "$step" in
    ctc)      cmd=(python3 -m benchmarks.ctc "${dev[@]}");                               limit=150 ;;
    forward)  cmd=(python3 -m benchmarks.forward "${dev[@]}");                           limit=240 ;;
    train)    cmd=(python3 -m benchmarks.train_step "${dev[@]}");                        limit=360 ;;
    pretrain) cmd=(python3 -m benchmarks.pretrain_overhead "${dev[@]}");                 limit=240 ;;
    pretrain2) cmd=(python3 -m benchmarks.pretrain2 "${dev[@]}");                        limit=300 ;;  # 2.0 vs v1 + parts, bf16
    job)      # train_tpu.py --benchmark: base CTC on the shipped data, bf16 + cuDNN, both CTC cores
      if [ "${QUICK:-0}" = 1 ]; then opts=(--model tiny); else
        opts=(--model base --dtype bfloat16 --attention-implementation cudnn); fi
      for impl in optax unrolled; do
        echo "=== job: train_tpu.py --benchmark --ctc-implementation $impl ${opts[*]}"
        timeout 180 python3 train_tpu.py --benchmark --batch-size 8 --ctc-implementation "$impl" \
          "${opts[@]}" --output-dir "/tmp/gpu_session_job_$impl" 2>&1 | tail -12 | tee "$out/job_${impl}.txt"
      done
      continue ;;
    *) echo "unknown step $step"; continue ;;
  esac
  echo "=== $step: ${cmd[*]} (timeout ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "${cmd[@]}" --json "$out/${step}_gpu.json" 2>&1 | tail -40
  echo "=== $step: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s"
done
