"""Builds the embedded `tiny` model: a small Qwen2-shaped model with random weights and a byte-level
BPE tokenizer trained on the shipped demo data, so the default run needs no hub access.

    python -m launcher.tiny '<shape as JSON>' <dir>      # writes <dir>/model and <dir>/tokenizer (shape: conf/model/tiny.yaml)

The tokenizer lives in its own folder: in transformers 5 a tokenizer saved beside a model's
config.json is loaded as the model type's own class, ignoring tokenizer.json.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from launcher.resources import PACKAGE

# A ChatML template, as Qwen2.5-Instruct uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [str(p) for p in sorted((PACKAGE / "assets").glob("*.jsonl"))]
    tok.train(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(shape: dict, out_dir: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # then renamed: concurrent builds are safe
    tok = build_tokenizer(shape["vocab_size"])
    tok.save_pretrained(tmp / "tokenizer")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", bos_token_id=None, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **shape)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp / "model")
    try:
        os.rename(tmp, out)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    build(json.loads(sys.argv[1]), sys.argv[2])
