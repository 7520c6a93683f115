"""Padding-free batches (launcher/padding_free.py): the model runs real tokens only and learns the same.

On the CPU transformers keeps each sequence to itself with SDPA and a block-diagonal mask found from the
position ids; on a GPU the varlen flash kernel does it from the sequence boundaries (the `gpu` test).
"""
import json

import pytest
import torch

from conftest import lora_model_with_b, read_metrics, run_launcher, untrained_adapters, zero3_on_cpu
from launcher import ROOT, padding_free


def preference_trainer(tiny_dir, tiny_tokenizer, rows: int = 8):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs = [json.loads(line) for line in (ROOT / "launcher/assets/demo_pref.jsonl").open()][:rows]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa")
    args = DPOConfig(output_dir="/tmp/launcher-test-pf", per_device_train_batch_size=rows, use_cpu=True,
                     report_to="none", max_length=128)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tiny_tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # lora_B at zero would leave the adapter out of every log-prob
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.02)
    return trainer


def test_a_padding_free_batch_gives_the_padded_batchs_log_probs_loss_and_gradients(tiny_dir, tiny_tokenizer):
    trainer = preference_trainer(tiny_dir, tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    mask = batch["attention_mask"]
    assert mask.sum() < mask.numel() * 0.9, "the batch must hold padding for this test to mean anything"
    model = trainer.model

    def run(inputs):
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs, return_outputs=False)
        loss.backward()
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        keys = {k: v for k, v in inputs.items() if k not in ("completion_mask",)}
        with torch.no_grad():
            logps = model(**keys, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), logps, grads

    padded = run(dict(batch))
    padding_free.unpad_forward(model.get_base_model())
    flat = padding_free.flatten_preference_batch(dict(batch))
    assert flat["pf_index"].numel() == mask.sum() and flat["position_ids"].shape == (1, mask.sum())
    unpadded = run(flat)
    assert torch.allclose(unpadded[1], padded[1], rtol=0, atol=1e-5), (unpadded[1] - padded[1]).abs().max()
    assert abs(unpadded[0].item() - padded[0].item()) < 1e-5
    assert padded[2].keys() == unpadded[2].keys() and len(padded[2]) > 0
    for name, grad in padded[2].items():
        assert torch.allclose(unpadded[2][name], grad, rtol=1e-4, atol=1e-6), name


