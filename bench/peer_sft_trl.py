"""The plain-TRL SFT recipe beside which `python -m launcher.bench` measures the launcher's SFT: the seeds'
recipe (TRL SFTTrainer + PEFT LoRA r16 all-linear, batch 4 per GPU, gradient checkpointing), written the
way ../shared/peer/dpo_trl.py writes the DPO one. Env: ASSETS, BS, GC, STEPS, MAXLEN.

    accelerate launch --config_file <peer>/acc_ddp.yaml --num_processes 2 bench/peer_sft_trl.py
"""
import json
import os
import statistics
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

assets = os.environ["ASSETS"]
local_rank = int(os.environ.get("LOCAL_RANK", 0))
model = AutoModelForCausalLM.from_pretrained(f"{assets}/model", dtype=torch.bfloat16, device_map={"": local_rank})
tok = AutoTokenizer.from_pretrained(f"{assets}/tokenizer")
ds = load_dataset("json", data_files=f"{assets}/sft.jsonl", split="train")


class Clock(TrainerCallback):
    """Step times and tokens seen (all ranks), synchronized with the GPU."""

    def __init__(self):
        self.rows, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.rows.append((time.perf_counter() - self.start[0], state.num_input_tokens_seen - self.start[1]))


clock = Clock()
bs = int(os.environ.get("BS", 4))
args = SFTConfig(output_dir="/tmp/out_peer_sft", per_device_train_batch_size=bs, max_steps=int(os.environ.get("STEPS", 30)),
                 logging_steps=5, save_strategy="no", report_to="none", learning_rate=5e-5, bf16=True,
                 max_length=int(os.environ.get("MAXLEN", 1024)), gradient_checkpointing=os.environ.get("GC", "1") == "1",
                 gradient_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
                 include_num_input_tokens_seen="non_padding")
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft, callbacks=[clock])
trainer.train()
steady = clock.rows[5:] or clock.rows
world = int(os.environ.get("WORLD_SIZE", 1))
step_s = statistics.median(t for t, _ in steady)
tokens_per_s = sum(n for _, n in steady) / sum(t for t, _ in steady) / world
res = dict(method="sft", world=world, bs=bs, median_step_s=step_s, tokens_per_s_per_gpu=tokens_per_s,
           peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
           last_log=[h for h in trainer.state.log_history if "loss" in h][-1:])
print("RESULT rank", os.environ.get("RANK", 0), json.dumps(res))
