"""Where the frozen base weights multiply in FP8 (train.fp8; launcher/fp8_linear.py does it on the ranks). Pure:
the config, the strategy and what the GPUs can do in; the settings and the decision, with its reason, out.

FP8 matmuls need Hopper or Ada tensor cores (compute capability 8.9+), LoRA (frozen weights: quantized once, no
weight gradient to compute) and unquantized weights (4-bit and 8-bit bases have bitsandbytes' own kernels). They
pay only on large matmuls: every call quantizes its activations (and, in the backward, its gradients), a pass that
costs as much as the FP8 GEMM saves on small ones (scripts/fp8_linear_bench.py on an H200: a frozen linear 1536
wide ran 0.26x bf16, 4096 and wider 1.5-1.7x). At Llama-3.1-8B's shape FP8 ran DPO 1.37x and SFT 1.32x faster, but
DPO did not learn at equal samples where bf16 did, in two seeds (docs/benchmarks.md, 2026-12-01): each FP8 forward's
rounding, 3.7% of a layer's output, lands in the policy's and the reference's log-probs alike, and DPO's reward is
their small difference. With the forward in bf16 and only the input gradients in FP8 (train.fp8=backward) the
log-probs are exact: 1.08-1.10x bf16, and the held-out accuracy within bf16's spread in two seeds. So auto is
`backward` for DPO where a layer is wide enough and the strategy keeps weights whole (the only ones measured), and
off elsewhere: for SFT an FP8 forward's held-out loss trailed bf16's, the backward alone did not pay.
"""
from __future__ import annotations

from launcher.errors import ConfigError

MIN_FEATURES = 4096  # train.fp8_min_features' default: the smallest layer width where FP8 measured faster
# Strategies that keep each weight whole on every GPU, so that it is quantized once; ZeRO-3 and FSDP gather a weight
# for each use, and it is quantized at each use too.
CACHED_UNDER = ("ddp", "zero2")
BACKWARD = "backward"  # train.fp8=backward: only the input-gradient matmuls in FP8; the forward, log-probs, stay bf16


def fp8_width(cfg) -> int:
    width = cfg["train"].get("fp8_min_features", MIN_FEATURES)
    if not isinstance(width, int) or isinstance(width, bool) or width < 16:
        raise ConfigError("train.fp8_min_features", f"train.fp8_min_features={width!r}: give a whole number of "
                                                    f"features, 16 or more (default {MIN_FEATURES}).")
    return width


def refusal(cfg, on_gpu: bool, fp8_gpus: bool) -> str | None:
    """Why FP8 cannot run for this config here, or None."""
    if not on_gpu:
        return "FP8 matmuls need CUDA GPUs of compute capability 8.9+ (H100, H200, L40S, RTX 4090); this run is on the CPU"
    if not fp8_gpus:
        return "these GPUs have no FP8 tensor cores (compute capability below 8.9)"
    if cfg["lora"]["r"] is None:
        return "lora=none trains the base weights, and FP8 here is for frozen ones (LoRA's base)"
    if cfg["quant"]["bits"]:
        return f"quant={cfg['quant']['name']} stores the base in bitsandbytes' format, which has its own kernels"
    return None


# What train.fp8=auto turns on, per method, where FP8 can run and pays, and why; off for the other methods
AUTO = {"dpo": (BACKWARD, "at Llama-3.1-8B's shape FP8 input gradients ran DPO 1.08-1.10x bf16 and the held-out "
                          "reward accuracy stayed within bf16's (0.63 and 0.66 in two seeds, bf16 0.62 and 0.68); an "
                          "FP8 forward ran 1.37x but DPO did not learn (0.50, 0.51): its rounding lands in the "
                          "policy's and the reference's log-probs alike")}
NOT_AUTO = {"sft": "off: at Llama-3.1-8B's shape an FP8 forward ran SFT 1.06x bf16 at 16 rows per step (1.32x at 32) "
                   "but its held-out loss trailed bf16's (12.516 against 12.490-12.503 at lr 1e-3, 12.575 against "
                   "12.044-12.507 at 5e-3), and FP8 input gradients alone ran no faster (0.99x); train.fp8=true turns "
                   "it on"}


def auto_choice(cfg, shape, why_not: str | None) -> tuple[bool | str, str]:
    """What train.fp8=auto becomes for this config, and why. shape: the model's (launcher/memory.py), or None."""
    if why_not:
        return False, f"off: {why_not}"
    method, strategy, width = cfg["method"]["name"], cfg["strategy"]["name"], fp8_width(cfg)
    if method not in AUTO:
        return False, NOT_AUTO.get(method, f"off: FP8 not measured for method={method} (train.fp8=true or backward "
                                           "turn it on)")
    if shape is None:
        return False, "off: the model's dimensions are unknown, so not whether its layers are wide enough to gain"
    if shape.fp8_params(width) == 0:
        return False, (f"off: no linear layer of this model is {width} features wide, and narrower ones ran slower in "
                       f"FP8 than in bf16 (train.fp8_min_features)")
    if strategy not in (*CACHED_UNDER, "auto"):
        return False, (f"off: FP8 not measured for speed under strategy={strategy}, which gathers each weight and "
                       "quantizes it at each use (train.fp8=true or backward turn it on)")
    choice, measured = AUTO[method]
    return choice, f"{str(choice).lower()}: {measured} (docs/benchmarks.md)"