def test_packed_sft_rows_give_the_padded_rows_loss(tiny_dir):
    """TRL's padding-free SFT collator (what packing uses) against its padded one, on the same rows."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = lora_model_with_b(tiny_dir, 0.02)
    torch.manual_seed(1)
    rows = [{"input_ids": torch.randint(10, 2000, (n,)).tolist()} for n in (7, 31, 12, 64, 3)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, 117) and padded["input_ids"].shape == (5, 64)
    assert set(packed) >= {"position_ids", "cu_seq_lens_q", "max_length_q"} and "attention_mask" not in packed
    with torch.no_grad():  # no cache: with one, transformers does not look for packed sequences (launcher.train
        loss_padded = model(**padded, use_cache=False).loss  # loads every model with use_cache=False)
        loss_packed = model(**{k: v for k, v in packed.items() if k != "seq_idx"}, use_cache=False).loss
    assert abs(loss_packed.item() - loss_padded.item()) < 1e-5


def test_outputs_go_back_to_the_padded_layout():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    flat = padding_free.flatten_preference_batch({"attention_mask": mask})
    assert flat["pf_index"].tolist() == [0, 1, 2, 4, 5]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5] and flat["max_length_q"] == 3
    # next-token log-probs of the flat row (4 = 5 tokens - 1): each lands under the token it predicts
    shifted = torch.tensor([[10.0, 11.0, 12.0, 13.0]])
    back = padding_free._to_padded(shifted, flat["pf_index"], rows=2, length=4)
    assert back.tolist() == [[10.0, 11.0, 0.0], [13.0, 0.0, 0.0]]  # 12: row 1's first token, from row 0's last
    per_token = torch.arange(5.0).view(1, 5, 1)
    assert padding_free._to_padded(per_token, flat["pf_index"], 2, 4)[:, :, 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0]]


@pytest.mark.slow
def test_a_padding_free_run_fills_micro_batches_to_the_budget_resumes_and_learns(tmp_path, tiny_dir):
    """2 CPU processes: micro-batches of whole pairs up to 2048 tokens, no padding, TRL's metrics averaged at each
    log, a resume from the checkpoint mid-run, and an adapter that learned."""
    run = tmp_path / "run"
    args = [f"run_dir={run}", "train.padding_free=true", "save_steps=4", "train.lr=5e-4"]
    first = run_launcher(*args, "train.max_steps=4", timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "micro_batch_tokens -> 2048" in first.stdout and "train.metrics_sync -> log" in first.stdout
    budget_line = next(line for line in (run / "logs" / "rank1.log").read_text().splitlines() if "token budget" in line)
    per_micro_batch = float(budget_line.split(" tokens each")[0].rsplit(" ", 1)[1])
    assert 1500 < per_micro_batch <= 2048, budget_line  # filled close to the budget, never over
    second = run_launcher(*args, "train.max_steps=8", "resume=auto", timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(step 4)" in second.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 8 and summary["eval_rewards/accuracies"] > 0.6  # chance: 0.5
    shares = [m["padding_share"] for m in read_metrics(run) if "padding_share" in m]
    assert shares and all(s == 0 for s in shares)


@pytest.mark.slow
def test_padding_free_under_zero3_trains_every_adapter_on_deepspeeds_cpu_accelerator(tmp_path, tiny_dir):
    """ZeRO-3 (whole-layer fetch) with padding-free batches filled to a token budget; transformers' packed mask
    stands in for the GPU kernel on the CPU."""
    run, train = zero3_on_cpu(tmp_path, tiny_dir, "train.padding_free=true")
    plan = {"attn_implementation": "sdpa", "token_budget": 1024, "metrics_sync": "log"}
    res = train(4, plan_changes=plan)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    assert "wrapped in DeepSpeedEngine" in log and "token budget 1024" in log
    assert untrained_adapters(run / "final") == []
    assert all(m.get("padding_share", 0) == 0 for m in read_metrics(run))


def test_packed_rows_with_boundaries_skip_transformers_mask_building(tiny_dir):
    """The GPU path's kernel reads the boundaries; transformers must not build a mask or search position_ids for
    packed rows (a read back from the GPU at every forward). What it hands the attention function is checked
    here on the CPU, with transformers' own mask code."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    padding_free.register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation=padding_free.VARLEN_ATTENTION)
    flat = padding_free.flatten_preference_batch({"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])})
    embeds = torch.zeros(1, 7, model.config.hidden_size)
    kwargs = dict(config=model.config, inputs_embeds=embeds, past_key_values=None, position_ids=flat["position_ids"])
    assert create_causal_mask(attention_mask=None, **kwargs) is None  # packed_varlen's own mask function: none
    assert create_causal_mask(attention_mask=padding_free.BOUNDARIES_ONLY, **kwargs) is padding_free.BOUNDARIES_ONLY
    seen = []
    model.forward = lambda *a, **kw: seen.append(kw.get("attention_mask"))
    padding_free.attend_by_boundaries(model)
    model(input_ids=torch.zeros(1, 7, dtype=torch.long), cu_seq_lens_q=flat["cu_seq_lens_q"])
    model(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4))  # a padded batch: as given
    assert seen[0] is padding_free.BOUNDARIES_ONLY and seen[1].shape == (2, 4)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa")
    forward = sdpa.forward
    padding_free.attend_by_boundaries(sdpa)  # SDPA needs transformers' block mask: left alone
    assert sdpa.forward == forward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch's flash-attention kernel)")
def test_the_packed_varlen_kernel_matches_sdpa_on_padded_rows(tiny_dir):
    """The GPU path: `packed_varlen` over one packed row against SDPA over the padded rows, forward and backward,
    with grouped key-value heads (the tiny model has 4 query heads and 2 key-value heads)."""
    from transformers import AutoModelForCausalLM

    padding_free.register_varlen_attention()
    torch.manual_seed(0)
    lengths = [37, 200, 5, 128]
    ids = [torch.randint(10, 2000, (n,)) for n in lengths]
    padded_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True).cuda()
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long().cuda()
    flat = padding_free.flatten_preference_batch({"attention_mask": mask.cpu()})
    results = []
    for attention in ("sdpa", padding_free.VARLEN_ATTENTION):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.bfloat16,
                                                     attn_implementation=attention).cuda()
        if attention == "sdpa":
            out = model(input_ids=padded_ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        else:
            padding_free.attend_by_boundaries(model)  # as launcher.train does: no mask, no search for packed rows
            kwargs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in flat.items() if k != "pf_index"}
            out = model(input_ids=padded_ids[mask.bool()].unsqueeze(0), use_cache=False, **kwargs).logits[0]
        out.float().pow(2).mean().backward()
        results.append((out.float(), model.model.layers[0].self_attn.k_proj.weight.grad.float()))
    (logits_a, grad_a), (logits_b, grad_b) = results
    assert (logits_a - logits_b).abs().max() < 0.05 * logits_a.abs().max()
    assert torch.nn.functional.cosine_similarity(grad_a.flatten(), grad_b.flatten(), dim=0) > 0.999
