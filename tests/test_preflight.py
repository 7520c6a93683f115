"""The preflight's resume check (launcher/preflight.py) on checkpoints as the engines write them."""
import json

import torch
import yaml
from safetensors.torch import save_file

from conftest import GPU_NODE, compose_cfg
from launcher import preflight
from launcher.plan import build_plan


def run_config(*overrides):
    """The config.yaml a run's ranks read (it carries the plan)."""
    return yaml.safe_load(build_plan(compose_cfg(*overrides), GPU_NODE).files["config.yaml"])


def checkpoint(path, r=None):
    """A checkpoint folder; with r, the adapter_config.json that PEFT (or the launcher, under FSDP) writes there."""
    path.mkdir(parents=True)
    if r:
        (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def test_a_checkpoint_of_the_same_adapter_resumes(tmp_path):
    assert preflight.checkpoint_mismatch(run_config("lora.r=16"), checkpoint(tmp_path / "c", r=16)) is None


def test_a_checkpoint_of_another_adapter_shape_or_kind_is_refused(tmp_path):
    lora16, full = checkpoint(tmp_path / "lora16", r=16), checkpoint(tmp_path / "full")
    assert preflight.checkpoint_mismatch(run_config("lora.r=8"), lora16) == "LoRA r=16 there, lora.r=8 here"
    assert "this config trains every weight" in preflight.checkpoint_mismatch(run_config("lora=none"), lora16)
    assert preflight.checkpoint_mismatch(run_config("lora=none"), full) is None
    assert "holds no LoRA adapter" in preflight.checkpoint_mismatch(run_config("lora.r=16"), full)


def test_an_fsdp_resume_needs_the_adapter_weights_in_the_checkpoint(tmp_path):
    fsdp = run_config("strategy=fsdp_qlora", "quant=4bit", "lora.r=16")
    ckpt = checkpoint(tmp_path / "c", r=16)  # what sharded FSDP checkpoints hold: config, no weights
    assert "adapter_model.safetensors, which a resume under FSDP loads, is missing" in preflight.checkpoint_mismatch(
        fsdp, ckpt)
    save_file({}, str(ckpt / "adapter_model.safetensors"))  # what PEFT 0.21 saved under FSDP1 without the fix
    assert "holds no tensors" in preflight.checkpoint_mismatch(fsdp, ckpt)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(16, 8)}, str(ckpt / "adapter_model.safetensors"))
    assert preflight.checkpoint_mismatch(fsdp, ckpt) is None


def test_a_peft_checkpoint_names_its_base_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "base_model_name_or_path": "/x/other"}))
    why = preflight.checkpoint_mismatch(run_config("lora.r=16"), tmp_path)
    assert why.startswith("base model /x/other there, ") and why.endswith(" here")


def test_a_misspelt_deepspeed_setting_is_named_before_the_ranks_start():
    typo = run_config("strategy=zero3", "+strategy.deepspeed.zero_optimization.stage3_prefetch_bucket=1")
    assert preflight.deepspeed_settings_error(typo) == (
        "strategy.deepspeed.zero_optimization.stage3_prefetch_bucket: Extra inputs are not permitted")
    bad_value = run_config("strategy=zero2", "+strategy.deepspeed.zero_optimization.overlap_comm=often")
    assert "zero_optimization.overlap_comm" in preflight.deepspeed_settings_error(bad_value)
    fine = run_config("strategy=zero3", "+strategy.deepspeed.zero_optimization.stage3_prefetch_bucket_size=1")
    assert preflight.deepspeed_settings_error(fine) is None


def test_train_optim_auto_is_fused_adamw_where_the_optimizer_steps_on_the_gpu():
    assert run_config("strategy=ddp")["plan"]["optim"] == "adamw_torch_fused"
    assert run_config("strategy=zero3")["plan"]["optim"] == "adamw_torch_fused"
    assert run_config("strategy=zero3_offload")["plan"]["optim"] == "adamw_torch"  # it steps on the CPU
    assert run_config("strategy=ddp", "train.optim=adafactor")["plan"]["optim"] == "adafactor"


def test_a_misspelt_optimizer_is_named_before_the_ranks_start():
    assert preflight.optimizer_error(run_config("strategy=ddp")) is None
    why = preflight.optimizer_error(run_config("strategy=ddp", "train.optim=adamw_fused"))
    assert why.startswith("train.optim=adamw_fused: not an optimizer transformers knows. Give auto, or one of: ")
    assert "adamw_torch_fused" in why


