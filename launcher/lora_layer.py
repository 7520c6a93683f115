"""A LoRA linear over a frozen nn.Linear, with LoRA's dropout in the kernel of launcher/lora_dropout_kernel.py, as
one autograd node: base(x) + scaling * lora_B(lora_A(dropout(x))).

Run as separate ops (PEFT's forward, or modeling.py's sum inside the lora_B matmul), the base and the adapter both
read x, so autograd gets x's gradient as two [tokens, features] tensors and adds them: per adapted linear, one pass
to write the adapter's part and three for the sum. Here the dropout kernel's backward adds the adapter's part into
the base's input gradient as it makes it (one read more). The forward runs the same ops as modeling.py's: the base
GEMM, the kernel, the adapter's product added into the base's output in place.

Without dropout (DPO) the forward takes cuBLAS's lora_A product and the backward the kernel's without a mask. An
earlier version added the adapter's input gradient with cuBLAS's addmm_ and timed slower than the separate ops at
two of the three layer shapes of Qwen2.5-1.5B (docs/benchmarks.md, 2026-12-02 evening); the kernel's backward, one
pass that also computes dA, is 2.8% faster per decoder layer (2026-12-03).

All in x's dtype: the adapter weights (float32 under DDP) are cast to it, as autocast casts them for the matmuls,
and their gradients come back in their own dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module


class FrozenLinearWithLora(torch.autograd.Function):
    """x2 [T, K], 16-bit on CUDA, as lora_dropout_kernel.fits takes; weight [N, K] and bias (or None), frozen, in
    x2's dtype; lora_a [R, K], lora_b [N, R]; dropout p drawn under `seed`. Returns [T, N]."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, scaling: float, p: float, seed: int):
        from launcher import lora_dropout_kernel as kernel  # triton: CUDA machines only

        x2, a, b = x2.contiguous(), lora_a.to(x2.dtype).contiguous(), lora_b.to(x2.dtype)
        out = F.linear(x2, weight, bias)
        down, bits = kernel.forward_pass(x2, a, p, seed) if p > 0 else (torch.mm(x2, a.t()), None)
        out.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, down, bits)
        ctx.scaling, ctx.p, ctx.dtypes = scaling, p, (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        from launcher import lora_dropout_kernel as kernel

        x2, weight, a, b, down, bits = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        g = grad.to(x2.dtype)
        dx = torch.mm(g, weight) if need_x else None
        da = None
        if need_x or need_a:
            g_down = torch.mm(g, b).mul_(ctx.scaling).contiguous()  # the adapter's down-projection's output gradient
            dx, da = kernel.backward_pass(x2, a, g_down, bits, ctx.p, need_x, need_a, add_to=dx)
        db = torch.mm(g.t(), down).mul_(ctx.scaling) if need_b else None
        a_dtype, b_dtype = ctx.dtypes
        return (dx, None, None, da.to(a_dtype) if need_a else None, db.to(b_dtype) if need_b else None,
                None, None, None)


def takes(base: torch.nn.Module, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether the one node computes what the separate ops would for this base layer and input: a plain frozen
    nn.Linear (its class's forward: not FP8's or another patch; no hook of its own or global, which calling the
    base would run and F.linear skips) whose weight has the dtype the matmuls run in, x's; the adapters in that
    dtype too, unless autocast casts them to it."""
    if type(base) is not torch.nn.Linear or "forward" in vars(base) or _hooked(base):
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast and torch.get_autocast_dtype(device) != x.dtype:
        return False
    return base.weight.dtype == x.dtype and (autocast or lora_a.dtype == lora_b.dtype == x.dtype)


def _hooked(module: torch.nn.Module) -> bool:
    """Any hook that calling the module would run (the test of nn.Module._call_impl's fast path)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
                or nn_module._global_backward_pre_hooks)
