"""Assets for GPU measurements: a random-init model of a preset's shape (conf/model/<preset>.yaml), a
word-level tokenizer, a synthetic preference set with a learnable signal (chosen answers use the first
half of the word list, rejected ones the second) and the same rows as prompt/completion pairs for SFT,
like the plain-TRL peer's job (../shared/peer/make_assets.py).

    python -m launcher.bench_assets OUT qwen2.5-1.5b-instruct [rows] [prompt_words] [answer_words]
"""
import json
import random
import sys
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from launcher import ROOT
from launcher.tiny import CHAT_TEMPLATE, SPECIAL


def build(out: str, preset: str, rows: int = 2000, prompt_words: int = 200, answer_words: int = 150) -> None:
    out_dir = Path(out)
    if (out_dir / "DONE").exists():
        return
    shape = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())["shape"]
    specials = [*SPECIAL, "<unk>", "user", "assistant", "system"]
    words = [f"w{i}" for i in range(min(8000, shape["vocab_size"] - len(specials)))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir / "tokenizer")  # its own folder (transformers 5 reads a model's folder by type)
    cfg = AutoConfig.for_model("qwen2", **{"max_position_embeddings": 4096, "rope_theta": 1e6, **shape})
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out_dir / "model")
    rng = random.Random(0)
    with open(out_dir / "pref.jsonl", "w") as pref, open(out_dir / "sft.jsonl", "w") as sft:
        for _ in range(rows):
            prompt = " ".join(rng.choice(words) for _ in range(prompt_words))
            chosen = " ".join(rng.choice(words[:len(words) // 2]) for _ in range(answer_words))
            rejected = " ".join(rng.choice(words[len(words) // 2:]) for _ in range(answer_words))
            pref.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            sft.write(json.dumps({"prompt": prompt, "completion": chosen}) + "\n")
    (out_dir / "DONE").write_text(f"{preset} {rows}\n")
    print(f"assets in {out_dir}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {rows} rows")


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