def test_a_build_lock_left_by_a_stopped_run_is_named_before_deepspeeds_ranks_hang_on_it(tmp_path):
    """torch's extension lock is a bare file: a run stopped while DeepSpeed built an op leaves it, and the next
    build waits forever. An old one is named with what to do; a fresh one may be a build running now."""
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    mtime = lock.stat().st_mtime
    zero3 = run_config("strategy=zero3")
    assert preflight.stale_build_lock_error(zero3, tmp_path, now=mtime + 60) is None  # a build under way
    why = preflight.stale_build_lock_error(zero3, tmp_path, now=mtime + 3600)
    assert why.startswith(f"{lock} is 60 min old: a run stopped while torch built DeepSpeed's deepspeed_shm_comm op")
    assert why.endswith(f"If no build is running, delete it (rm {lock}) and launch again")
    assert preflight.stale_build_lock_error(run_config("strategy=ddp"), tmp_path, now=mtime + 3600) is None
    flat = tmp_path / "given" / "fused_adam" / "lock"  # TORCH_EXTENSIONS_DIR holds the ops' folders directly
    flat.parent.mkdir(parents=True)
    flat.touch()
    assert preflight.stale_build_lock_error(zero3, tmp_path / "given", now=flat.stat().st_mtime + 3600).startswith(
        f"{flat} is 60 min old")


def test_lora_targets_that_name_no_layer_of_the_model_are_named_before_the_ranks_start(tmp_path):
    """Phi-3 fuses q, k and v into qkv_proj: a Llama-style list would train o_proj alone, silently (PEFT adapts
    what matches). Only config.json is needed: the model is built on the meta device."""
    from transformers import AutoConfig

    AutoConfig.for_model("phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, pad_token_id=0).save_pretrained(tmp_path)
    why = preflight.lora_targets_error(run_config(f"model.path={tmp_path}", "lora=r8_attn"))
    assert why == (f"lora.target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']: q_proj, k_proj, v_proj name no "
                   f"layer of {tmp_path} (phi3), so LoRA would leave them out. Its linear layers: down_proj, "
                   "gate_up_proj, o_proj, qkv_proj. Give names from these, or lora.target_modules=all-linear.")
    assert preflight.lora_targets_error(run_config(f"model.path={tmp_path}", "lora.target_modules=[qkv_proj]")) is None
    assert preflight.lora_targets_error(run_config(f"model.path={tmp_path}")) is None  # all-linear


def test_a_single_target_name_is_a_regular_expression_that_must_match_and_a_misspelt_scheduler_is_named(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, pad_token_id=0).save_pretrained(tmp_path)
    why = preflight.lora_targets_error(run_config(f"model.path={tmp_path}", "lora.target_modules=qkv_proj"))
    assert why.startswith("lora.target_modules=qkv_proj: PEFT reads a single name as a regular expression")
    assert "Give a list, e.g. lora.target_modules=[down_proj]" in why
    assert preflight.lora_targets_error(run_config(f"model.path={tmp_path}",
                                                   r"lora.target_modules='.*\.qkv_proj'")) is None
    assert preflight.scheduler_error(run_config("train.lr_scheduler=cosin")).startswith(
        "train.lr_scheduler=cosin: not a scheduler transformers knows. Give one of: linear, cosine")
    assert preflight.scheduler_error(run_config()) is None


def test_a_chat_template_jinja_cannot_parse_is_named_with_its_line():
    class Tokenizer:
        chat_template = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"

    why = preflight.chat_template_error(Tokenizer(), run_config("model.chat_template=x"))
    assert why.startswith("model.chat_template: line 2 of the template:")
    assert preflight.chat_template_error(Tokenizer(), run_config()) is None  # the tokenizer's own: not ours to judge


def test_a_model_folder_whose_files_were_cut_short_is_named_before_the_ranks_load_it(tmp_path):
    """A download or copy broken off: the ranks loaded for a while and failed in the loader, naming no file."""
    import pytest

    from launcher import validate
    from launcher.errors import ConfigError

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    cfg = {"model": {"path": str(tmp_path)}, "plan": {"model_path": str(tmp_path)}}
    # files transformers does not load (an OpenVINO export) and torch.save's legacy pickles are not refused
    (tmp_path / "openvino_model.bin").write_bytes(b"\x00OpenVINO weights")
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert preflight.model_files_error(cfg) is None
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:1000])
    assert preflight.model_files_error(cfg).startswith(f"model.path={tmp_path}: model.safetensors cannot be read (")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidd')
    with pytest.raises(ConfigError, match=r"config.json is not JSON \(.*cut short\?\): copy the model's config.json"):
        validate.prequantized(str(tmp_path))
