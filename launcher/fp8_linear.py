"""Frozen base linears that multiply in FP8 (train.fp8, launcher/fp8.py decides where).

With LoRA the base weights never change, so each frozen linear's weight is quantized once (where the strategy keeps
it whole: ddp, zero2) and its matmuls run on FP8 tensor cores through torch._scaled_mm: the forward x @ W.T and the
input gradient dy @ W (train.fp8=backward: the input gradient only, the forward stays bf16). No weight gradient is
needed, so nothing of x is saved for the backward. The adapters, norms, embeddings, the LM head and the loss stay as
they were (bf16 / fp32).

Scaling: rowwise, e4m3 for everything. One scale per row of x and dy (per token) and per output channel of W
(per input channel of W.T for the input gradient): a token with large activations does not crush the resolution
of the others, as one scale per tensor would, and a row's amax and cast are one pass over it (one Triton kernel),
where a tensor's amax is a reduction over the whole tensor before any cast can start. e4m3 for the
gradients too: with a scale per row its 448 range is enough, and its 3 mantissa bits halve e5m2's error.
"""
from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("launcher")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm's rule for the inner and the output dimension


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (rows, cols) -> (q, scale): e4m3 values and a float32 scale per row, t ~= q * scale."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@functools.cache
def _triton_kernel():
    """Rowwise quantization in one Triton kernel: a program per row reads it once, takes its amax, writes the e4m3
    values and the scale. (torch.compile of quantize_rows gave the same fusion, but guarding and recompiling it per
    call cost more than the cast itself: measured at 97 us per 16384 x 1536 call on an H200.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize(x_ptr, q_ptr, s_ptr, n_cols, stride_x, BLOCK: tl.constexpr, MAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / MAX
        q = tl.minimum(tl.maximum(x / scale, -MAX), MAX)
        tl.store(q_ptr + row * n_cols + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    def run(t: torch.Tensor):
        rows, cols = t.shape
        q = torch.empty((rows, cols), device=t.device, dtype=E4M3)
        scale = torch.empty((rows, 1), device=t.device, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        quantize[(rows,)](t, q, scale, cols, t.stride(0), BLOCK=block, MAX=E4M3_MAX,
                          num_warps=max(1, min(16, block // 512)))
        return q, scale

    return run


def _quantize(t: torch.Tensor):
    """quantize_rows on the GPU by the Triton kernel (rows contiguous), elsewhere as written."""
    if t.device.type != "cuda":
        return quantize_rows(t)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return _triton_kernel()(t)


def weight_for_forward(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) quantized by rows (output channels), the scale shaped (1, out) as torch._scaled_mm takes mat2's."""
    with torch.no_grad():
        q, scale = _quantize(weight)
    return q, scale.t().contiguous()


