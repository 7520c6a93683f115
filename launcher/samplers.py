"""Which rows go into which micro-batch, as the plan says (launcher/batching.py): filled to a token budget
(padding-free DPO), grouped by length (padded batches), or transformers' random sampler.

Both samplers are handed to the Trainer through its own `_get_train_sampler`. The token-budget one is a
`BatchRebalanceSampler` to transformers: a sampler of whole micro-batches that already knows its rank, which
the Trainer passes to the DataLoader as its batch sampler and does not shard again.
"""
from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

log = logging.getLogger("launcher")


def row_tokens(dataset, max_length: int) -> list[int]:
    """What each tokenized row puts through the model: a pair's chosen and rejected sequences (prompt + answer,
    each cut at max_length as TRL's collator cuts it), or an SFT row's tokens."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]  # honours an indices mapping (a split or a shuffle)
    if "chosen_ids" in table.column_names:
        prompt = pc.list_value_length(table["prompt_ids"])
        total = 0
        for answer in ("chosen_ids", "rejected_ids"):
            total = pc.add(total, pc.min_element_wise(pc.add(prompt, pc.list_value_length(table[answer])),
                                                      max_length))
        return total.to_pylist()
    return pc.list_value_length(table["input_ids"]).to_pylist()


class TokenBudgetSampler(BatchRebalanceSampler):
    """Micro-batches of whole rows up to `budget` tokens. Every rank shuffles the same way (seed + epoch), fills
    micro-batches in that order and takes every `world`-th one, so the ranks agree without talking. Every epoch
    yields `len(self)` micro-batches per rank, as epoch 0 fills them: another shuffle fills a few more or fewer,
    and the surplus is left out or the shortfall taken again from the epoch's start (as torch's
    DistributedSampler pads), so that no rank waits for a step another never takes."""

    def __init__(self, lengths: list[int], budget: int, world: int, rank: int, seed: int):
        self.lengths, self.budget, self.world, self.rank, self.seed = lengths, budget, world, rank, seed
        self.epoch = 0
        self.per_rank = max(1, len(self._micro_batches(0)) // world)  # the epoch's length, as the Trainer counts
        self.rows_per_micro_batch = len(lengths) / (self.per_rank * world)  # on average

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        batches, current, tokens = [], [], 0
        for i in torch.randperm(len(self.lengths), generator=g).tolist():
            n = self.lengths[i]
            if current and tokens + n > self.budget:
                batches.append(current)
                current, tokens = [], 0
            current.append(i)  # a row over the budget goes alone (the preflight refuses a budget below any row)
            tokens += n
        if current:
            batches.append(current)
        return batches

    def __iter__(self):
        batches, wanted = self._micro_batches(self.epoch), self.per_rank * self.world
        while len(batches) < wanted:
            batches += batches[: wanted - len(batches)]
        yield from batches[self.rank:wanted:self.world]

    def __len__(self) -> int:
        return self.per_rank


class SetEpochOnResume(TrainerCallback):
    """On resume, accelerate wraps the batch sampler once more to skip the steps done, and the Trainer's
    set_epoch no longer reaches it: the resumed epoch would replay epoch 0's order. Set it at each epoch's start."""

    def __init__(self):
        self.sampler = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.sampler is not None:
            self.sampler.set_epoch(int(state.epoch or 0))


def weigh_pairs_equally(trainer, sampler_box: SetEpochOnResume) -> None:
    """TRL's DPO loss is the mean over a micro-batch's pairs, and the steps average micro-batches: where they hold
    different numbers of pairs, a pair of a small (long-pair) micro-batch would weigh more than one of a large.
    Scaled by its pairs over the mean pairs per micro-batch, each micro-batch's loss is the sum over its pairs
    divided by a constant, so every pair weighs the same (as fairseq weighs its token-budget batches)."""
    compute_loss = trainer.compute_loss

    def loss_with_pairs_weighed_equally(model, inputs, *args, **kwargs):
        out = compute_loss(model, inputs, *args, **kwargs)
        if not trainer.model.training or sampler_box.sampler is None:
            return out
        scale = inputs["input_ids"].shape[0] / 2 / sampler_box.sampler.rows_per_micro_batch
        return (out[0] * scale, *out[1:]) if isinstance(out, tuple) else out * scale

    trainer.compute_loss = loss_with_pairs_weighed_equally


def use_planned_sampler(trainer, plan: dict, max_length: int, seed: int) -> str | None:
    """Point the trainer at the sampler the plan asks for; returns what it did (None: transformers' own)."""
    args = trainer.args
    if plan["token_budget"]:
        box = SetEpochOnResume()
        trainer.add_callback(box)
        weigh_pairs_equally(trainer, box)

        def sampler(dataset=None):
            lengths = row_tokens(dataset if dataset is not None else trainer.train_dataset, max_length)
            s = box.sampler = TokenBudgetSampler(lengths, plan["token_budget"], args.world_size, args.process_index,
                                                 seed)
            log.debug("token budget %d: %d micro-batches per rank per epoch, %.1f rows and %.0f tokens each on average",
                     plan["token_budget"], len(s), s.rows_per_micro_batch, sum(lengths) / (len(s) * args.world_size))
            return s
    elif plan["group_by_length"]:
        def sampler(dataset=None):
            lengths = row_tokens(dataset if dataset is not None else trainer.train_dataset, max_length)
            return LengthGroupedSampler(args.train_batch_size * args.gradient_accumulation_steps, lengths=lengths)
    else:
        return None
    trainer._get_train_sampler = sampler
    return "token budget" if plan["token_budget"] else "length-grouped"
