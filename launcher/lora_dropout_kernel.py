"""LoRA's dropout inside the adapter's down-projection, on CUDA (Triton). PEFT computes lora_A(dropout(x)): torch's
dropout reads x and writes the dropped copy and a byte mask, both kept for the backward, whose dropout pass reads
them again; per input feature of every adapted linear and token that is 16 bytes moved and 3 kept, for a rank-16
product. Here the forward draws each element's keep/drop as it loads x and multiplies by A, and keeps one bit per
element for the backward, which applies it as it computes dx and dA: x itself is kept (as lora_A keeps it without
dropout; the layers beside it share it) and no dropped copy exists.

The draws: Philox 4x32 (triton's randint4x), keyed by a seed drawn from torch's CPU generator (torch.manual_seed
reproduces it; checkpointing restores that generator, so a recomputed forward draws the same), 16 bits per element:
an element is kept where its 16 bits are at least round(p * 65536), with probability 1 - p' for p' = that / 65536
(0.05 -> 0.0500031), and scaled by 1 / (1 - p'), so the dropout stays unbiased. Rows of x are tokens (T), columns
its K features, in blocks of 128 = 8 groups of 16; Philox counter (t, block, j) gives the 8 16-bit draws of column j
of each group, and byte (t, block * 16 + j) of the kept mask holds their 8 bits."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from launcher.lora_dropout import MAX_RANK

BK, G = 128, 16  # columns per block, per group (8 groups: one Philox call gives 8 16-bit draws)
MAX_COUNTER = 2**31 - 1  # Philox counters are int32 here
# Tiles: chosen from scripts/lora_dropout_bench.py's `tiles` on an H200 and the kernels' time in training
# (docs/benchmarks.md, 2026-12-02 evening)
ROWS, WARPS = 32, 2  # the forward's rows and warps per program
BACKWARD_ROWS, BACKWARD_WARPS = 32, 4
PROGRAMS_PER_SM = 8  # each kernel splits its loop until about this many programs run per SM


@triton.jit
def _group(x_ptr, a_ptr, rows, cols, T, K, R, keep, scale, RP: tl.constexpr):
    """(dropout of x[rows, cols]) @ A[:, cols]^T: [rows, RP] in float32."""
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                mask=(rows[:, None] < T) & (cols[None, :] < K), other=0.0)
    dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
    r = tl.arange(0, RP)
    a = tl.load(a_ptr + r[None, :] * K + cols[:, None], mask=(cols[:, None] < K) & (r[None, :] < R), other=0.0)
    return tl.dot(dropped, a)


@triton.jit
def _forward(x_ptr, a_ptr, out_ptr, bits_ptr, T, K, R, seed, threshold, scale, splits,
             RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, G: tl.constexpr):
    """BT rows (program axis 0) over every splits-th block of BK columns from axis 1's index: the partial product
    into out_ptr [splits, T, RP] in float32 (summed on the host: no atomics, the same result every run). Split, so
    that a few thousand rows still make enough programs to keep the memory busy."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    split = tl.program_id(1)
    j = tl.arange(0, G)
    blocks = tl.cdiv(K, BK)
    acc = tl.zeros((BT, RP), dtype=tl.float32)
    for blk in range(split, blocks, splits):
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * (blocks * G) + blk * G + j[None, :])
        k0 = (r0 & 0xFFFF).to(tl.int32) >= threshold
        k1 = ((r0 >> 16) & 0xFFFF).to(tl.int32) >= threshold
        k2 = (r1 & 0xFFFF).to(tl.int32) >= threshold
        k3 = ((r1 >> 16) & 0xFFFF).to(tl.int32) >= threshold
        k4 = (r2 & 0xFFFF).to(tl.int32) >= threshold
        k5 = ((r2 >> 16) & 0xFFFF).to(tl.int32) >= threshold
        k6 = (r3 & 0xFFFF).to(tl.int32) >= threshold
        k7 = ((r3 >> 16) & 0xFFFF).to(tl.int32) >= threshold
        cols = blk * BK + j
        acc += _group(x_ptr, a_ptr, rows, cols, T, K, R, k0, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + G, T, K, R, k1, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + 2 * G, T, K, R, k2, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + 3 * G, T, K, R, k3, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + 4 * G, T, K, R, k4, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + 5 * G, T, K, R, k5, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + 6 * G, T, K, R, k6, scale, RP)
        acc += _group(x_ptr, a_ptr, rows, cols + 7 * G, T, K, R, k7, scale, RP)
        bits = (k0.to(tl.int32) | (k1.to(tl.int32) << 1) | (k2.to(tl.int32) << 2) | (k3.to(tl.int32) << 3)
                | (k4.to(tl.int32) << 4) | (k5.to(tl.int32) << 5) | (k6.to(tl.int32) << 6) | (k7.to(tl.int32) << 7))
        tl.store(bits_ptr + rows[:, None].to(tl.int64) * (blocks * G) + blk * G + j[None, :], bits.to(tl.uint8),
                 mask=rows[:, None] < T)
    r = tl.arange(0, RP)
    tl.store(out_ptr + (split.to(tl.int64) * T + rows[:, None]) * RP + r[None, :], acc, mask=rows[:, None] < T)


