"""Model helpers (launcher/modeling.py) on the embedded tiny model."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from launcher import modeling


def lora_model(tiny_dir):
    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"),
                          LoraConfig(r=4, target_modules="all-linear"))


def test_restore_adapter_brings_back_the_checkpointed_weights(tmp_path, tiny_dir):
    trained = lora_model(tiny_dir)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)  # lora_B starts at zero: a restored adapter differs from a fresh one
    trained.save_pretrained(tmp_path / "checkpoint-5")
    fresh = lora_model(tiny_dir)
    modeling.restore_adapter(fresh, str(tmp_path / "checkpoint-5"))
    want = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    got = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_restore_adapter_says_which_file_is_missing(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint-5/adapter_model.safetensors"):
        modeling.restore_adapter(lora_model(tiny_dir), str(tmp_path / "checkpoint-5"))
