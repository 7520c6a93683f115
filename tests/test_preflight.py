"""The preflight's resume check (launcher/preflight.py) on checkpoints as the engines write them."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import GPU_NODE, compose_cfg
from launcher import preflight
from launcher.plan import build_plan


# A checkpoint's model part as the Trainer writes it under FSDP with SHARDED_STATE_DICT: accelerate's
# save_fsdp_model, shards and no adapter_config.json. One CPU process: FSDP2's code path, the one that needs no
# wrapped module (FSDP1 writes the same folder and names). A child process: accelerate's state stays out of pytest.
WRITE_FSDP_CHECKPOINT = """
import sys
from accelerate import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model_dir, ckpt, r = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(model_dir)
if r:
    model = get_peft_model(model, LoraConfig(r=r, target_modules="all-linear"))
plugin = FullyShardedDataParallelPlugin(state_dict_type="SHARDED_STATE_DICT", fsdp_version=2)
save_fsdp_model(plugin, PartialState(cpu=True), model, ckpt, adapter_only=bool(r))
"""


def fsdp_checkpoint(ckpt, tiny_dir, r):
    subprocess.run([sys.executable, "-c", WRITE_FSDP_CHECKPOINT, str(tiny_dir / "model"), str(ckpt), str(r or 0)],
                   check=True, capture_output=True, timeout=300)
    assert (ckpt / preflight.FSDP_SHARDS).is_dir() and not (ckpt / "adapter_config.json").exists()
    return ckpt


def run_config(*overrides):
    """The config.yaml a run's ranks read (it carries the plan)."""
    return yaml.safe_load(build_plan(compose_cfg(*overrides), GPU_NODE).files["config.yaml"])


@pytest.fixture(scope="module")
def fsdp_lora16(tmp_path_factory, tiny_dir):
    return fsdp_checkpoint(tmp_path_factory.mktemp("fsdp") / "checkpoint-10", tiny_dir, r=16)


def test_an_fsdp_checkpoint_of_the_same_adapter_resumes(fsdp_lora16):
    assert preflight.saved_adapter(fsdp_lora16) == {"r": 16}
    assert preflight.checkpoint_mismatch(run_config("lora.r=16"), fsdp_lora16) is None


def test_an_fsdp_checkpoint_of_another_adapter_shape_or_kind_is_refused(fsdp_lora16, tmp_path, tiny_dir):
    assert preflight.checkpoint_mismatch(run_config("lora.r=8"), fsdp_lora16) == "LoRA r=16 there, lora.r=8 here"
    assert "this config trains every weight" in preflight.checkpoint_mismatch(run_config("lora=none"), fsdp_lora16)
    full = fsdp_checkpoint(tmp_path / "checkpoint-4", tiny_dir, r=None)
    assert preflight.saved_adapter(full) is None
    assert preflight.checkpoint_mismatch(run_config("lora=none"), full) is None
    assert "holds no LoRA adapter" in preflight.checkpoint_mismatch(run_config("lora.r=16"), full)


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
