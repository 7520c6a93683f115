"""Padding-free batches: the model sees only real tokens, every sequence attending to itself alone.

TRL 1.16 pads DPO batches (its `padding_free` is switched off after a refactor) and packs SFT rows itself
(`packing`, best-fit decreasing). For DPO the batch stays as TRL's collator pads it, and two small pieces
take the padding out of the model's work only:

- `PreferenceBatchFlattener` wraps TRL's collator: on the CPU, in the dataloader workers, it adds where each
  real token sits in the padded grid, its position in its sequence and the sequence boundaries;
- `unpad_forward` wraps the model's forward: it runs the backbone on one row of real tokens and puts the
  per-token outputs back into the padded layout, so TRL's loss, metrics and token counts run unchanged.

Attention then has to stay within each sequence. transformers finds the boundaries from `position_ids`
and builds a block-diagonal mask for SDPA and flex attention (what the CPU runs); on CUDA GPUs
`packed_varlen` runs torch's own flash-attention kernel on the boundaries directly (no mask, no padding).
"""
from __future__ import annotations

import functools

import torch

from launcher.batching import VARLEN_ATTENTION


def flatten_preference_batch(batch: dict) -> dict:
    """Adds to a right-padded batch: `pf_index` (the flat positions of its real tokens in the [rows x length]
    grid), `position_ids` (each token's position in its own sequence, as one row) and the boundaries the
    varlen kernels read (`cu_seq_lens_*`, `max_length_*`)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.size(1)).expand_as(mask)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    longest = int(lengths.max())
    batch.update(pf_index=mask.reshape(-1).nonzero().squeeze(1), position_ids=positions[mask].unsqueeze(0),
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return batch


class PreferenceBatchFlattener:
    """TRL's preference collator, with `flatten_preference_batch` applied to what it returns."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return flatten_preference_batch(self.collator(examples))


def _to_padded(value, index: torch.Tensor, rows: int, length: int):
    """A per-token output of the one-row forward, back in the [rows x length] layout (zeros at the padding).
    Shifted outputs (next-token log-probs: one less than the tokens) land one column left, as TRL expects."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.size(0) != 1:
        return value
    tokens = index.numel()
    if value.size(1) not in (tokens, tokens - 1):
        return value
    shifted = value.size(1) == tokens - 1
    grid = value.new_zeros((rows * length, *value.shape[2:]))
    grid = grid.index_copy(0, index[1:] if shifted else index, value[0])
    grid = grid.view(rows, length, *value.shape[2:])
    return grid[:, 1:] if shifted else grid


def unpad_forward(model) -> None:
    """Wrap `model.forward` (after TRL's fused LM head is in place): a batch that carries `pf_index` runs as one
    row of its real tokens; every other call is left as it is."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, pf_index=None, **kwargs):
        if pf_index is None:
            return original(*args, **kwargs)
        input_ids = kwargs.pop("input_ids")
        kwargs.pop("attention_mask", None)  # the sequence boundaries take its place
        rows, length = input_ids.shape
        flat = input_ids.reshape(-1).index_select(0, pf_index).unsqueeze(0)
        labels = kwargs.pop("labels", None)
        if labels is not None:
            labels = labels.reshape(-1).index_select(0, pf_index).unsqueeze(0)
            # a sequence's first token is not predicted from the previous sequence's last one
            labels = labels.masked_fill(kwargs["position_ids"] == 0, -100)
        out = original(*args, input_ids=flat, labels=labels, **kwargs)
        for name, value in out.items():
            out[name] = _to_padded(value, pf_index, rows, length)
        return out

    model.forward = forward


# A 4D mask is what transformers passes to the attention function as it is. Given with the boundaries, it stands
# for "no mask": without it transformers searches `position_ids` for packed sequences at every forward, a read back
# from the GPU that stalls the host (packed_varlen reads the boundaries itself and needs no mask).
BOUNDARIES_ONLY = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def attend_by_boundaries(model) -> None:
    """Wrap `model.forward` where its attention is packed_varlen: a packed row that brings its sequence boundaries
    (`cu_seq_lens_q`, from TRL's SFT packing or `flatten_preference_batch`) skips transformers' mask building."""
    if getattr(model.config, "_attn_implementation", None) != VARLEN_ATTENTION:
        return
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = BOUNDARIES_ONLY
        return original(*args, **kwargs)

    model.forward = forward


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unpad_preference_batches(trainer) -> None:
    """DPO: TRL's batches flattened as they are collated, and its policy (and reference model, if any) run them
    as one row of real tokens."""
    trainer.data_collator = PreferenceBatchFlattener(trainer.data_collator)
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            attend_by_boundaries(_base(model))
            unpad_forward(_base(model))


def packed_rows_attend_by_boundaries(trainer) -> None:
    """SFT: TRL's packed rows carry their boundaries already."""
    attend_by_boundaries(_base(trainer.model))


def packed_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function: torch's flash-attention kernel over packed sequences when the batch is
    one row of them (`cu_seq_lens_q` given), SDPA otherwise. Query [1, heads, tokens, dim] -> [1, tokens, heads, dim]."""
    if cu_seq_lens_q is None or query.size(0) != 1:
        if attention_mask is BOUNDARIES_ONLY:
            raise ValueError("packed_varlen: a batch marked as packed came without its sequence boundaries")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("packed_varlen attention has no logit softcapping (Gemma 2); give "
                                  "model.attn_implementation=eager, or train.padding_free=false")
    window = {}
    if kwargs.get("sliding_window"):  # a sliding layer (Mistral, Gemma, Qwen2 with use_sliding_window)
        window = dict(window_size_left=kwargs["sliding_window"] - 1, window_size_right=0)
    # The kernel takes 16-bit inputs only; a model prepared for k-bit training (4-bit under ddp) runs its norms,
    # and so the projections' inputs, in float32
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [tokens, heads, dim]
    cu = cu_seq_lens_q.to(torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, int(max_length_q), int(max_length_q), dropout if module.training else 0.0, True, False,
        scale=scaling, **window)[0]
    return out.unsqueeze(0).to(query.dtype), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (the kernel reads the boundaries); SDPA's for a padded batch."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Make `attn_implementation="packed_varlen"` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, packed_varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION
