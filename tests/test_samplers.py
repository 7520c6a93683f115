"""Which rows go into which micro-batch (launcher/samplers.py)."""
import random

import pytest

from launcher.samplers import TokenBudgetSampler, row_tokens


def test_token_budget_micro_batches_hold_whole_rows_within_the_budget_and_the_ranks_agree():
    rng = random.Random(0)
    lengths = [rng.choice([30, 200, 900, 2500, 4000]) for _ in range(500)]
    ranks = [TokenBudgetSampler(lengths, budget=8192, world=2, rank=r, seed=42) for r in (0, 1)]
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) > 10  # the same number of steps on every rank
    seen = [i for rank in batches for batch in rank for i in batch]
    assert len(seen) == len(set(seen))  # no row twice in an epoch
    assert len(seen) > 0.97 * len(lengths)  # at most the last round (one micro-batch per rank) is left out
    sizes = [sum(lengths[i] for i in batch) for rank in batches for batch in rank]
    assert max(sizes) <= 8192 and sum(sizes) / len(sizes) > 0.8 * 8192  # filled, never over
    assert len({len(batch) for rank in batches for batch in rank}) > 3  # rows per micro-batch vary with length


def test_every_epoch_gives_every_rank_the_steps_the_trainer_counted():
    """Another shuffle fills a few more or fewer micro-batches than epoch 0: a rank with one step fewer would
    leave the others waiting in their gradient all-reduce."""
    rng = random.Random(0)
    lengths = [rng.choice([30, 200, 900, 2500, 4000]) for _ in range(500)]
    ranks = [TokenBudgetSampler(lengths, budget=8192, world=2, rank=r, seed=42) for r in (0, 1)]
    filled = set()
    for epoch in range(20):
        for s in ranks:
            s.set_epoch(epoch)
        assert [len(list(s)) for s in ranks] == [len(ranks[0])] * 2, epoch
        filled.add(len(ranks[0]._micro_batches(epoch)))
    assert len(filled) > 1  # the shuffles did fill different numbers: the case this test is about


def test_each_micro_batchs_loss_is_weighed_by_its_pairs(tiny_dir):
    """Micro-batches of 1 and 3 pairs: scaled by pairs / mean pairs (2), their mean is the mean over the 4 pairs."""
    import torch

    from launcher.samplers import weigh_pairs_equally

    per_pair = torch.tensor([0.9, 0.1, 0.2, 0.3])

    class Trainer:  # the two attributes weigh_pairs_equally reads, around a loss of per-pair means
        model = torch.nn.Linear(1, 1)

        def compute_loss(self, model, inputs, return_outputs=False):
            return per_pair[inputs["pairs"]].mean()

    class Box:
        sampler = type("S", (), {"rows_per_micro_batch": 2.0})()

    trainer = Trainer()
    weigh_pairs_equally(trainer, Box())
    batches = [{"pairs": [0], "input_ids": torch.zeros(2, 5)}, {"pairs": [1, 2, 3], "input_ids": torch.zeros(6, 5)}]
    mean_of_steps = sum(trainer.compute_loss(trainer.model, b) for b in batches) / 2
    assert mean_of_steps.item() == pytest.approx(per_pair.mean().item())  # unweighted: (0.9 + 0.2) / 2 = 0.55
    trainer.model.eval()
    assert trainer.compute_loss(trainer.model, batches[0]).item() == pytest.approx(0.9)  # evaluation: as TRL


def test_the_sampler_follows_the_epoch_on_resume():
    from launcher.samplers import SetEpochOnResume

    box = SetEpochOnResume()
    box.sampler = TokenBudgetSampler([100] * 50, budget=1000, world=1, rank=0, seed=0)
    box.on_epoch_begin(None, type("State", (), {"epoch": 2.4})(), None)  # resumed 40% into the third epoch
    assert box.sampler.epoch == 2


def test_each_epoch_shuffles_anew_and_the_same_way_on_every_run():
    lengths = [100 + (i * 37) % 900 for i in range(300)]
    sampler = TokenBudgetSampler(lengths, budget=4096, world=2, rank=0, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    again = TokenBudgetSampler(lengths, budget=4096, world=2, rank=0, seed=1)
    assert list(again) == first


def test_a_row_over_the_budget_goes_alone():
    sampler = TokenBudgetSampler([100, 5000, 100, 100], budget=1000, world=1, rank=0, seed=0)
    assert [5000] in [[[100, 5000, 100, 100][i] for i in b] for b in sampler]


def test_row_tokens_count_what_trls_preference_collator_builds(tiny_tokenizer):
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = Dataset.from_list([{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
                              for p, c, r in ((5, 10, 3), (40, 100, 90), (1, 2, 200))])
    lengths = row_tokens(rows.select([2, 0, 1]), max_length=128)  # a selection: an indices mapping
    collate = DataCollatorForPreference(pad_token_id=0, max_length=128)
    expected = [int(collate([rows[i]])["attention_mask"].sum()) for i in (2, 0, 1)]
    assert lengths == expected == [3 + 128, 15 + 8, 128 + 128]
    sft = Dataset.from_list([{"input_ids": [1] * n} for n in (7, 70)])
    assert row_tokens(sft, max_length=64) == [7, 70]
