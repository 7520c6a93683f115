#!/bin/bash
# Models that do not fit one GPU (issue 18), on 2x H200 (nvidia-h200-x2), from the project root with the wheels
# of ../shared/gpu/fetch-wheels.sh in .whl/:
#   bash scripts/gpu_big_models.sh                  # every part, one after the other
#   PART=70b-dpo bash scripts/gpu_big_models.sh     # one part: 70b-dpo | 70b-sft | 8b
#   PART=70b-dpo ONLY=70b-dpo-ddp,70b-dpo-zero3 ... # some of its cases, in this order
# 1. builds the assets once (launcher/bench_assets.py): Llama-3.1-70B's shape as a random pre-quantized 4-bit
#    checkpoint written a layer at a time (40 GB; the bf16 one, 141 GB, would not fit the disk), Llama-3.1-8B's in
#    bf16, a word-level tokenizer, 200 rows of the peer's job;
# 2. runs the cases of launcher/bench_cases.py through `python -m launcher.bench` (tokens/s per GPU, MFU, peak GiB
#    measured and planned, load time, host memory): 70B DPO and SFT under fsdp_qlora and zero3 (20 steps, saved,
#    then resume=auto to 25) and ddp; the 8B matrix, bf16 LoRA and 4-bit QLoRA under every strategy;
# 3. loads the 70B fsdp_qlora runs' adapters onto the base (scripts/check_adapter.py; ADAPTERS=zero3 for those).
# Writes $OUT/big-<part>.md and .json, the logs in $OUT/big-<part>-logs.tgz.
# Measured on 2x H200 (docs/benchmarks.md, 2026-11-30): the 70B checkpoint takes 55 s to write; a 70B zero3 case
# with its resume 156 s + 90 s; a 70B fsdp_qlora case about 7 minutes with its resume (each FULL_STATE_DICT save
# gathers the whole model into rank 0: 133 s). A lent machine stops a command after 10 minutes: there, one or
# two cases per call (ONLY=..., BUDGET_S=360, CASE_TIMEOUT_S=340), each call building the checkpoint again.
# BUDGET_S is per part: the bench stops a case still running then (its logged steps make its row), and the part's
# command ends by BUDGET_S + 90 whatever happens; the adapter check and the logs come after it.
set -uo pipefail
. scripts/gpu_env.sh
ASSETS=${ASSETS:-/tmp/big-assets}
declare -A CASES=(
  [70b-dpo]="70b-dpo-fsdp_qlora,70b-dpo-zero3,70b-dpo-ddp"
  [70b-sft]="70b-sft-fsdp_qlora,70b-sft-zero3,70b-sft-ddp"
  [8b]="8b-ddp-none,8b-ddp-4bit,8b-zero2-none,8b-zero2-4bit,8b-fsdp_qlora-none,8b-fsdp_qlora-4bit,8b-zero3-none,8b-zero3-4bit,8b-zero3_offload-none"
)
status=0
for part in ${PART:-70b-dpo 70b-sft 8b}; do
  B=/tmp/big-$part
  { free -g; df -h /tmp; nvidia-smi --query-gpu=name,memory.total --format=csv; } > "$OUT/big-$part-machine.txt" 2>&1
  timeout $((${BUDGET_S:-3000} + 90)) python3 -m launcher.bench --gpus 2 --steps "${STEPS:-20}" \
    --timeout "${CASE_TIMEOUT_S:-420}" --budget-s "${BUDGET_S:-3000}" --out "$B" --assets "$ASSETS" --cases "${ONLY:-${CASES[$part]}}" || status=1
  # results first: a call cut by the machine's 10-minute limit during the adapter check keeps them
  cp "$B/bench.md" "$OUT/big-$part.md"; cp "$B/bench.json" "$OUT/big-$part.json"
  tar czf "$OUT/big-$part-logs.tgz" -C "$B" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
    $(cd "$B" && ls *.log 2>/dev/null) \
    $(cd "$B" && ls -d runs/*/logs runs/*/metrics.jsonl runs/*/plan.json runs/*/summary.json runs/*/config.yaml 2>/dev/null)
  for run in "$B"/runs/70b-*-${ADAPTERS:-fsdp_qlora}; do  # one 40 GB load each: the fsdp_qlora runs by default
    [ -f "$run/final/adapter_model.safetensors" ] && { python3 scripts/check_adapter.py "$run" || status=1; } \
      >> "$OUT/big-$part-adapters.txt" 2>&1
  done
done
exit $status
