"""LoRA's down-projection with dropout on one GPU: torch's dropout then lora_A (as PEFT runs it) against the
launcher's kernel (launcher/lora_dropout_kernel.py) and against no dropout, forward alone and forward + backward
(dx and dA), for the adapter input widths of Qwen2.5-1.5B (1536, 8960) and Llama-3.1-8B (4096, 14336) at 22528
tokens (the SFT bench's micro-batch), in milliseconds (triton.testing.do_bench); then a whole LoRA linear as
separate ops and as one autograd node (launcher/lora_layer.py); with `tiles`, then each
kernel alone at its tile choices (rows and warps per program, programs per SM).
    python3 scripts/lora_dropout_bench.py [tiles]
"""
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, ".")
from launcher import lora_dropout_kernel as kernel, lora_layer  # noqa: E402

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
print(f"\nA whole LoRA linear (frozen bf16 base, rank 16, scaling 2), forward + backward, ms, 32768 tokens: the "
      "base and the adapter as separate ops (autograd adds their input gradients) against one node "
      f"(launcher/lora_layer.py), with dropout {P} and without (DPO)")
print("| K -> N | dropout: separate ops | dropout: one node | none: separate ops | none: one node |\n|---|---|---|---|---|")


def separate_ops(x, w, a, b, p):
    down = kernel.dropout_then_down(x, a, p) if p else F.linear(x, a)
    return F.linear(x, w).addmm_(down, b.t(), alpha=2.0)


for K, N in ((1536, 1536), (1536, 256), (1536, 8960), (8960, 1536)):
    x = torch.randn(32768, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    a = torch.randn(R, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(N, R, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(32768, N, device="cuda", dtype=torch.bfloat16)
    one_node = lora_layer.FrozenLinearWithLora.apply
    ms = [do_bench(lambda: f(p).backward(g), grad_to_none=[x, a, b]) for p in (P, 0.0)
          for f in (lambda p: separate_ops(x, w, a, b, p), lambda p: one_node(x, w, None, a, b, 2.0, p, 1))]
    print(f"| {K} -> {N} | " + " | ".join(f"{t:.3f}" for t in ms) + " |", flush=True)
if "tiles" not in sys.argv[1:]:
    sys.exit()
print("\nThe kernels alone at tile choices (ms; GB/s of the bytes each must move: x read, and for the backward dx "
      "written and the mask read)")
print("| kernel | rows, warps, programs per SM | tokens | K | ms | GB/s |\n|---|---|---|---|---|---|")
shipped = kernel.ROWS, kernel.WARPS, kernel.BACKWARD_ROWS, kernel.BACKWARD_WARPS, kernel.PROGRAMS_PER_SM
for T_ in (16384, 22528):
    for K in (1536, 8960):
        x = torch.randn(T_, K, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(R, K, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(T_, R, device="cuda", dtype=torch.bfloat16)
        for rows, warps in ((16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8)):
            for per_sm in (1, 4, 8, 16):
                kernel.ROWS, kernel.WARPS, kernel.PROGRAMS_PER_SM = rows, warps, per_sm
                ms = do_bench(lambda: kernel.forward_pass(x, a, P, 1))
                print(f"| forward | {rows}, {warps}, {per_sm} | {T_} | {K} | {ms:.3f} | "
                      f"{x.numel() * 2 / ms / 1e6:.0f} |", flush=True)
        kernel.ROWS, kernel.WARPS, kernel.BACKWARD_ROWS, kernel.BACKWARD_WARPS, kernel.PROGRAMS_PER_SM = shipped
        _, bits = kernel.forward_pass(x, a, P, 1)
        for rows, warps in ((32, 4), (64, 4), (64, 8), (128, 8)):
            for per_sm in (2, 4, 8):
                kernel.BACKWARD_ROWS, kernel.BACKWARD_WARPS, kernel.PROGRAMS_PER_SM = rows, warps, per_sm
                ms = do_bench(lambda: kernel.backward_pass(x, a, g, bits, P, True, True))
                print(f"| backward | {rows}, {warps}, {per_sm} | {T_} | {K} | {ms:.3f} | "
                      f"{(2 * x.numel() * 2 + bits.numel()) / ms / 1e6:.0f} |", flush=True)
        kernel.ROWS, kernel.WARPS, kernel.BACKWARD_ROWS, kernel.BACKWARD_WARPS, kernel.PROGRAMS_PER_SM = shipped
        t_fwd = do_bench(lambda: F.dropout(x, P, training=True))
        print(f"| torch's dropout alone (reads x, writes the copy and the mask) | | {T_} | {K} | {t_fwd:.3f} | "
              f"{x.numel() * 5 / t_fwd / 1e6:.0f} |", flush=True)
