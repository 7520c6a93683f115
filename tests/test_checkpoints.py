"""The complete-checkpoint marker (launcher/checkpoints.py) as the Trainer calls it at each save."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainerState, TrainingArguments

from launcher import checkpoints, preflight


def test_a_checkpoint_without_adapter_config_gets_one_beside_its_marker(tmp_path, tiny_dir):
    # as under FSDP with sharded checkpoints: the Trainer wrote only shards, no adapter_config.json
    ckpt = tmp_path / "checkpoints" / "checkpoint-3"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ckpt / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")  # (a checkpoint of nothing is skipped)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"),
                           LoraConfig(r=8, target_modules="all-linear"))
    checkpoints.complete_marker_callback().on_save(
        TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[]), TrainerState(global_step=3),
        None, model=model)
    assert checkpoints.is_complete(ckpt)
    assert preflight.saved_adapter(ckpt)["r"] == 8
    assert checkpoints.find_resume(str(tmp_path), "auto") == str(ckpt)


def test_a_full_fine_tune_checkpoint_gets_no_adapter_config(tmp_path, tiny_dir):
    ckpt = tmp_path / "checkpoints" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    checkpoints.complete_marker_callback().on_save(
        TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[]), TrainerState(global_step=1),
        None, model=AutoModelForCausalLM.from_pretrained(tiny_dir / "model"))
    assert checkpoints.is_complete(ckpt) and preflight.saved_adapter(ckpt) is None


def test_a_checkpoint_whose_adapter_came_out_empty_stops_the_run_unmarked(tmp_path, tiny_dir):
    ckpt = tmp_path / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    save_file({}, str(ckpt / "adapter_model.safetensors"))  # what PEFT 0.21 wrote under FSDP1
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"),
                           LoraConfig(r=8, target_modules="all-linear"))
    marker = checkpoints.complete_marker_callback()
    args, state = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[]), TrainerState(global_step=4)
    with pytest.raises(RuntimeError, match="checkpoint-4/adapter_model.safetensors was saved with no tensors"):
        marker.on_save(args, state, None, model=model)
    assert not checkpoints.is_complete(ckpt)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 4)}, str(ckpt / "adapter_model.safetensors"))
    marker.on_save(args, state, None, model=model)
    assert checkpoints.is_complete(ckpt)


def test_nothing_is_left_to_train_from_a_checkpoint_at_max_steps_or_past_it():
    from launcher.checkpoints import nothing_left

    assert "is at step 30 and train.max_steps=30: nothing is left" in nothing_left("/r/checkpoints/checkpoint-30", 30)
    assert "give train.max_steps above 40" in nothing_left("/r/checkpoints/checkpoint-40", 30)
    assert nothing_left("/r/checkpoints/checkpoint-20", 30) is None
    assert nothing_left("/r/checkpoints/checkpoint-20", -1) is None  # a run counted in epochs: the Trainer decides


@pytest.mark.parametrize("broken", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "all"])
def test_resume_auto_passes_over_a_complete_checkpoint_whose_files_are_cut_short(tmp_path, broken):
    """A full disk or a broken-off copy leaves a checkpoint marked complete whose files cannot be loaded: the ranks
    failed in the libraries' loaders without naming the file. The newest readable one is taken instead."""
    from launcher.checkpoints import MARKER, find_resume, unreadable

    for step in (2, 4):
        ckpt = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_file({"lora_A": torch.ones(4, 4)}, ckpt / "adapter_model.safetensors")
        torch.save({"state": {0: torch.zeros(64)}}, ckpt / "optimizer.pt")
        TrainerState(global_step=step).save_to_json(str(ckpt / "trainer_state.json"))
        (ckpt / MARKER).write_text("")
    newest = tmp_path / "checkpoints" / "checkpoint-4"
    assert unreadable(newest) is None and find_resume(str(tmp_path), "auto") == str(newest)
    if broken == "all":  # only the marker left
        for f in newest.iterdir():
            if f.name != MARKER:
                f.unlink()
    else:
        data = (newest / broken).read_bytes()
        (newest / broken).write_bytes(data[: len(data) // 2])
    why = unreadable(newest)
    assert why and (broken in why if broken != "all" else "holds nothing but its COMPLETE marker" in why), why
    assert find_resume(str(tmp_path), "auto") == str(tmp_path / "checkpoints" / "checkpoint-2")