def weight_for_input_gradient(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W.T made contiguous and quantized by its rows (input channels), the scale shaped (1, in)."""
    return weight_for_forward(weight.t().contiguous())


def quantize_weight(weight: torch.Tensor, forward: bool = True) -> tuple[torch.Tensor | None, ...]:
    """What the cache holds: the weight for the FP8 forward (unless the forward stays bf16) and for the input
    gradient."""
    return (*(weight_for_forward(weight) if forward else (None, None)), *weight_for_input_gradient(weight))


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W.T in FP8 (or in bf16: fp8_forward false), and dx = dy @ W in FP8. Given no quantized weight
    (strategies that gather the weight per use: ZeRO-3, FSDP), it quantizes the weight it is handed, in the forward
    and again in the backward, saving the weight itself (as F.linear does) rather than an FP8 copy that would outlive
    the gather."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_s, wt_q, wt_s, fp8_forward):
        ctx.save_for_backward(weight if wt_q is None else None, wt_q, wt_s)
        if not fp8_forward:
            return x @ weight.t()
        if w_q is None:
            w_q, w_s = weight_for_forward(weight)
        x_q, x_s = _quantize(x)
        # Hopper's fast accumulation for the forward only, as torchao's float8 recipes do: the measured output
        # error was the same 3.7% at K = 14336 as at K = 1536 (scripts/fp8_linear_bench.py), while gradients keep
        # the exact accumulation
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        weight, wt_q, wt_s = ctx.saved_tensors
        if wt_q is None:
            wt_q, wt_s = weight_for_input_gradient(weight)
        dy_q, dy_s = _quantize(dy.contiguous())
        dx = torch._scaled_mm(dy_q, wt_q.t(), scale_a=dy_s, scale_b=wt_s, out_dtype=torch.bfloat16)
        return dx, None, None, None, None, None, None


def fp8_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward for a frozen linear, in FP8 (bf16 out: the plan runs FP8 only in bf16 jobs). The quantized
    weight is cached where the strategy keeps it whole (`self.fp8_cache_weight`), keyed by the weight's storage and
    its version counter: a weight replaced, or changed in place through the parameter, is quantized again; writes
    through `.data` are not seen (the base is frozen: nothing in a run writes it). `self.fp8_forward` false: only the
    backward's input gradient runs in FP8."""
    if x.shape[:-1].numel() == 0:
        return F.linear(x, self.weight, self.bias)
    weight = self.weight
    quantized = (None,) * 4
    if self.fp8_cache_weight:
        key = (weight.data_ptr(), weight._version)
        if getattr(self, "fp8_cached", None) is None or self.fp8_cached[0] != key:
            self.fp8_cached = (key, quantize_weight(weight, self.fp8_forward))
        quantized = self.fp8_cached[1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != torch.bfloat16:
        rows = rows.to(torch.bfloat16)
    out = _Fp8Matmul.apply(rows, weight, *quantized, self.fp8_forward)
    if self.bias is not None:
        out = out + self.bias
    if x.dim() == 2:  # as it is: a view would make LoRA's in-place sum (launcher/modeling.py) copy it
        return out
    return out.view(*x.shape[:-1], out.shape[-1])


def eligible(module: torch.nn.Module, min_features: int) -> bool:
    """A frozen nn.Linear (LoRA's base layers; any other frozen projection), large enough for FP8 to pay
    (min_features: launcher/fp8.py) and shaped as torch._scaled_mm needs."""
    if type(module) is not torch.nn.Linear or module.weight.requires_grad:
        return False
    n_in, n_out = module.in_features, module.out_features
    return (min(n_in, n_out) >= min_features and n_in % SCALED_MM_ALIGNMENT == 0
            and n_out % SCALED_MM_ALIGNMENT == 0)


def check_scaled_mm(device: torch.device) -> None:
    """One small rowwise-scaled FP8 product on the rank's GPU before any layer is switched: compute capability 8.9+
    is the rule, but rowwise scaling also needs a torch build that has it for this GPU (tested: H200, torch 2.11)."""
    a = torch.ones(16, 32, device=device, dtype=E4M3)
    scale = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t().contiguous(), out_dtype=torch.bfloat16)
    except RuntimeError as err:
        raise RuntimeError(f"train.fp8: this GPU or torch build cannot run rowwise-scaled FP8 matmuls ({err}); "
                           "run with train.fp8=false") from err


def compute_frozen_linears_in_fp8(model: torch.nn.Module, min_features: int, cache_weights: bool,
                                  forward: bool = True) -> int:
    """Switch every eligible linear of the model to fp8_linear_forward; forward false: the forward stays bf16, the
    input gradient runs in FP8. Not the LM head: TRL scores with its weight directly, and the logits stay bf16.
    Returns how many were switched."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = [m for m in model.modules() if m is not head and eligible(m, min_features)]
    if chosen and chosen[0].weight.device.type == "cuda":
        check_scaled_mm(chosen[0].weight.device)
    for module in chosen:
        module.fp8_cache_weight, module.fp8_forward = cache_weights, forward
        module.forward = types.MethodType(fp8_linear_forward, module)
    log.debug("FP8 matmuls (%s) for %d frozen linear layers (at least %d features, weights %s)",
              "forward and input gradient" if forward else "input gradient only", len(chosen), min_features,
              "quantized once" if cache_weights else "quantized at each use")
    return len(chosen)
