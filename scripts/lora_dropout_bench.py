"""LoRA's down-projection with dropout on one GPU: torch's dropout then lora_A (as PEFT runs it) against the
launcher's kernel (launcher/lora_dropout_kernel.py) and against no dropout, forward alone and forward + backward
(dx and dA), for the adapter input widths of Qwen2.5-1.5B (1536, 8960) and Llama-3.1-8B (4096, 14336) at 22528
tokens (the SFT bench's micro-batch), in milliseconds (triton.testing.do_bench); with `tiles`, then the kernel's
tile choices.
    python3 scripts/lora_dropout_bench.py [tiles]
"""
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, ".")
from launcher import lora_dropout_kernel as kernel  # noqa: E402

print(torch.__version__, torch.cuda.get_device_name(), flush=True)
T, R, P = 22528, 16, 0.05


def inputs(K):
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(R, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return x, w, torch.randn(T, R, device="cuda", dtype=torch.bfloat16)


def timings(K):
    x, w, g = inputs(K)
    runs = {"torch": lambda: F.linear(F.dropout(x, P, training=True), w),
            "kernel": lambda: kernel.dropout_then_down(x, w, P),
            "none": lambda: F.linear(x, w)}
    fwd = {k: do_bench(f) for k, f in runs.items()}
    both = {k: do_bench(lambda f=f: f().backward(g), grad_to_none=[x, w]) for k, f in runs.items()}
    return fwd, both


print("| K | forward ms: torch / kernel / none | forward + backward ms: torch / kernel / none |\n|---|---|---|")
for K in (1536, 8960, 4096, 14336):
    fwd, both = timings(K)
    print(f"| {K} | {fwd['torch']:.3f} / {fwd['kernel']:.3f} / {fwd['none']:.3f} | "
          f"{both['torch']:.3f} / {both['kernel']:.3f} / {both['none']:.3f} |", flush=True)
if "tiles" not in sys.argv[1:]:
    sys.exit()
print("\n| rows, warps | K | kernel forward ms | kernel forward + backward ms |\n|---|---|---|---|")
for rows, warps in ((32, 4), (64, 8), (128, 4), (128, 8)):
    kernel.ROWS, kernel.WARPS = rows, warps
    for K in (1536, 8960):
        x, w, g = inputs(K)
        f = do_bench(lambda: kernel.dropout_then_down(x, w, P))
        b = do_bench(lambda: kernel.dropout_then_down(x, w, P).backward(g), grad_to_none=[x, w])
        print(f"| {rows}, {warps} | {K} | {f:.3f} | {b:.3f} |", flush=True)
