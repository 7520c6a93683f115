"""Which rows go into which micro-batch, as the plan says (launcher/batching.py): filled to a token budget
(padding-free DPO), grouped by length (padded batches), or transformers' random sampler.

Both samplers are handed to the Trainer through its own `_get_train_sampler`. The token-budget one is a
`BatchRebalanceSampler` to transformers: a sampler of whole micro-batches that already knows its rank, which
the Trainer passes to the DataLoader as its batch sampler and does not shard again.
"""
from __future__ import annotations

import logging

import torch
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
    micro-batches in that order and takes every `world`-th one, so the ranks agree without talking, and each
    yields the same number of micro-batches (a last round short of one per rank is left out)."""

    def __init__(self, lengths: list[int], budget: int, world: int, rank: int, seed: int):
        self.lengths, self.budget, self.world, self.rank, self.seed = lengths, budget, world, rank, seed
        self.epoch = 0
        self.per_rank = len(self._micro_batches(0)) // world  # the epoch's length, as the Trainer counts steps

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
        mine = self._micro_batches(self.epoch)[self.rank::self.world]
        yield from mine[: self.per_rank]

    def __len__(self) -> int:
        return self.per_rank


def use_planned_sampler(trainer, plan: dict, max_length: int, seed: int) -> str | None:
    """Point the trainer at the sampler the plan asks for; returns what it did (None: transformers' own)."""
    args = trainer.args
    if plan["token_budget"]:
        def sampler(dataset=None):
            lengths = row_tokens(dataset if dataset is not None else trainer.train_dataset, max_length)
            s = TokenBudgetSampler(lengths, plan["token_budget"], args.world_size, args.process_index, seed)
            log.info("token budget %d: %d micro-batches per rank per epoch, %.1f rows and %.0f tokens each on average",
                     plan["token_budget"], len(s), len(lengths) / max(len(s) * args.world_size, 1),
                     sum(lengths) / max(len(s) * args.world_size, 1))
            return s
    elif plan["group_by_length"]:
        def sampler(dataset=None):
            lengths = row_tokens(dataset if dataset is not None else trainer.train_dataset, max_length)
            return LengthGroupedSampler(args.train_batch_size * args.gradient_accumulation_steps, lengths=lengths)
    else:
        return None
    trainer._get_train_sampler = sampler
    return "token budget" if plan["token_budget"] else "length-grouped"
