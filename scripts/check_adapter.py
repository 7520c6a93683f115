"""Does a run's saved adapter load onto its base model, and change its answers? On one GPU (or the CPU for a
16-bit base): the base as the run loaded it (a pre-quantized checkpoint as it was saved), PEFT's
PeftModel.from_pretrained(<run_dir>/final), then the logits of a few tokens with the adapter on and off.

    python3 scripts/check_adapter.py <run_dir>     # prints one line; exit 1 if the adapter is missing or inert
"""
import sys
import time
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(run: Path) -> int:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(cfg["plan"]["model_path"], dtype=torch.bfloat16, device_map={"": device})
    loaded = time.perf_counter() - started
    model = PeftModel.from_pretrained(base, run / "final")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    ids = torch.arange(10, 42, device=device).unsqueeze(0)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    change = (tuned - plain).abs().max().item()
    trained = sum(int(p.abs().sum() > 0) for p in lora_b)
    ok = bool(lora_b) and trained == len(lora_b) and change > 0
    print(f"{run.name}: {'ok' if ok else 'MISSED'}: base loaded in {loaded:.0f} s, adapter of {len(lora_b)} LoRA pairs "
          f"({trained} trained), largest logit change with it on {change:.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
