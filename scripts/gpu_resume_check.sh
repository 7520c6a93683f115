#!/bin/bash
# Does a resume continue exactly where the first run stopped? On a lent GPU machine, from the project root, for
# each CASE (strategy:quant:method): run A trains 10 steps; B resumes A's checkpoint-10 with no step left (its
# held-out loss must equal A's: same weights); C resumes to step 20; D trains 20 steps in one go (C's loss
# should be D's). Prints one line per case and what the checkpoint's adapter files hold. Logs under $OUT.
#   CASES="fsdp_qlora:none:sft zero3:none:sft" bash scripts/gpu_resume_check.sh
set -uo pipefail
. scripts/gpu_env.sh
GPUS=${GPUS:-auto}  # every GPU of the machine
for case in ${CASES:-fsdp_qlora:none:sft}; do
  IFS=: read -r strategy quant method <<< "$case"
  root=/tmp/resume-check/$strategy-$quant-$method; rm -rf "$root"; mkdir -p "$root"
  args=(strategy="$strategy" quant="$quant" method="$method" gpus="$GPUS" save_steps=5 train.lr=5e-4
        train.save_total_limit=5 train.logging_steps=1 data=demo_"${method/dpo/pref}")
  python3 -m launcher run_dir="$root/a" "${args[@]}" train.max_steps=10 > "$OUT/$strategy-$quant-$method-a.log" 2>&1
  cp -r "$root/a" "$root/b"; rm -rf "$root/b/final"
  python3 -m launcher run_dir="$root/b" "${args[@]}" train.max_steps=10 resume=auto > "$OUT/$strategy-$quant-$method-b.log" 2>&1
  cp -r "$root/a" "$root/c"; rm -rf "$root/c/final"
  python3 -m launcher run_dir="$root/c" "${args[@]}" train.max_steps=20 resume=auto > "$OUT/$strategy-$quant-$method-c.log" 2>&1
  python3 -m launcher run_dir="$root/d" "${args[@]}" train.max_steps=20 > "$OUT/$strategy-$quant-$method-d.log" 2>&1
  python3 - "$root" "$case" <<'EOF' | tee -a "$OUT/resume-check.txt"
import json, sys, pathlib, torch
from safetensors.torch import load_file
root, case = pathlib.Path(sys.argv[1]), sys.argv[2]
def loss(run):
    p = root / run / "summary.json"
    if not p.exists():
        return "failed"
    s = json.loads(p.read_text())
    return f"{s.get('eval_loss', float('nan')):.4f} (step {s['global_step']})"
def losses(run):
    rows = [json.loads(l) for l in (root / run / "metrics.jsonl").open()] if (root / run / "metrics.jsonl").exists() else []
    return " ".join(f"{r['step']}:{r['loss']:.3f}" for r in rows if "loss" in r)
print(f"{case}: A(10) {loss('a')}  B(resume, 0 steps) {loss('b')}  C(resume to 20) {loss('c')}  D(20 in one go) {loss('d')}")
print(f"  train loss by step, A then C: {losses('c')}")
ckpt = root / "a" / "checkpoints" / "checkpoint-10"
def norms(sd):
    b = [v.float().norm().item() for k, v in sd.items() if "lora_B" in k]
    return f"{len(sd)} tensors, lora_B norm sum {sum(b):.4f}"
for name, sd in [("final/adapter_model.safetensors", (root / "a/final/adapter_model.safetensors")),
                 ("checkpoint-10/adapter_model.safetensors", ckpt / "adapter_model.safetensors"),
                 ("checkpoint-10/pytorch_model_fsdp.bin", ckpt / "pytorch_model_fsdp.bin")]:
    if sd.exists():
        state = load_file(str(sd)) if sd.suffix == ".safetensors" else torch.load(sd, weights_only=True)
        print(f"  {name}: {norms(state)}; keys like {sorted(state)[:1]}")
print("  checkpoint-10:", sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else "missing")
EOF
done
