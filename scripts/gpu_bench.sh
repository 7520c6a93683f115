#!/bin/bash
# The benchmark (python -m launcher.bench) on a lent GPU machine, from the project root, with the wheels of
# ../shared/gpu/fetch-wheels.sh (EXTRA="liger-kernel==0.8.5") in .whl/ and ../shared/peer copied to peer/.
#   CASES=ddp,zero3 STEPS=30 bash scripts/gpu_bench.sh     (default: the DPO matrix of launcher/bench.py)
#   PROFILE=21,22 STEPS=22 ...: also profile those steps of every launcher case (runs/<case>/profile.txt)
# Writes $OUT/bench.md, $OUT/bench.json and $OUT/bench-logs.tgz (every case's output and rank logs).
# BUDGET_S (default 450): seconds for all cases; the bench stops a case still running then and makes its row from
# the steps it logged (later cases do not run); the command itself ends by BUDGET_S + 90 whatever happens, so give
# the lent machine's call BUDGET_S + 120 or more.
set -uo pipefail
. scripts/gpu_env.sh
B=/tmp/bench
BUDGET_S=${BUDGET_S:-450}
timeout $((BUDGET_S + 90)) python3 -m launcher.bench --peer peer --gpus "${GPUS:-2}" --steps "${STEPS:-30}" --out $B \
  --budget-s "$BUDGET_S" --assets /tmp/bench-assets ${CASES:+--cases "$CASES"} ${PROFILE:+--profile-steps "$PROFILE"} "$@"
rc=$?
cp $B/bench.md $B/bench.json "$OUT"/ 2>/dev/null
tar czf "$OUT/bench-logs.tgz" -C $B --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  $(cd $B && ls *.log 2>/dev/null) $(cd $B && ls -d runs/*/logs runs/*/metrics.jsonl runs/*/plan.json runs/*/summary.json runs/*/profile.txt runs/*/step_clock.txt 2>/dev/null)
exit $rc
