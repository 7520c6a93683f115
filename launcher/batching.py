"""How rows become micro-batches: padding-free or padded, filled to a token budget or counted in rows, grouped by
length or not. Pure: the config (micro-batch already sized) and where it runs in; the settings launcher.train
carries out and the decisions, each with its reason, out. The ranks do it in launcher/padding_free.py (the
model sees real tokens only) and launcher/samplers.py (which rows go into which micro-batch).
"""
from __future__ import annotations

from launcher.errors import ConfigError
from launcher.model_shape import attention_softcap

VARLEN_ATTENTION = "packed_varlen"  # launcher/padding_free.py registers it (a name with "flash" in it would
# send transformers looking for a flash-attn package)


def _switch(cfg, key: str) -> bool | str:
    value = cfg["train"].get(key, "auto")
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"train.{key}", f"train.{key}={value!r}: give true, false or auto.")
    return value


# The methods whose batches launcher/padding_free.py knows (DPO's concatenated pairs, SFT's packed rows); KTO, ORPO
# and SimPO build their batches in code of their own and run padded rows, grouped by length by none of ours.
UNPADDED_METHODS = ("dpo", "sft")

# Where train.padding_free=auto turns it on: the strategies it was measured under on GPUs (docs/benchmarks.md,
# 2026-11-30: ddp, realistic length mix, DPO 3.1x and SFT 5.5x the padded batches' real tokens/s). The others run
# it with train.padding_free=true; the GPU tests (tests/test_gpu.py) hold a case for each, not yet run.
MEASURED_UNDER = ("ddp",)


def padding_free(cfg, on_gpu: bool) -> tuple[bool, str]:
    """auto: on GPUs under the strategies where it was measured, off on the CPU (each forward's block mask there
    costs more than the padding it saves on short rows). SFT is padding-free through TRL's packing."""
    wanted = _switch(cfg, "padding_free")
    method = cfg["method"]["name"]
    if method not in UNPADDED_METHODS:
        if wanted is True:
            raise ConfigError("train.padding_free", f"train.padding_free=true with method={method}: padding-free "
                                                    "batches are DPO's and SFT's (launcher/padding_free.py rewires "
                                                    "their batches); drop it.")
        return False, f"method={method} runs padded rows (padding-free batches are DPO's and SFT's)"
    if cap := attention_softcap(cfg["model"]):  # attention() runs it eager: padded rows, as measured nowhere else
        if wanted is True or (method == "sft" and cfg["method"].get("packing") is True):
            raise ConfigError("train.padding_free", f"the model caps its attention logits (attn_logit_softcapping="
                                                    f"{cap}, Gemma 2), and only eager and flex attention keep the cap, "
                                                    "which padding-free batches do not run with here: use train."
                                                    "padding_free=auto or false (and method.packing=auto or false "
                                                    "for SFT).")
        return False, f"padding-free batches off: the model caps its attention logits (attn_logit_softcapping={cap})"
    if method == "sft":
        packing = cfg["method"].get("packing", "auto")
        if not (isinstance(packing, bool) or packing == "auto"):
            raise ConfigError("method.packing", f"method.packing={packing!r}: give true, false or auto.")
        if packing is False and wanted is True:
            raise ConfigError("method.packing", "train.padding_free=true with method.packing=false: SFT runs "
                                                "padding-free through TRL's packing (whole rows packed into rows of "
                                                "data.max_length). Drop method.packing=false, or train.padding_free.")
        if packing is True:
            return True, "method.packing=true"
        if packing is False:
            return False, "method.packing=false"
    if wanted != "auto":
        return wanted, f"train.padding_free={str(wanted).lower()}"
    if not on_gpu:
        return False, "train.padding_free=auto: off on the CPU"
    strategy = cfg["strategy"]["name"]
    if strategy not in MEASURED_UNDER:
        return False, (f"train.padding_free=auto: off under {strategy}, where it has not been measured yet "
                       "(train.padding_free=true turns it on)")
    if cfg["quant"]["bits"]:  # measured over 16-bit weights only (a 70B 4-bit ddp run stopped on it, since mended)
        return False, (f"train.padding_free=auto: off with quant={cfg['quant']['name']}, where it has not been "
                       "measured yet (train.padding_free=true turns it on)")
    return True, f"train.padding_free=auto on GPUs under {strategy}"


def runs_eager(model_cfg: dict) -> bool:
    """Eager attention, whose scores take memory quadratic in the row's length (launcher/memory.py): asked for, or
    a model that caps its attention logits, which SDPA and the flash kernels leave out."""
    asked = model_cfg["attn_implementation"]
    return asked == "eager" or (asked == "sdpa" and attention_softcap(model_cfg) is not None)


