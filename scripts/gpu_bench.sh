#!/bin/bash
# The benchmark (python -m launcher.bench) on a lent GPU machine, from the project root, with the wheels of
# ../shared/gpu/fetch-wheels.sh (EXTRA="liger-kernel==0.8.5") in .whl/ and ../shared/peer copied to peer/.
#   CASES=ddp,zero3 STEPS=30 bash scripts/gpu_bench.sh     (default: the DPO matrix of launcher/bench.py)
#   PROFILE=21,22 STEPS=22 ...: also profile those steps of every launcher case (runs/<case>/profile.txt)
# Writes $OUT/bench.md, $OUT/bench.json and $OUT/bench-logs.tgz (every case's output and rank logs).
set -uo pipefail
. scripts/gpu_env.sh
B=/tmp/bench
timeout "${BUDGET_S:-540}" python3 -m launcher.bench --peer peer --gpus "${GPUS:-2}" --steps "${STEPS:-30}" --out $B \
  --assets /tmp/bench-assets ${CASES:+--cases "$CASES"} ${PROFILE:+--profile-steps "$PROFILE"} "$@"
rc=$?
cp $B/bench.md $B/bench.json "$OUT"/ 2>/dev/null
tar czf "$OUT/bench-logs.tgz" -C $B --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  $(cd $B && ls *.log 2>/dev/null) $(cd $B && ls -d runs/*/logs runs/*/metrics.jsonl runs/*/plan.json runs/*/summary.json runs/*/profile.txt runs/*/step_clock.txt 2>/dev/null)
exit $rc
