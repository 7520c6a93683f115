"""Whether LoRA's dropout runs inside each adapter's down-projection (train.lora_dropout_kernel): a Triton kernel
that keeps a bit per element instead of torch's dropped copy and byte mask (launcher/lora_dropout_kernel.py).
Pure: the config, the strategy and where it runs in; the setting and the plan's line out. Measured in SFT on one
H200 against torch's dropout at one micro-batch (docs/benchmarks.md): on 2026-12-02 (afternoon) 2.9% faster on the
1.5B shape's uniform rows, 2.6% on the realistic mix, the same speed on Llama-3.1-8B's shape, and 16-24 GiB lower
peak in each; re-tiled and as one autograd node with the base layer (launcher/lora_layer.py) that evening, 4.4-4.8%
faster on the realistic mix (across machines; 8B not re-timed). So auto runs it wherever it can, and the memory plan
sizes the job with its smaller activations.

Also whether each LoRA linear runs as one autograd node with its frozen base (train.lora_one_node,
launcher/lora_layer.py): the kernel's backward adds the adapter's input gradient into the base's, with its dropout
mask or, where nothing drops (DPO and the other methods TRL turns dropout off for), without one. Measured in DPO on
one H200 at 1.5B (docs/benchmarks.md, 2026-12-03), each against the separate ops in the same call: 2.7% faster on
uniform rows, 0.4% on the realistic mix (within the noise there); slower nowhere, so auto runs it wherever it can.
The memory plan is the same either way: the node keeps what the separate ops keep."""
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
    if _given(cfg, "lora_dropout_kernel", on_gpu, triton_runs) != "auto":
        return cfg
    could = on_gpu and triton_runs and why_not(cfg, UNDER[0]) is None
    return dict(cfg, train=dict(cfg["train"], lora_dropout_kernel=could))


def _given(cfg: dict, key: str, on_gpu: bool, triton_runs: bool):
    """train.<key> as given (true, false or auto); true refused where the kernel cannot run."""
    wanted = cfg["train"].get(key, "auto")
    if wanted is True and not (on_gpu and triton_runs):
        raise ConfigError(f"train.{key}", f"train.{key}=true needs CUDA GPUs of compute capability 8.0 or newer and "
                                          "triton (it comes with torch's CUDA builds); use auto or false.")
    return wanted


def why_not(cfg: dict, strategy: str) -> str | None:
    """Why the kernel has nothing to do for cfg under strategy; None where it runs."""
    lora, method = cfg["lora"], cfg["method"]["name"]
    if lora["r"] is None or not lora.get("dropout"):
        return "no LoRA dropout"
    if lora["r"] > MAX_RANK:
        return f"lora.r={lora['r']} is over the kernel's {MAX_RANK}: PEFT's dropout runs"
    if method not in KEEPS_DROPOUT:
        return f"TRL turns dropout off for method={method}"
    return _why_not_the_launchers_forward(cfg, strategy, "torch's dropout")


def _why_not_the_launchers_forward(cfg: dict, strategy: str, compiled_runs: str) -> str | None:
    """Why launcher/modeling.py's own LoRA forward, where the kernels run, does not run for cfg under strategy."""
    train = cfg["train"]
    if cfg["quant"]["bits"]:
        return "PEFT's bitsandbytes LoRA layers run"
    if strategy not in UNDER:
        return f"strategy={strategy} gathers the adapter's weights in module hooks: PEFT's forward runs"
    if train.get("fuse_lora_sum") is False:
        return "train.fuse_lora_sum=false: PEFT's forward runs"
    if train.get("compile") is True:
        return f"train.compile=true: the compiled layers run {compiled_runs}"
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


def one_node_resolved(cfg: dict, on_gpu: bool, triton_runs: bool) -> dict:
    """cfg with train.lora_one_node=auto made true where it could run on these GPUs (as `resolved`); the plan then
    settles auto to one_node_why_not's answer once the strategy and train.fp8 are known."""
    if _given(cfg, "lora_one_node", on_gpu, triton_runs) != "auto":
        return cfg
    return dict(cfg, train=dict(cfg["train"], lora_one_node=on_gpu and triton_runs))


def one_node_why_not(cfg: dict, strategy: str) -> str | None:
    """Why no LoRA linear runs as one node for cfg under strategy (lora_dropout_kernel settled). Base layers that FP8
    patches take the separate ops by themselves (lora_layer.takes); the others still run as one node."""
    lora = cfg["lora"]
    if lora["r"] is None:
        return "no LoRA"
    if lora["r"] > MAX_RANK:
        return f"lora.r={lora['r']} is over the kernel's {MAX_RANK}"
    if why := _why_not_the_launchers_forward(cfg, strategy, "autograd's ops"):
        return why
    if cfg["method"]["name"] in KEEPS_DROPOUT and lora.get("dropout") and not in_kernel(cfg, strategy):
        return "LoRA's dropout runs in torch (train.lora_dropout_kernel), between the base and the adapter"
    return None


def decide_one_node(cfg: dict, strategy: str) -> tuple[dict, str | None]:
    """({"lora_one_node": bool}, the plan's line or None), for cfg as resolved and sized."""
    if cfg["train"].get("lora_one_node") is not True:
        return {"lora_one_node": False}, None
    if why := one_node_why_not(cfg, strategy):  # given: auto never leaves true where it cannot run
        return {"lora_one_node": False}, f"train.lora_one_node=true has nothing to do: {why}"
    fp8 = " (not over the base layers train.fp8 computes in FP8: they run their own forward)" if cfg["train"].get(
        "fp8") else ""
    return {"lora_one_node": True}, (
        f"each LoRA linear and its frozen base layer run as one autograd node{fp8} (launcher/lora_layer.py): the "
        "kernel's backward adds the adapter's input gradient into the base's, where autograd would add two [tokens, features] "
        "tensors; in DPO on one H200 at 1.5B, 2.7% faster on uniform rows, 0.4% on the realistic mix "
        "(train.lora_one_node=false: separate ops)")
