#!/bin/bash
# Everything the GPU machines prove, in one command, from the project root of a 2-GPU machine with the wheels of
# ../shared/gpu/fetch-wheels.sh (EXTRA="liger-kernel==0.8.5") in .whl/ and ../shared/peer copied to peer/:
#   bash scripts/gpu_matrix.sh
# 1. the GPU test suite (scripts/gpu_tests.sh): every strategy x quantization x {dpo, sft} trains, resumes, learns
#    and merges through `python -m launcher`
# 2. the benchmark (scripts/gpu_bench.sh) with every case of launcher/bench.py: the DPO matrix beside the plain-TRL
#    peer, the levers, SFT beside TRL, the 7B QLoRA runs
# 3. the memory plan against measured peaks (scripts/gpu_memory_check.sh)
# 4. exact resume, one SFT case per strategy (scripts/gpu_resume_check.sh)
# It builds its own assets. Logs stay in $OUT (./gpu-logs); $OUT/summary.md holds the results. The lent
# machines stop a command after 10 minutes: there, run the four scripts one per call instead.
set -uo pipefail
export OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
bash scripts/gpu_tests.sh; tests=$?
CASES=${CASES:-all} BUDGET_S=${BENCH_BUDGET_S:-7200} bash scripts/gpu_bench.sh > "$OUT/bench.log" 2>&1; bench=$?
bash scripts/gpu_memory_check.sh > /dev/null; memory=$?
CASES="ddp:none:sft fsdp_qlora:4bit:sft zero2:none:sft zero3:none:sft zero3_offload:none:sft" \
  bash scripts/gpu_resume_check.sh > /dev/null; resume=$?

{
  echo "# GPU matrix, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo; sed 's/^/    /' "$OUT/gpus.txt"
  echo; echo "## Test suite (tests/test_gpu.py; exit $tests)"; echo
  echo "| case | result |"; echo "|---|---|"
  grep -oE "(PASSED|FAILED|ERROR) tests/test_gpu.py::[^ ]+" "$OUT/gpu-tests.log" | sort -u |
    sed -E 's/^(PASSED|FAILED|ERROR) [^[]*\[([^]]*)\]$/| \2 | \1 |/'
  grep -E "^=+ .*(passed|failed).* =+$" "$OUT/gpu-tests.log" | tail -1
  echo; echo "## Benchmark (python -m launcher.bench --cases ${CASES:-all}; exit $bench)"; echo
  cat "$OUT/bench.md" 2>/dev/null || echo "(no bench.md: see bench.log)"
  echo; echo "## Memory plan, predicted vs measured GiB per GPU (exit $memory)"; echo
  sed -e 's/\t/ | /g' -e 's/^/| /' -e 's/$/ |/' "$OUT/memory.tsv" | sed '1a|---|---|---|---|'
  echo; echo "## Exact resume (scripts/gpu_resume_check.sh; exit $resume)"; echo
  grep -E "^[a-z0-9_]+:[a-z0-9]+:[a-z]+: " "$OUT/resume-check.txt" | sed 's/^/    /'
} > "$OUT/summary.md"
cat "$OUT/summary.md"
[ "$tests$bench$memory$resume" = 0000 ]