@triton.jit
def _backward(x_ptr, a_ptr, g_ptr, bits_ptr, dx_ptr, da_ptr, T, K, R, scale, row_blocks, splits,
              RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
              NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, ADD_TO_DX: tl.constexpr, DROPOUT: tl.constexpr):
    """One block of BK columns (program axis 0) over every splits-th row block from axis 1's index: dx[rows, cols]
    = (g @ A[:, cols]) * kept * scale (ADD_TO_DX: added to what dx holds); dA[:, cols]'s partial sum per split into
    da_ptr [splits, RP, K] (summed on the host: no atomics, the same result every run). Whole blocks, so that each
    row's loads and stores are BK contiguous elements and each mask byte is read once. DROPOUT false: no mask, every
    element kept (bits_ptr unread)."""
    blk, split = tl.program_id(0), tl.program_id(1)
    blocks = tl.cdiv(K, BK)
    j = tl.arange(0, G)
    shifts = tl.arange(0, BK // G)
    cols = blk * BK + tl.arange(0, BK)
    r = tl.arange(0, RP)
    a = tl.load(a_ptr + r[:, None] * K + cols[None, :], mask=(r[:, None] < R) & (cols[None, :] < K), other=0.0)
    acc = tl.zeros((RP, BK), dtype=tl.float32)
    for tb in range(split, row_blocks, splits):
        rows = tb * BT + tl.arange(0, BT)
        inside = (rows[:, None] < T) & (cols[None, :] < K)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * R + r[None, :], mask=(rows[:, None] < T) & (r[None, :] < R),
                    other=0.0)
        if DROPOUT:
            bits = tl.load(bits_ptr + rows[:, None].to(tl.int64) * (blocks * G) + blk * G + j[None, :],
                           mask=rows[:, None] < T, other=0).to(tl.int32)
            # byte (t, blk * G + j), bit k -> column blk * BK + k * G + j: [BT, BK // G, G] row-major is [BT, BK]
            keep = tl.reshape((bits[:, None, :] >> shifts[None, :, None]) & 1, (BT, BK)) != 0
        if NEED_DX:
            dx = tl.dot(g, a)
            if DROPOUT:
                dx = tl.where(keep, dx * scale, 0.0)
            if ADD_TO_DX:
                dx += tl.load(dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0)
            tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=inside)
        if NEED_DA:
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0)
            if DROPOUT:
                x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            acc += tl.dot(tl.trans(g), x)
    if NEED_DA:
        tl.store(da_ptr + split.to(tl.int64) * RP * K + r[:, None] * K + cols[None, :], acc, mask=cols[None, :] < K)


def _rank_padded(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs 16 or more on each side


def threshold_and_scale(p: float) -> tuple[int, float]:
    """The 16-bit threshold for p, and the scale that keeps the dropout unbiased at the p it gives."""
    threshold = min(max(round(p * 65536), 1), 65535)
    return threshold, 65536 / (65536 - threshold)


@functools.cache
def _sm_count(device: torch.device) -> int:  # asked once per GPU, not at each of the ~800 kernel calls a step
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(device, programs: int, blocks: int) -> int:
    """Into how many programs to split each of `programs` loops over `blocks` steps: about PROGRAMS_PER_SM
    programs per SM in all."""
    return max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), programs)))


