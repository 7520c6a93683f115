"""launcher/random_checkpoint.py: random-weight checkpoints written a layer at a time, 16-bit or pre-quantized
to 4 bits; the pre-quantized one loads through transformers' own path and equals quantizing on load."""
import json

import pytest
import torch

from conftest import GPU_NODE, compose_cfg
from launcher import random_checkpoint
from launcher.errors import ConfigError
from launcher.plan import build_plan

LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, rope_theta=500000.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-ckpt")
    took = {}
    for name, quant, storage in (("bf16", "none", "bfloat16"), ("nf4", "4bit", "bfloat16"), ("nf4-u8", "4bit", "uint8")):
        took[name] = random_checkpoint.write(random_checkpoint.model_config(LLAMA), root / name, quant, storage,
                                             device="cpu")
    return root, took


def test_layer_by_layer_shards_and_the_quantized_layout(checkpoints):
    root, took = checkpoints
    index = json.loads((root / "nf4" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 1 + 3 + 1  # the embedding, a shard per decoder layer, the norm and lm_head
    wm = index["weight_map"]
    assert wm["model.layers.1.mlp.up_proj.weight"] == wm["model.layers.1.mlp.up_proj.weight.absmax"] == files[2]
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in wm
    assert "lm_head.weight.absmax" not in wm  # the output embedding stays 16-bit
    config = json.loads((root / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_storage"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    layer = lambda name: (root / name / files[2]).stat().st_size  # noqa: E731  (same file names in both)
    assert 0.25 < layer("nf4") / layer("bf16") < 0.35  # 4 bits, their scales and headers against 16 bits
    assert took["nf4"]["bytes"] < took["bf16"]["bytes"]


def test_the_pre_quantized_checkpoint_loads_as_quantizing_on_load_gives(checkpoints):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root, _ = checkpoints
    ids = torch.randint(0, 512, (2, 16))
    logits = {}
    for name in ("nf4", "nf4-u8"):
        model, info = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.bfloat16, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert isinstance(model.model.layers[2].mlp.down_proj, bnb.nn.Linear4bit)
        with torch.no_grad():
            logits[name] = model(ids).logits
    on_load = AutoModelForCausalLM.from_pretrained(
        root / "bf16", dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16))
    with torch.no_grad():
        reference = on_load(ids).logits
    assert torch.equal(logits["nf4"], reference) and torch.equal(logits["nf4-u8"], reference)
    assert reference.abs().max() > 0


def test_the_plan_takes_the_checkpoint_as_it_was_saved(checkpoints):
    root, _ = checkpoints
    base = ("model=llama-3.1-70b-instruct", f"model.path={root / 'nf4'}", f"model.tokenizer={root}", "gpus=2",
            "micro_batch=1")
    plan = build_plan(compose_cfg(*base, "quant=4bit", "strategy=fsdp_qlora"), GPU_NODE)
    assert any("4-bit weights stored as bfloat16, loaded as they are" in d for d in plan.decisions)
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg(*base, "quant=none", "strategy=zero3"), GPU_NODE)
    assert info.value.key == "quant" and "give quant=4bit" in str(info.value)
    uint8 = (*base[:1], f"model.path={root / 'nf4-u8'}", *base[2:], "quant=4bit")
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg(*uint8, "strategy=fsdp_qlora"), GPU_NODE)
    assert info.value.key == "quant.storage_dtype" and "stores its 4-bit weights as uint8" in str(info.value)
    assert build_plan(compose_cfg(*uint8, "strategy=ddp"), GPU_NODE).settings["quant_storage_dtype"] == "uint8"
    assert build_plan(compose_cfg(*uint8, "strategy=auto"), GPU_NODE).strategy in ("ddp", "zero2")  # unshardable
    with pytest.raises(ConfigError, match="merge=true merges the adapter into the 16-bit base"):
        build_plan(compose_cfg(*base, "quant=4bit", "strategy=fsdp_qlora", "merge=true"), GPU_NODE)
