#!/usr/bin/env bash
# Runs the P1 rows one after another, most important first (skipping rows whose JSON
# exists; logs in runs/*.log), then the no-clipping format rows of formats_p1.py.
#   bash benchmarks/p1_queue.sh            # WAIT_PID=<pid> waits for a running row first
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -n "${WAIT_PID:-}" ]; then while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 5; done; fi
row() {  # name, then p1.py arguments
  local name=$1; shift
  [ -f "runs/$name.json" ] && return 0
  "$PY" benchmarks/p1.py "$@" --threads 2 --no-progress --out "runs/$name.json" \
    > "runs/$name.log" 2>&1 || echo "FAILED: $name" >> runs/queue.log
  echo "$(date -Is) done $name" >> runs/queue.log
}
formats() {  # formats_p1.py rows not yet in benchmarks/results/formats_p1.jsonl
  local todo=()
  for r in "$@"; do
    grep -q "\"row\": \"$r\"" benchmarks/results/formats_p1.jsonl 2>/dev/null || todo+=("$r")
  done
  [ ${#todo[@]} -eq 0 ] && return 0
  "$PY" benchmarks/formats_p1.py run "${todo[@]}" >> runs/formats.log 2>&1 \
    || echo "FAILED: formats ${todo[*]}" >> runs/queue.log
  echo "$(date -Is) done formats ${todo[*]}" >> runs/queue.log
}
row float                    --method float
row babai-w4g64-act-seq      --method babai --bits 4 --order act --mode sequential
row rtn-w4g64                --method rtn --bits 4
row babai-w3g64-act-seq      --method babai --bits 3 --order act --mode sequential
row rtn-w3g64                --method rtn --bits 3
formats hptq@3.297 babai3 hptq@2.3 babai2 hrtn@3.297
row babai-w4g64-minpivot-seq --method babai --bits 4 --order min-pivot --mode sequential
row babai-w4g64-act-seq-refine2 --method babai --bits 4 --order act --mode sequential --refine 2
row babai-w3g64-act-seq-refine2 --method babai --bits 3 --order act --mode sequential --refine 2
row babai-w4g64-act-seq-replay --method babai --bits 4 --order act --mode sequential  # same codes as act-seq; quantize time with the calibration replay
formats hrtn@2.3 ssqr3@3.4 hptq@4.3
row babai-w3g64-minpivot-seq --method babai --bits 3 --order min-pivot --mode sequential
row babai-w4g64-natural-seq  --method babai --bits 4 --order natural --mode sequential
row babai-w4g64-act-torchao  --method babai --bits 4 --order act --mode torchao
formats rtn2 ssqr2@2.4 hrtn@4.3 babai4 ssqr4@4.4
row babai-w3g64-natural-seq  --method babai --bits 3 --order natural --mode sequential
row babai-w4g64-act-obs      --method babai --bits 4 --order act --mode observe
