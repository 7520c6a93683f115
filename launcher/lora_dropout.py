"""Whether LoRA's dropout runs inside each adapter's down-projection (train.lora_dropout_kernel): a Triton kernel
that keeps a bit per element instead of torch's dropped copy and byte mask (launcher/lora_dropout_kernel.py).
Pure: the config, the strategy and where it runs in; the setting and the plan's line out. Measured on one H200
(docs/benchmarks.md, 2026-12-02, 1.5B SFT at 22.5k tokens): torch's dropout took 8% of the step and 17.6 GiB;
the kernel's first version saved the memory but not the time (1.8% slower; the kernel now ran faster than that
one in isolation, not yet timed in training), so auto keeps it only where that memory changes the job's sizing."""
from __future__ import annotations

from launcher.errors import ConfigError

# TRL 1.16's DPOConfig and KTOConfig turn dropout off (disable_dropout=True); SFTConfig, ORPOConfig and CPOConfig
# (SimPO) leave it on
KEEPS_DROPOUT = ("sft", "orpo", "simpo")
UNDER = ("ddp", "zero2")  # where launcher/modeling.py runs its own LoRA forward (train.fuse_lora_sum)


def resolved(cfg: dict, on_gpu: bool, triton_found: bool) -> dict:
    """cfg with auto made true or false: true where the job runs on GPUs and triton is installed (the planner then
    sizes the job both ways: keep_where_it_pays)."""
    wanted = cfg["train"].get("lora_dropout_kernel", "auto")
    if wanted is True and not (on_gpu and triton_found):
        raise ConfigError("train.lora_dropout_kernel", "train.lora_dropout_kernel=true needs CUDA GPUs and triton "
                                                       "(it comes with torch's CUDA builds); use auto or false.")
    if wanted != "auto":
        return cfg
    return dict(cfg, train=dict(cfg["train"], lora_dropout_kernel=on_gpu and triton_found))


def why_not(cfg: dict, strategy: str) -> str | None:
    """Why the kernel has nothing to do for cfg under strategy; None where it runs."""
    lora, train, method = cfg["lora"], cfg["train"], cfg["method"]["name"]
    if lora["r"] is None or not lora.get("dropout"):
        return "no LoRA dropout"
    if method not in KEEPS_DROPOUT:
        return f"TRL turns dropout off for method={method}"
    if cfg["quant"]["bits"]:
        return "PEFT's bitsandbytes LoRA layers run"
    if strategy not in UNDER:
        return f"strategy={strategy} gathers the adapter's weights in module hooks: PEFT's forward runs"
    if train.get("fuse_lora_sum") is False:
        return "train.fuse_lora_sum=false: PEFT's forward runs"
    if train.get("compile") is True:
        return "train.compile=true: the compiled layers run torch's dropout"
    return None


def in_kernel(cfg: dict, strategy: str) -> bool:
    """For cfg as resolved: whether the adapters' dropout runs in the kernel (the memory plan keeps no mask then)."""
    return cfg["train"].get("lora_dropout_kernel") is True and why_not(cfg, strategy) is None


def decide(cfg: dict, strategy: str) -> tuple[dict, str | None]:
    """({"lora_dropout_kernel": bool}, the plan's line or None), for cfg as resolved."""
    if not in_kernel(cfg, strategy):
        return {"lora_dropout_kernel": False}, None
    return {"lora_dropout_kernel": True}, (
        f"LoRA's dropout (p={cfg['lora']['dropout']}) inside each adapter's down-projection: one Triton kernel "
        "draws the mask as it multiplies and again in the backward, keeping no dropped copy or mask "
        "(train.lora_dropout_kernel=false: torch's dropout)")


def what_it_changes(sized: dict, without: dict | None) -> str | None:
    """What the kernel's smaller activations change in the job as sized (strategy, checkpointing, micro-batch),
    against the job sized without it (None: it did not fit); None where nothing."""
    if without is None:
        return "a job that does not fit with torch's dropout"
    name, before = sized["strategy"]["name"], without["strategy"]["name"]
    if name != before:
        return f"strategy=auto -> {name} ({before} with torch's dropout)"
    if without["train"]["gradient_checkpointing"] and not sized["train"]["gradient_checkpointing"]:
        return "no gradient checkpointing (on with torch's dropout: a third more compute)"
    if sized["micro_batch"] > without["micro_batch"]:
        return f"micro_batch={sized['micro_batch']} ({without['micro_batch']} with torch's dropout)"
    return None


def keep_where_it_pays(cfg: dict, size, decisions: list[str]) -> dict:
    """train.lora_dropout_kernel=auto where it could run: cfg sized (`size(cfg, lines)`) with the kernel and without;
    the kernel kept where it changes the sizing. Its speed alone does not pay: on one H200 (1.5B SFT, 22.5k tokens)
    its first version ran 1.8% slower than torch's dropout and peaked 17.6 GiB lower (docs/benchmarks.md)."""
    without_lines: list[str] = []
    try:
        without = size(dict(cfg, train=dict(cfg["train"], lora_dropout_kernel=False)), without_lines)
    except ConfigError:
        without = None
    with_lines: list[str] = []
    sized = size(cfg, with_lines)  # nothing fits with the kernel's memory either: its error
    if not in_kernel(sized, sized["strategy"]["name"]):
        decisions += without_lines if without is not None else with_lines
        return without if without is not None else sized
    if change := what_it_changes(sized, without):
        decisions += with_lines + [f"train.lora_dropout_kernel=auto -> on: without torch's dropout copies and masks, "
                                   f"{change}"]
        return sized
    decisions += without_lines + ["train.lora_dropout_kernel=auto -> off: the job is sized the same with torch's "
                                  "dropout, which ran 1.8% faster (true: the kernel, 27% less peak memory in 1.5B SFT)"]
    return without
