"""Sample answers at the end of training: for a few held-out prompts, the tuned model's greedy answer beside the
base model's, with the tokenizer's chat template, into <run_dir>/samples.json (read by launcher/report.py).

The base comes without a second load: with LoRA it is the same model under PEFT's `disable_adapter()`. A full
fine-tune has tuned answers only (`python -m launcher generate <run_dir>
--base` loads the base). Where the weights live decides who generates:
- DDP, ZeRO-2, one process: whole weights on every rank, so rank 0 alone generates on the unwrapped model;
- ZeRO-3: each rank holds a shard, gathered layer by layer in the forward hooks, so every rank generates the same
  prompts with `synced_gpus=True` (a rank whose answer ended keeps joining the others' gathers);
- FSDP: generating would mean gathering the whole model into every rank (`summon_full_params`), which a model that
  needed sharding may not fit: skipped, with the reason in samples.json and the report.
It runs last, once the weights, the summary and a merge are written. A failure is logged and the run still
succeeds, except under ZeRO-3, where the other ranks would wait for the failed one inside generate: there it fails
the job (everything else was written already) rather than hang it.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
from pathlib import Path

log = logging.getLogger("launcher")

SAMPLES_FILE = "samples.json"


def prompt_of(row: dict):
    """The prompt of a held-out row as the data gave it (a list of messages or a string); None for plain text."""
    if row.get("prompt"):
        return row["prompt"]
    conversation = row.get("messages") or row.get("chosen")
    if isinstance(conversation, list):  # up to the last assistant turn: what the model is asked to continue
        last = max((i for i, m in enumerate(conversation) if m.get("role") == "assistant"), default=0)
        return conversation[:last] or None
    return None


def reference_of(row: dict) -> str | None:
    """The answer the data holds for the prompt (a pair's chosen, SFT's completion, KTO's completion labelled
    desirable), to read the samples against."""
    if row.get("label") is False:
        return None  # an undesirable answer is no reference
    for key in ("chosen", "completion", "messages"):
        value = row.get(key)
        if isinstance(value, list):
            answers = [m["content"] for m in value if m.get("role") == "assistant"]
            return answers[-1] if answers else None
        if isinstance(value, str):
            return value
    return None


def prompt_ids(tokenizer, prompt) -> tuple[list[int], str]:
    """(token ids, the text they spell) of a prompt as the model saw prompts in training: through the chat template
    where the tokenizer has one, a string prompt as one user turn."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], text
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tokenizer(text)["input_ids"], text


def answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, synced_gpus: bool = False) -> list[str]:
    """Greedy answers to tokenized prompts, in one batch padded on the left (where the answers go on): under ZeRO-3
    each generated token gathers every layer once for the whole batch. The cache is asked for explicitly:
    training turns it off in the model's config."""
    import torch

    device, width = next(model.parameters()).device, max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         use_cache=True, synced_gpus=synced_gpus, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [_text(tokenizer, row[width:]) for row in out]


def _text(tokenizer, new_ids) -> str:
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    # an answer of whitespace or special tokens only (an untrained model's) is shown as Python writes it, not as ""
    return text or repr(tokenizer.decode(new_ids, skip_special_tokens=False))


@contextlib.contextmanager
def generating(model):
    """Eval mode (no dropout) and no gradients, restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def write_samples(trainer, cfg: dict, eval_ds, tokenizer) -> Path | None:
    """Every rank calls this (ZeRO-3 needs them all); rank 0 writes <run_dir>/samples.json. Returns its path on
    rank 0."""
    settings, plan = cfg.get("report") or {}, cfg["plan"]
    count, max_new_tokens = settings.get("samples", 3), settings.get("max_new_tokens", 48)
    path = Path(cfg["run_dir"], SAMPLES_FILE)
    rank0 = trainer.is_world_process_zero()
    if not count:
        return None
    result = {"max_new_tokens": max_new_tokens, "base": None, "note": "", "samples": []}
    if plan["fsdp_config"]:
        result["note"] = ("no samples at the end of training under FSDP (each rank holds a shard of the weights); "
                          f"run `python -m launcher generate {cfg['run_dir']} --base \"your prompt\"`")
    else:
        zero3 = plan["strategy"].startswith("zero3") and plan["world_size"] > 1
        if rank0 or zero3:
            try:
                result.update(_generate(trainer, cfg, eval_ds, tokenizer, count, max_new_tokens, zero3))
            except Exception as err:  # the answers are a look, not the run's result
                if zero3:  # the other ranks wait in generate's gathers: fail the job rather than hang it
                    raise
                log.warning("sample answers failed: %s: %s", type(err).__name__, err, exc_info=True)
                result["note"] = f"generating the sample answers failed: {type(err).__name__}: {err}"
    if rank0:
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        log.info("sample answers: %s (%d prompts%s)", path, len(result["samples"]),
                 ", " + result["note"] if result["note"] else "")
        return path
    return None


def _generate(trainer, cfg, eval_ds, tokenizer, count, max_new_tokens, synced_gpus) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    has_base = cfg["lora"]["r"] is not None and hasattr(model, "disable_adapter")
    rows = list(itertools.islice((row for row in eval_ds if prompt_of(row) is not None), count))
    prompts = [prompt_of(row) for row in rows]
    if not prompts:
        return {"note": "no held-out row has a prompt (plain-text data)"}
    tokenized = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    ids = [i for i, _ in tokenized]
    with generating(model), trainer.accelerator.autocast():  # the dtypes training ran the adapters in
        tuned = answers(model, tokenizer, ids, max_new_tokens, synced_gpus)
        base = [None] * len(ids)
        if has_base:
            with model.disable_adapter():
                base = answers(model, tokenizer, ids, max_new_tokens, synced_gpus)
    samples = [{"prompt": prompt, "prompt_text": text, "reference": reference_of(row), "tuned": t, "base": b}
               for prompt, (_, text), row, t, b in zip(prompts, tokenized, rows, tuned, base)]
    note = "" if has_base else ("no base answers: without LoRA the base is not the trained model with its adapter "
                                f"off (`python -m launcher generate {cfg['run_dir']} --base \"your prompt\"` loads it)")
    return {"base": "the same model with its LoRA adapter disabled" if has_base else None, "note": note,
            "samples": samples}
