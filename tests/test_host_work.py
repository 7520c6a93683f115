"""launcher/host_work.py: each trim computes what the libraries' own path computes, and asks once."""
import importlib.metadata

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import lora_model_with_b
from launcher import host_work, modeling


def test_package_lookups_read_the_disk_once_per_package(monkeypatch):
    from accelerate.utils import imports, is_deepspeed_available, is_peft_available

    monkeypatch.setattr(imports, "_is_package_available", imports._is_package_available)  # undone after the test
    reads = []
    metadata = importlib.metadata.metadata
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: reads.append(name) or metadata(name))
    host_work.cache_package_lookups()
    host_work.cache_package_lookups()  # a second trim (another trainer in the process) wraps nothing twice
    assert [is_peft_available() for _ in range(3)] == [True] * 3 and is_deepspeed_available() == is_deepspeed_available()
    assert sorted(reads) == ["deepspeed", "peft"]


def test_flop_count_is_the_trainers_own_with_the_parameters_counted_once(tmp_path, tiny_dir):
    model = lora_model_with_b(tiny_dir, 0.0)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    batch = {"input_ids": torch.ones(4, 16, dtype=torch.long), "attention_mask": torch.ones(4, 16)}
    expected = trainer.floating_point_ops(batch)
    counted = []
    count = model.num_parameters
    model.num_parameters = lambda **kwargs: counted.append(kwargs) or count(**kwargs)
    host_work.count_parameters_once(trainer)
    assert [trainer.floating_point_ops(batch) for _ in range(3)] == [expected] * 3 and expected > 0
    assert counted == [{"exclude_embeddings": True}]
    assert trainer.floating_point_ops({"labels": batch["input_ids"]}) == 0  # no main input: no count, as before


def test_adapter_switched_off_by_flag_gives_the_reference_and_comes_back_as_it_was(tiny_dir):
    """DPO's reference pass (TRL calls the PeftModel's disable_adapter()): the base model's outputs, as PEFT's own
    switch gives them, also over the fused LoRA forward; afterwards the adapter runs again with its weights still
    trainable, also when the pass raised."""
    model = lora_model_with_b(tiny_dir, 0.05)
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert modeling.add_adapter_outputs_inside_the_matmul(model) == 7 * model.config.num_hidden_layers
    assert host_work.switch_adapters_off_by_flag(model) == 7 * model.config.num_hidden_layers
    assert not torch.allclose(adapted, reference)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, reference)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)
        with pytest.raises(RuntimeError), model.disable_adapter():
            raise RuntimeError("a failing reference pass")
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.get_model_status().enabled is True and model._adapters_disabled is False
