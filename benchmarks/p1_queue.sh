#!/usr/bin/env bash
# Runs the P1 rows one after another (skipping rows whose JSON exists); logs in runs/*.log.
#   bash benchmarks/p1_queue.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
row() {  # name, then p1.py arguments
  local name=$1; shift
  [ -f "runs/$name.json" ] && return 0
  "$PY" benchmarks/p1.py "$@" --threads 2 --no-progress --out "runs/$name.json" \
    > "runs/$name.log" 2>&1 || echo "FAILED: $name" >> runs/queue.log
  echo "$(date -Is) done $name" >> runs/queue.log
}
row float          --method float
row babai-w4g64-act-seq      --method babai --bits 4 --order act --mode sequential
row rtn-w4g64      --method rtn --bits 4
row babai-w4g64-natural-seq  --method babai --bits 4 --order natural --mode sequential
row babai-w4g64-minpivot-seq --method babai --bits 4 --order min-pivot --mode sequential
row babai-w3g64-act-seq      --method babai --bits 3 --order act --mode sequential
row rtn-w3g64      --method rtn --bits 3
row babai-w3g64-natural-seq  --method babai --bits 3 --order natural --mode sequential
row babai-w3g64-minpivot-seq --method babai --bits 3 --order min-pivot --mode sequential
row babai-w4g64-act-obs      --method babai --bits 4 --order act --mode observe
row babai-w4g64-act-torchao  --method babai --bits 4 --order act --mode torchao
