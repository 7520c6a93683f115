"""Assets for GPU measurements: a random-init model of a preset's shape (conf/model/<preset>.yaml), a
word-level tokenizer (one token per word), and a synthetic preference set with a learnable signal (chosen
answers use the first half of the word list, rejected ones the second) with the same rows as prompt/completion
pairs for SFT.

Two length mixes:
- uniform: every prompt 200 words and every answer 150, the plain-TRL peer's job (../shared/peer/make_assets.py);
- realistic: prompt and answer lengths drawn from long-tailed lognormal distributions, prompts with a median of
  100 tokens and answers of 300, chosen and rejected drawn apart, from 1 to 6000 tokens
  (docs/benchmarks.md says what they are modelled on).

The model is written a layer at a time by launcher/random_checkpoint.py, in bf16 or (`weights=nf4`)
pre-quantized to 4 bits: Llama-3.1-70B's shape takes 40 GB that way.

    python -m launcher.bench_assets OUT qwen2.5-1.5b-instruct [uniform|realistic] [rows] [bf16|nf4]
"""
import json
import math
import random
import sys
from pathlib import Path

import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from launcher import random_checkpoint
from launcher.resources import shipped
from launcher.tiny import CHAT_TEMPLATE, SPECIAL

# (median tokens, sigma of the log) of the realistic mix; the cap keeps a rare draw from dominating the file
REALISTIC_PROMPT = (100, 1.0)
REALISTIC_ANSWER = (300, 0.8)
REALISTIC_CAP = 6000
ROWS = {"uniform": 2000, "realistic": 4000}


def lengths(mix: str, rng: random.Random) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) words of one row."""
    if mix == "uniform":
        return 200, 150, 150

    def draw(median: int, sigma: float) -> int:
        return max(1, min(REALISTIC_CAP, round(math.exp(rng.gauss(math.log(median), sigma)))))

    return draw(*REALISTIC_PROMPT), draw(*REALISTIC_ANSWER), draw(*REALISTIC_ANSWER)


def build(out: str, preset: str, mix: str = "uniform", rows: int | None = None, weights: str = "bf16") -> None:
    out_dir = Path(out)
    if (out_dir / "DONE").exists():
        return
    if mix not in ROWS:
        raise SystemExit(f"mix {mix!r}: give uniform or realistic")
    rows = rows or ROWS[mix]
    shape = yaml.safe_load((shipped("conf") / "model" / f"{preset}.yaml").read_text())["shape"]
    specials = [*SPECIAL, "<unk>", "user", "assistant", "system"]
    words = [f"w{i}" for i in range(min(8000, shape["vocab_size"] - len(specials)))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir / "tokenizer")  # its own folder (transformers 5 reads a model's folder by type)
    config = random_checkpoint.model_config(shape, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    took = random_checkpoint.write(config, out_dir / "model", quant="4bit" if weights == "nf4" else "none")
    rng = random.Random(0)
    good, bad = words[:len(words) // 2], words[len(words) // 2:]
    with open(out_dir / "pref.jsonl", "w") as pref, open(out_dir / "sft.jsonl", "w") as sft:
        for _ in range(rows):
            n_prompt, n_chosen, n_rejected = lengths(mix, rng)
            prompt = " ".join(rng.choice(words) for _ in range(n_prompt))
            chosen = " ".join(rng.choice(good) for _ in range(n_chosen))
            rejected = " ".join(rng.choice(bad) for _ in range(n_rejected))
            pref.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            sft.write(json.dumps({"prompt": prompt, "completion": chosen}) + "\n")
    (out_dir / "DONE").write_text(f"{preset} {mix} {rows} {weights}\n")
    print(f"assets in {out_dir}: {preset} ({weights}, {took['bytes'] / 2**30:.1f} GiB written in {took['seconds']} s, "
          f"host memory peak {took['host_peak_gib']} GiB), {rows} rows ({mix})", flush=True)


if __name__ == "__main__":
    a = sys.argv[1:] + [None] * 5  # out, preset, mix, rows ("-": the mix's own), weights
    build(a[0], a[1], a[2] or "uniform", int(a[3]) if a[3] not in (None, "-") else None, a[4] or "bf16")