def with_fp8(cfg: dict, on_gpu: bool, fp8_gpus: bool, decisions: list[str], shape=None) -> dict:
    """train.fp8 checked, and auto settled with the reason (said in decisions), before the memory plan sizes the
    job; true or backward where FP8 cannot run is refused here, before any sizing."""
    wanted = cfg["train"].get("fp8", "auto")
    if not (isinstance(wanted, bool) or wanted in ("auto", BACKWARD)):
        raise ConfigError("train.fp8", f"train.fp8={wanted!r}: give true, false, backward or auto.")
    fp8_width(cfg)
    why_not = refusal(cfg, on_gpu, fp8_gpus)
    if wanted in (True, BACKWARD) and why_not:
        raise ConfigError("train.fp8", f"train.fp8={str(wanted).lower()}: {why_not}. Use train.fp8=auto (off where "
                                       "it cannot run) or train.fp8=false.")
    if wanted != "auto":
        return cfg
    choice, why = auto_choice(cfg, shape, why_not)
    decisions.append(f"train.fp8=auto -> {why}")
    return dict(cfg, train=dict(cfg["train"], fp8=choice))


def why_auto_drops_it(sized: dict | None, without: dict) -> str | None:
    """Why FP8 that train.fp8=auto turned on is dropped, given the job sized with its weight copies (None: it did
    not fit) and without them; None where it is kept. Its gain, 1.08-1.10x, does not pay for a slower strategy,
    gradient checkpointing or a smaller micro-batch."""
    if sized is None:
        return "with its FP8 weight copies the job would not fit, without them it does"
    name, before = sized["strategy"]["name"], without["strategy"]["name"]
    if name != before:
        return f"its FP8 weight copies would move strategy=auto from {before} to {name}"
    if name not in CACHED_UNDER:
        return (f"under {name} FP8 is not measured for speed (it gathers each weight and quantizes it at each use); "
                "train.fp8=backward turns it on")
    if sized["train"]["gradient_checkpointing"] and not without["train"]["gradient_checkpointing"]:
        return "its FP8 weight copies would turn gradient checkpointing on (a third more compute for a 1.08-1.10x gain)"
    if sized["micro_batch"] < without["micro_batch"]:
        return (f"its FP8 weight copies would shrink micro_batch from {without['micro_batch']} to "
                f"{sized['micro_batch']}")
    return None


def weight_copies(cfg) -> tuple[int, int] | None:
    """(the layer width from which the memory plan counts FP8 weight copies, how many: W.T for the input gradient,
    and W where the forward is FP8 too), or None where FP8 is off."""
    wanted = cfg["train"].get("fp8")
    if wanted not in (True, BACKWARD) or cfg["lora"]["r"] is None or cfg["quant"]["bits"]:
        return None
    return fp8_width(cfg), 2 if wanted is True else 1


def decide_fp8(cfg, strategy: str, shape=None):
    """({"fp8", "fp8_forward", "fp8_min_features", "fp8_cache_weights"}, decision or None), once with_fp8 has checked
    train.fp8 and settled auto. shape: the model's (launcher/memory.py), when known, to say where no layer is as wide
    as fp8_min_features."""
    wanted, width = cfg["train"]["fp8"], fp8_width(cfg)
    cached = strategy in CACHED_UNDER
    settings = {"fp8": bool(wanted), "fp8_forward": wanted is True, "fp8_min_features": width,
                "fp8_cache_weights": cached}
    if not wanted:
        return settings, None
    name = str(wanted).lower()
    if shape is not None and shape.fp8_params(width) == 0:
        return settings, (f"train.fp8={name}, but no linear layer of this model is {width} features wide: none runs "
                          f"in FP8 (train.fp8_min_features sets the width; below {MIN_FEATURES} FP8 measured slower)")
    what = ("multiply in FP8" if wanted is True else
            "compute their input gradients in FP8 (the forward, and so every log-prob, stays bf16)")
    measured = (f"Measured under ddp: faster from {MIN_FEATURES} features" if cached else
                f"Not measured under {strategy}, which gathers each weight and quantizes it at each use")
    return settings, (f"train.fp8={name} -> the frozen base linears of {width}+ features {what} (e4m3, a scale per "
                      f"row; weights {'quantized once' if cached else 'quantized at each gather'}); adapters, norms, "
                      f"embeddings, LM head and loss stay bf16/fp32 (launcher/fp8_linear.py). {measured}"
                      + (". DPO learned less at 8B (docs/benchmarks.md)" if wanted is True else ""))
