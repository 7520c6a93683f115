#!/bin/bash
# Predicted (memory plan) vs measured (torch peak allocated) GiB per GPU for each strategy, on a 2-GPU
# machine, Qwen2.5-1.5B shape, DPO, LoRA r16 all-linear, micro_batch 4, ~380 tokens per sequence, no Liger.
# Writes $OUT/memory.tsv. Usage (GPU machine, project root, wheels in .whl/): bash scripts/gpu_memory_check.sh
# ONLY=zero3_offload,zero2 runs just those cases. Reuses the benchmark's assets when gpu_bench.sh built them.
set -uo pipefail
. scripts/gpu_env.sh
A=/tmp/bench-assets/qwen2.5-1.5b-instruct
python3 -m launcher.bench_assets $A qwen2.5-1.5b-instruct 400 > "$OUT/assets.log" 2>&1 || { cat "$OUT/assets.log"; exit 1; }
printf 'case\tpredicted_gib\tmeasured_gib\ttokens_per_s_per_gpu\n' > "$OUT/memory.tsv"
run() {  # name, overrides...
  name=$1; shift
  [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]] && return
  timeout 150 python3 -m launcher model=qwen2.5-1.5b-instruct model.path=$A/model model.tokenizer=$A/tokenizer \
    data.path=$A/pref.jsonl data.max_length=380 micro_batch=4 gpus=2 train.max_steps=8 train.logging_steps=2 \
    save_steps=1000 train.liger=false run_dir=/tmp/runs/$name "$@" > "$OUT/$name.log" 2>&1
  python3 - "$name" /tmp/runs/$name >> "$OUT/memory.tsv" <<'PY'
import json, re, sys
name, run = sys.argv[1], sys.argv[2]
try:
    plan = json.load(open(f"{run}/plan.json"))
    pred = next(float(re.search(r"([\d.]+) GiB per GPU predicted", d).group(1)) for d in plan["decisions"] if "predicted" in d)
    rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    peak = max(r.get("peak_gpu_mem_gib", 0) for r in rows)
    tps = [r["tokens_per_sec_per_gpu"] for r in rows if "tokens_per_sec_per_gpu" in r]
    print(f"{name}\t{pred}\t{peak}\t{tps[-1] if tps else ''}")
except Exception as exc:
    print(f"{name}\tFAILED {type(exc).__name__}: {exc}")
PY
}
GC=train.gradient_checkpointing=true  # the conditions of docs/memory.md's first table
run zero3_offload strategy=zero3_offload $GC  # first: the one case not measured yet
run ddp_gc strategy=ddp $GC
run ddp_nogc strategy=ddp train.gradient_checkpointing=false
run ddp_4bit strategy=ddp quant=4bit $GC
run zero2 strategy=zero2 $GC
run zero3 strategy=zero3 $GC
run fsdp_qlora_4bit strategy=fsdp_qlora quant=4bit $GC
cat "$OUT/memory.tsv"