def forward_pass(x2, a, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dropout(x2, p) @ a^T for x2 [T, K] and a [R, K] of one 16-bit dtype, contiguous: (the product [T, R] in that
    dtype, the kept bits for backward_pass)."""
    threshold, scale = threshold_and_scale(p)
    T, K = x2.shape
    R = a.shape[0]
    RP, blocks = _rank_padded(R), triton.cdiv(K, BK)
    splits = _splits(x2.device, triton.cdiv(T, ROWS), blocks)
    out = torch.empty(splits, T, RP, device=x2.device, dtype=torch.float32)
    bits = torch.empty(T, blocks * G, device=x2.device, dtype=torch.uint8)
    _forward[(triton.cdiv(T, ROWS), splits)](x2, a, out, bits, T, K, R, seed, threshold, scale, splits,
                                             RP=RP, BT=ROWS, BK=BK, G=G, num_warps=WARPS)
    return (out[0] if splits == 1 else out.sum(0))[:, :R].to(x2.dtype), bits


def backward_pass(x2, a, g, bits, p: float, need_dx: bool, need_da: bool, add_to: torch.Tensor | None = None):
    """forward_pass's gradients for g [T, R] (the product's, x2's dtype, contiguous): (dx [T, K] in x2's dtype, or
    add_to [T, K] with dx added in place; None where not needed), (dA [R, K] in float32 or None). bits None: the
    gradients of x2 @ a^T without dropout (p unused)."""
    scale = threshold_and_scale(p)[1] if bits is not None else 1.0
    T, K = x2.shape
    R = a.shape[0]
    if add_to is not None:  # the kernel indexes it as x2 is laid out
        assert add_to.shape == x2.shape and add_to.dtype == x2.dtype and add_to.is_contiguous()
    RP, row_blocks, col_blocks = _rank_padded(R), triton.cdiv(T, BACKWARD_ROWS), triton.cdiv(K, BK)
    splits = _splits(x2.device, col_blocks, row_blocks)
    # where dx or dA is not needed, the kernel is given some other tensor as its pointer and never touches it
    dx = (torch.empty_like(x2) if add_to is None else add_to) if need_dx else x2
    da = torch.empty(splits, RP, K, device=x2.device, dtype=torch.float32) if need_da else g
    _backward[(col_blocks, splits)](x2, a, g, x2 if bits is None else bits, dx, da, T, K, R, scale, row_blocks,
                                    splits, RP=RP, BT=BACKWARD_ROWS, BK=BK, G=G, NEED_DX=need_dx, NEED_DA=need_da,
                                    ADD_TO_DX=add_to is not None, DROPOUT=bits is not None,
                                    num_warps=BACKWARD_WARPS)
    return (dx if need_dx else None), (da.sum(0)[:R] if need_da else None)


class DropoutThenDown(torch.autograd.Function):
    """lora_A(dropout(x)) for x [..., K] and A [r, K]: [..., r] in x's dtype (A is cast to it, as autocast would)."""

    @staticmethod
    def forward(ctx, x, weight, p: float, seed: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        a = weight.to(x.dtype).contiguous()
        out, bits = forward_pass(x2, a, p, seed)
        ctx.save_for_backward(x2, a, bits)
        ctx.p, ctx.shape, ctx.weight_dtype = p, shape, weight.dtype
        return out.view(*shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, a, bits = ctx.saved_tensors
        g = grad.reshape(-1, a.shape[0]).to(x2.dtype).contiguous()
        need_dx, need_da = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, da = backward_pass(x2, a, g, bits, ctx.p, need_dx, need_da)
        return (dx.view(ctx.shape) if need_dx else None), (da.to(ctx.weight_dtype) if need_da else None), None, None


def fits(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernel takes x for a LoRA of this rank: 16-bit floats on CUDA, rows to drop, few enough for int32
    Philox counters (the last program's rows included), a rank whose float32 accumulator stays in registers."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() < 2 or rank > MAX_RANK:
        return False
    rows = x.numel() // x.shape[-1]
    return rows > 0 and (rows + ROWS) * triton.cdiv(x.shape[-1], BK) * G <= MAX_COUNTER


def draw_seed() -> int:
    """A seed for one call, from torch's CPU generator (no GPU sync)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def dropout_then_down(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """lora_A(dropout(x, p)) in one kernel."""
    return DropoutThenDown.apply(x, weight, p, draw_seed())


def keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The elements of x the kernel keeps for this seed, as a bool tensor of x's shape (for tests): the bits the
    forward stores, unpacked."""
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    T, K = x2.shape
    a = torch.zeros(1, K, device=x.device, dtype=x.dtype)
    _, bits = forward_pass(x2, a, p, seed)
    # byte (t, block * G + j), bit k -> column block * BK + k * G + j
    blocks = bits.view(T, -1, 1, G).int()
    unpacked = (blocks >> torch.arange(BK // G, device=x.device).view(1, 1, -1, 1)) & 1
    return unpacked.reshape(T, -1)[:, :K].bool().view(x.shape)
