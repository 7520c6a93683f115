"""The launcher's FP8 linear (launcher/fp8_linear.py) against bf16 on one GPU (issue 22): for each linear shape of
Qwen2.5-1.5B and Llama-3.1-8B, 16384 tokens, the forward and input gradient of a frozen linear (microseconds,
triton.testing.do_bench), bf16 F.linear against the FP8 path as training runs it (the weight quantized once, x and
dy quantized by its Triton rowwise kernel), the relative error of the output and of the input gradient, and
the dense matmul rates at 8192^3 (bf16, FP8 rowwise, FP8 per tensor) for MFU.
    python3 scripts/fp8_linear_bench.py        (an H100/H200: compute capability 8.9+)
"""
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, ".")
from launcher import fp8_linear  # noqa: E402

bf = torch.bfloat16
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), flush=True)

n = 8192
a, b = torch.randn(n, n, device="cuda", dtype=bf), torch.randn(n, n, device="cuda", dtype=bf)
aq, as_ = fp8_linear.quantize_rows(a)
bq, bs = fp8_linear.quantize_rows(b)
rates = {"bf16": do_bench(lambda: a @ b.t()),
         "fp8 rowwise": do_bench(lambda: torch._scaled_mm(aq, bq.t(), scale_a=as_, scale_b=bs.t().contiguous(),
                                                          out_dtype=bf, use_fast_accum=True)),
         "fp8 per tensor": do_bench(lambda: torch._scaled_mm(aq, bq.t(), scale_a=torch.ones((), device="cuda"),
                                                             scale_b=torch.ones((), device="cuda"), out_dtype=bf,
                                                             use_fast_accum=True))}
print("| 8192^3 | " + " | ".join(f"{k} {2 * n**3 / (ms / 1e3) / 1e12:.0f} TFLOP/s" for k, ms in rates.items()) + " |")

M = 16384
print("| K -> N | bf16 fwd+dgrad us | fp8 fwd+dgrad us | speed-up | fp8 fwd us | quantize x us | out rel. error | dgrad rel. error |")
print("|---|---|---|---|---|---|---|---|")
for K, N in [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536),
             (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=bf).requires_grad_(False)
    x = torch.randn(M, K, device="cuda", dtype=bf, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=bf)
    ref = lin(x)
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    t_bf = do_bench(lambda: torch.autograd.grad(lin(x), x, dy))
    fp8_linear.compute_frozen_linears_in_fp8(torch.nn.Sequential(lin), 16, cache_weights=True)
    out = lin(x)
    (dx,) = torch.autograd.grad(out, x, dy)
    t_f8 = do_bench(lambda: torch.autograd.grad(lin(x), x, dy))
    with torch.no_grad():
        t_fwd = do_bench(lambda: lin(x))
        t_q = do_bench(lambda: fp8_linear._quantize(x.detach()))
    err = lambda u, v: ((u.float() - v.float()).norm() / v.float().norm()).item()  # noqa: E731
    print(f"| {K} -> {N} | {t_bf * 1e3:.0f} | {t_f8 * 1e3:.0f} | {t_bf / t_f8:.2f}x | {t_fwd * 1e3:.0f} | "
          f"{t_q * 1e3:.0f} | {err(out, ref):.4f} | {err(dx, ref_dx):.4f} |", flush=True)
