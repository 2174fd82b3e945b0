#!/bin/bash
# SmolLM2-135M end to end: scan 210 Linear layers, plan 50%, prune, evaluate on held-out windows.
set -euo pipefail
cd "$(dirname "$0")/../.."
P=.venv/bin/prunescope
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: on a shared 2-core machine two OpenMP threads stall each other
OUT=runs/smollm2
/usr/bin/time -v $P scan --model smollm2 --data pydoc --samples 4 --seq-len 512 --levels 0.3,0.5,0.7 \
  --store $OUT/store.jsonl --out $OUT/profile.json > $OUT/scan.log 2> $OUT/scan.time
/usr/bin/time -v $P plan --profile $OUT/profile.json --sparsity 0.5 --out $OUT/plan.json > $OUT/plan.log 2> $OUT/plan.time
/usr/bin/time -v $P prune --model smollm2 --plan $OUT/plan.json --data pydoc --samples 16 --seq-len 512 --first-window 100 \
  --compare-uniform --out $OUT/pruned > $OUT/prune.log 2> $OUT/prune.time
echo finished > $OUT/done
