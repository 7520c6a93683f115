"""train.metrics_sync=log: each rank keeps its training steps' metrics to itself; the ranks average them at each log.

TRL's DPO loss gathers 15 metric tensors across the ranks at every step (rewards, margins, log-probs, token
sums and counts), each an all-gather, and reads 13 values back with `.item()`, all between the forward and the
backward: the faster rank waits there for the slower, and neither can queue its backward until the last value
is back (2x H200, 2026-11-24: 16-18 ms of all-gather kernels per profiled step). SFT gathers 4. With
metrics_sync=log the ranks meet once per log instead, in one gather of every metric's average; the `.item()`
reads stay, each waiting on its own rank's GPU alone.

What the logs show:
- the same values for the metrics that are averages over pairs or rows (rewards/*, logps/*) where every rank
  holds the same number of them (the mean of the ranks' means is the mean); with a token budget
  (launcher/samplers.py) the ranks' micro-batches hold different numbers of pairs, and each rank's mean weighs the
  same (TRL's per-step gathers would fail there: they need tensors of one length on every rank);
- num_tokens summed over the ranks, as before;
- for the ratios over tokens (entropy, mean_token_accuracy, logits/*) the mean of the ranks' ratios, where TRL
  pools the tokens of all ranks: ranks with unequal token counts weigh equally.
The loss, the gradients and the held-out metrics (evaluation still gathers at every step) are unchanged.
"""
from __future__ import annotations

import torch


def sync_metrics_at_log(trainer) -> str:
    """Wraps the trainer's compute_loss (training steps keep their metrics on the rank) and its log (one gather
    of the averages, on every rank alike: the Trainer logs on all ranks at the same steps)."""
    accelerator = trainer.accelerator
    compute_loss, log = trainer.compute_loss, trainer.log

    def this_ranks_own(tensor, *args, **kwargs):
        return tensor

    def compute_loss_keeping_metrics_on_the_rank(*args, **kwargs):
        if not trainer.model.training:  # evaluation gathers as TRL does
            return compute_loss(*args, **kwargs)
        accelerator.gather = accelerator.gather_for_metrics = this_ranks_own
        try:
            return compute_loss(*args, **kwargs)
        finally:
            del accelerator.gather, accelerator.gather_for_metrics  # the class's own again

    def log_with_metrics_averaged_over_ranks(logs, *args, **kwargs):
        metrics = trainer._metrics["train"]
        if trainer.model.training and metrics:
            keys = sorted(metrics)
            means = torch.tensor([[sum(metrics[k]) / len(metrics[k]) for k in keys]], dtype=torch.float64,
                                 device=accelerator.device)
            per_rank = accelerator.gather(means)  # (ranks, keys)
            ranks = per_rank.shape[0]
            for key, total in zip(keys, per_rank.sum(dim=0).tolist()):
                metrics[key] = [total if key == "num_tokens" else total / ranks]
        return log(logs, *args, **kwargs)

    trainer.compute_loss = compute_loss_keeping_metrics_on_the_rank
    trainer.log = log_with_metrics_averaged_over_ranks
    return "training metrics gathered across ranks at each log, not at each step"
