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
log-probs are exact: 1.10x bf16, and the held-out accuracy within bf16's spread, in one run. `auto` is off until
more runs show it learns as bf16 does; train.fp8=true or backward turn it on.
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


def with_fp8(cfg: dict, on_gpu: bool, fp8_gpus: bool, decisions: list[str]) -> dict:
    """train.fp8 checked, and auto made false with the reason (said in decisions), before the memory plan sizes the
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
    decisions.append("train.fp8=auto -> off: " + (why_not or (
        "at Llama-3.1-8B's shape FP8 ran DPO 1.37x faster than bf16 but DPO did not learn at equal samples (held-out "
        "reward accuracy 0.50 and 0.51 in two seeds, against 0.62 and 0.68 in bf16); FP8 input gradients alone "
        "(train.fp8=backward) ran 1.10x and learned as bf16 did (0.63), in one run so far (docs/benchmarks.md)")))
    return dict(cfg, train=dict(cfg["train"], fp8=False))


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
