"""Whether LoRA's dropout runs inside each adapter's down-projection (train.lora_dropout_kernel): a Triton kernel
that keeps a bit per element instead of torch's dropped copy and byte mask (launcher/lora_dropout_kernel.py).
Pure: the config, the strategy and where it runs in; the setting and the plan's line out. Measured on one H200
(docs/benchmarks.md, 2026-12-02, 1.5B SFT at 22.5k tokens): torch's dropout took 8% of the step and 17.6 GiB;
the kernel's first version saved the memory but not the time (1.8% slower; the kernel now ran faster than that
one in isolation, not yet timed in training), so auto keeps it only where that memory changes the job's sizing."""
from __future__ import annotations

from launcher.errors import ConfigError

# TRL 1.16 turns dropout off for DPO, KTO, ORPO and CPO/SimPO (their configs' disable_dropout=True); SFTConfig
# leaves it on
KEEPS_DROPOUT = ("sft",)
UNDER = ("ddp", "zero2")  # where launcher/modeling.py runs its own LoRA forward (train.fuse_lora_sum)


def resolved(cfg: dict, on_gpu: bool, triton_found: bool) -> dict:
    """cfg with auto made true or false: true where the job runs on GPUs with triton and its dropout could run in
    the kernel (the planner then sizes the job both ways: keep_where_it_pays)."""
    wanted = cfg["train"].get("lora_dropout_kernel", "auto")
    if wanted is True and not (on_gpu and triton_found):
        raise ConfigError("train.lora_dropout_kernel", "train.lora_dropout_kernel=true needs CUDA GPUs and triton "
                                                       "(it comes with torch's CUDA builds); use auto or false.")
    if wanted != "auto":
        return cfg
    could = on_gpu and triton_found and why_not(cfg, UNDER[0]) is None
    return dict(cfg, train=dict(cfg["train"], lora_dropout_kernel=could))


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
    """For cfg as resolved: whether the adapters' dropout runs in the kernel."""
    return cfg["train"].get("lora_dropout_kernel") is True and why_not(cfg, strategy) is None


def keeps_dropout_copies(cfg: dict, strategy: str) -> bool:
    """Whether torch's dropout keeps a dropped copy and a mask of each adapter's input (the memory plan counts them)."""
    lora = cfg["lora"]
    return (cfg["method"]["name"] in KEEPS_DROPOUT and lora["r"] is not None and bool(lora.get("dropout"))
            and not in_kernel(cfg, strategy))


def decide(cfg: dict, strategy: str) -> tuple[dict, str | None]:
    """({"lora_dropout_kernel": bool}, the plan's line or None), for cfg as resolved."""
    if in_kernel(cfg, strategy):
        return {"lora_dropout_kernel": True}, (
            f"LoRA's dropout (p={cfg['lora']['dropout']}) inside each adapter's down-projection: one Triton kernel "
            "draws the mask as it multiplies and keeps a bit per element for the backward, not torch's dropped "
            "copy and byte mask (train.lora_dropout_kernel=false: torch's dropout)")
    if cfg["train"].get("lora_dropout_kernel") is True:  # given: auto never leaves true where it cannot run
        why = why_not(cfg, strategy)
        return {"lora_dropout_kernel": False}, f"train.lora_dropout_kernel=true has nothing to do: {why}"
    return {"lora_dropout_kernel": False}, None


def what_it_changes(sized: dict | None, without: dict | None) -> str | None:
    """What the kernel's smaller activations change in the job as sized (None: it does not fit), against the job
    sized with torch's dropout; None where nothing that pays for it. A larger micro-batch alone does not count:
    past the 16-24k tokens these micro-batches already hold, more tokens gained about 2% (launcher/memory.py),
    what the kernel cost, and with grad_accum it would change the batch that is learned from."""
    if sized is None:
        return None
    if without is None:
        return "a job that does not fit with torch's dropout"
    name, before = sized["strategy"]["name"], without["strategy"]["name"]
    if name != before:
        return f"strategy=auto -> {name} ({before} with torch's dropout)"
    if without["train"]["gradient_checkpointing"] and not sized["train"]["gradient_checkpointing"]:
        return "no gradient checkpointing (on with torch's dropout: a third more compute)"
    return None


def keep_where_it_pays(cfg: dict, size, fits, decisions: list[str]) -> dict:
    """train.lora_dropout_kernel=auto where it could run: cfg sized (`size(cfg, lines)`) with the kernel and with
    torch's dropout, each taken as not fitting where sizing fails or `fits(sized)` says so (a job given all its
    sizes); the kernel kept where it changes the sizing (what_it_changes)."""
    def attempt(c):
        lines: list[str] = []
        try:
            return size(c, lines), lines
        except ConfigError:
            return None, lines

    without_cfg = dict(cfg, train=dict(cfg["train"], lora_dropout_kernel=False))
    without, without_lines = attempt(without_cfg)
    sized, with_lines = attempt(cfg)
    runs = sized is not None and fits(sized) and in_kernel(sized, sized["strategy"]["name"])
    fitting_without = without if without is not None and fits(without) else None
    if runs and (change := what_it_changes(sized, fitting_without)):
        decisions += with_lines + [f"train.lora_dropout_kernel=auto -> on: without torch's dropout copies and masks, "
                                   f"{change}"]
        return sized
    if runs:
        decisions.append("train.lora_dropout_kernel=auto -> off: the job is sized the same with torch's dropout, "
                         "which ran 1.8% faster than the kernel's first version (true: the kernel, whose first "
                         "version peaked 27% lower in 1.5B SFT)")
    if without is None:
        return size(without_cfg, decisions)  # its own error: nothing fits
    decisions += without_lines
    return without
