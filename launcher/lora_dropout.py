"""Whether LoRA's dropout runs inside each adapter's down-projection (train.lora_dropout_kernel): a Triton kernel
that keeps a bit per element instead of torch's dropped copy and byte mask (launcher/lora_dropout_kernel.py).
Pure: the config, the strategy and where it runs in; the setting and the plan's line out. Measured in SFT on one
H200 against torch's dropout at one micro-batch (docs/benchmarks.md): on 2026-12-02 (afternoon) 2.9% faster on the
1.5B shape's uniform rows, 2.6% on the realistic mix, the same speed on Llama-3.1-8B's shape, and 16-24 GiB lower
peak in each; re-tiled and as one autograd node with the base layer (launcher/lora_layer.py) that evening, 4.4-4.8%
faster on the realistic mix (across machines; 8B not re-timed). So auto runs it wherever it can, and the memory plan
sizes the job with its smaller activations."""
from __future__ import annotations

from launcher.errors import ConfigError

# TRL 1.16 turns dropout off for DPO, KTO, ORPO and CPO/SimPO (their configs' disable_dropout=True); SFTConfig
# leaves it on
KEEPS_DROPOUT = ("sft",)
UNDER = ("ddp", "zero2")  # where launcher/modeling.py runs its own LoRA forward (train.fuse_lora_sum)
# The largest rank the kernel takes: its backward keeps a [rank, 128] float32 accumulator per program in registers
# (tested on GPUs at ranks 8 to 64); above it PEFT's dropout runs
MAX_RANK = 64


def resolved(cfg: dict, on_gpu: bool, triton_runs: bool) -> dict:
    """cfg with auto made true or false: true where the job runs on GPUs where triton runs (installed; compute
    capability 8.0 or newer, as triton 3 requires) and its dropout could run in the kernel (in_kernel then says
    whether it does under the strategy the job is sized for)."""
    wanted = cfg["train"].get("lora_dropout_kernel", "auto")
    if wanted is True and not (on_gpu and triton_runs):
        raise ConfigError("train.lora_dropout_kernel", "train.lora_dropout_kernel=true needs CUDA GPUs of compute "
                                                       "capability 8.0 or newer and triton (it comes with torch's "
                                                       "CUDA builds); use auto or false.")
    if wanted != "auto":
        return cfg
    could = on_gpu and triton_runs and why_not(cfg, UNDER[0]) is None
    return dict(cfg, train=dict(cfg["train"], lora_dropout_kernel=could))


def why_not(cfg: dict, strategy: str) -> str | None:
    """Why the kernel has nothing to do for cfg under strategy; None where it runs."""
    lora, train, method = cfg["lora"], cfg["train"], cfg["method"]["name"]
    if lora["r"] is None or not lora.get("dropout"):
        return "no LoRA dropout"
    if lora["r"] > MAX_RANK:
        return f"lora.r={lora['r']} is over the kernel's {MAX_RANK}: PEFT's dropout runs"
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
            "copy and byte mask; in SFT on one H200 at 1.5B, 4.4-4.8% faster on the realistic mix, about 24 GiB "
            "lower peak (train.lora_dropout_kernel=false: torch's dropout)")
    if cfg["train"].get("lora_dropout_kernel") is True:  # given: auto never leaves true where it cannot run
        why = why_not(cfg, strategy)
        return {"lora_dropout_kernel": False}, f"train.lora_dropout_kernel=true has nothing to do: {why}"
    return {"lora_dropout_kernel": False}, None
