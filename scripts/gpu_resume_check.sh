#!/bin/bash
# Does a resume continue exactly where the first run stopped? From the project root of a GPU machine, for each
# CASE (strategy:quant:method): A trains 10 steps; B resumes A's checkpoint-10 with no step left, so its held-out
# loss must equal A's (the same weights); C resumes it to step 20, so its held-out loss must be below A's. Prints
# one line per case with the train loss by step and what the checkpoint's adapter files hold; logs in $OUT.
# Exits 1 if any case misses. (Used on the CPU too: it needs no GPU of its own.) B is "no step" because the Trainer
# (transformers 5.17) takes one step before it checks max_steps, at learning rate 0 under the default cosine schedule.
#   CASES="fsdp_qlora:4bit:sft zero3:none:sft" bash scripts/gpu_resume_check.sh
set -uo pipefail
. scripts/gpu_env.sh
status=0
for case in ${CASES:-fsdp_qlora:4bit:sft}; do
  IFS=: read -r strategy quant method <<< "$case"
  root=/tmp/resume-check/$strategy-$quant-$method; rm -rf "$root"; mkdir -p "$root"
  args=(strategy="$strategy" quant="$quant" method="$method" gpus="${GPUS:-auto}" save_steps=5 train.lr=5e-4
        train.save_total_limit=5 train.logging_steps=1 data=demo_"${method/dpo/pref}")
  log="$OUT/resume-$strategy-$quant-$method"
  python3 -m launcher run_dir="$root/a" "${args[@]}" train.max_steps=10 > "$log-a.log" 2>&1
  for run in b c; do cp -r "$root/a" "$root/$run"; rm -rf "$root/$run/final"; done
  python3 -m launcher run_dir="$root/b" "${args[@]}" train.max_steps=10 resume=auto > "$log-b.log" 2>&1
  python3 -m launcher run_dir="$root/c" "${args[@]}" train.max_steps=20 resume=auto > "$log-c.log" 2>&1
  python3 - "$root" "$case" <<'EOF' | tee -a "$OUT/resume-check.txt" || status=1
import json, pathlib, sys

import torch
from safetensors.torch import load_file

root, case = pathlib.Path(sys.argv[1]), sys.argv[2]
summary = {r: json.loads((root / r / "summary.json").read_text()) if (root / r / "summary.json").exists() else {}
           for r in "abc"}
loss = {r: s.get("eval_loss", float("nan")) for r, s in summary.items()}
steps = [json.loads(line) for line in (root / "c" / "metrics.jsonl").open()] if summary["c"] else []
ok = abs(loss["b"] - loss["a"]) < 1e-3 and loss["c"] < loss["a"]
print(f"{case}: {'ok' if ok else 'MISSED'}: held-out loss A(10 steps) {loss['a']:.4f}, B(resumed, no step) "
      f"{loss['b']:.4f}, C(resumed to 20) {loss['c']:.4f}")
print("  train loss by step, A then C:", " ".join(f"{r['step']}:{r['loss']:.3f}" for r in steps if "loss" in r))
ckpt = root / "a" / "checkpoints" / "checkpoint-10"
for path in [root / "a" / "final" / "adapter_model.safetensors", ckpt / "adapter_model.safetensors",
             ckpt / "pytorch_model_fsdp.bin"]:
    if path.exists():
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        lora_b = sum(t.float().norm().item() for k, t in state.items() if "lora_B" in k)
        print(f"  {path.relative_to(root)}: {len(state)} tensors, lora_B norms summed {lora_b:.4f}")
sys.exit(0 if ok else 1)
EOF
done
exit $status