def attention(cfg, on_gpu: bool, unpadded: bool) -> tuple[str, str | None]:
    """Padding-free attention must stay within each sequence: torch's flash kernel reads the boundaries (GPUs);
    SDPA and flex attention get a block-diagonal mask from transformers (the CPU; flex if asked for)."""
    asked = cfg["model"]["attn_implementation"]
    if asked == "sdpa" and runs_eager(cfg["model"]):
        cap = attention_softcap(cfg["model"])
        return "eager", (f"attention eager: the model caps its attention logits (attn_logit_softcapping={cap}, Gemma "
                         "2), which SDPA and the flash kernels leave out without a word (transformers advises eager "
                         "for Gemma 2's training). model.attn_implementation=flex_attention keeps the cap too, "
                         "without eager's [row, row] scores: on one H200, Gemma-2-2B DPO on the realistic mix ran "
                         "1.25x the real tokens/s at twice the micro-batch, its kernel compiled in the first step "
                         "(about 35 s more); not yet measured for SFT or under sharded strategies")
    if unpadded and on_gpu and asked == "sdpa":
        return VARLEN_ATTENTION, (f"attention {VARLEN_ATTENTION}: torch's flash-attention kernel over each packed "
                                  "sequence (SDPA would need a dense mask over the whole packed row)")
    return asked, None


def token_budget(cfg, unpadded: bool, micro_batch_was_auto: bool) -> int | None:
    """DPO tokens per micro-batch, or None (a fixed count of rows). auto: what the memory plan sized the
    micro-batch for (micro_batch rows of data.max_length), filled with real rows instead of padding."""
    budget = cfg.get("micro_batch_tokens", "auto")
    if budget is None or (budget == "auto" and cfg["method"]["name"] != "dpo"):
        return None
    if cfg["method"]["name"] != "dpo":
        raise ConfigError("micro_batch_tokens", f"micro_batch_tokens={budget} is for DPO (SFT packs its rows into "
                                                "micro_batch rows of data.max_length tokens each; the other methods "
                                                "run micro_batch rows): give micro_batch.")
    if budget == "auto":
        if not (unpadded and micro_batch_was_auto):
            return None
        return cfg["micro_batch"] * 2 * cfg["data"]["max_length"]
    if not unpadded:
        raise ConfigError("micro_batch_tokens", f"micro_batch_tokens={budget} fills micro-batches with real tokens, "
                                                "which needs padding-free batches: add train.padding_free=true, or "
                                                "drop micro_batch_tokens.")
    return budget


def decide_batching(cfg, on_gpu: bool, micro_batch_was_auto: bool, world_size: int) -> tuple[dict, list[str]]:
    unpadded, why = padding_free(cfg, on_gpu)
    method = cfg["method"]["name"]
    decisions = []
    attn, attn_why = attention(cfg, on_gpu, unpadded)
    budget = token_budget(cfg, unpadded, micro_batch_was_auto)
    if not unpadded and on_gpu and any(w in why for w in ("not been measured", "padded rows", "caps its attention")):
        decisions.append(why)
    if unpadded:
        how = ("TRL packs whole rows (best fit, none split) into micro_batch rows of data.max_length"
               if method == "sft" else "each batch runs as one row of its real tokens, the per-token log-probs "
                                       "put back in TRL's padded layout (launcher/padding_free.py)")
        decisions.append(f"padding-free ({why}): {how}")
    if attn_why:
        decisions.append(attn_why)
    settings = {}
    if budget:
        decisions.append(f"micro_batch_tokens -> {budget}: each rank's micro-batch is filled with whole pairs up to "
                         f"{budget} tokens (rows vary), not {cfg['micro_batch']} pairs of any length")
        if world_size > 1:  # TRL gathers per-pair tensors, which must have the same length on every rank
            settings["metrics_sync"] = "log"
            decisions.append("train.metrics_sync -> log: the ranks' micro-batches hold different numbers of pairs, "
                             "which TRL's per-step gathers of per-pair metrics cannot take; each rank keeps its "
                             "metrics and the ranks average them at each log")
    group = _switch(cfg, "group_by_length")
    if group is True and method not in UNPADDED_METHODS:
        raise ConfigError("train.group_by_length", f"train.group_by_length=true with method={method}: its trainer "
                                                   "orders the rows itself (KTO pairs each row with its neighbour for "
                                                   "the KL term); drop it.")
    if group is True and unpadded:
        raise ConfigError("train.group_by_length", "train.group_by_length=true groups rows to pad less; padding-free "
                                                   "batches hold no padding. Drop it, or give train.padding_free=false.")
    if group == "auto":
        group = on_gpu and not unpadded and cfg["micro_batch"] > 1 and method in UNPADDED_METHODS
        if group:
            decisions.append("train.group_by_length=auto -> on: padded micro-batches of rows of similar length "
                             "(transformers' length-grouped sampler) pad less")
    settings |= {"padding_free": unpadded, "packing": unpadded and method == "sft", "attn_implementation": attn,
                "token_budget": budget, "group_by_length": bool(group)}
    return settings, decisions
