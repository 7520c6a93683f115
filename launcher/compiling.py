"""Whether the decoder layers run compiled (train.compile). Pure: the config and where it runs in; the setting and
the decision, with its reason, out. The ranks compile with accelerate's regional compilation, in place
(launcher/modeling.py: compile_layers_in_place): each decoder layer is compiled, and since the layers share one
class and torch inlines nn.Modules (their weights are graph inputs, not guards), the first layer's graph serves
the others. The first step pays the compile; inductor's cache (TORCHINDUCTOR_CACHE_DIR, set by
launcher/train.py to ~/.cache/launcher/inductor where not given) makes later runs of the same shapes cheaper.
"""
from __future__ import annotations

from launcher.errors import ConfigError

CACHE_DIR = "~/.cache/launcher/inductor"
MEASURED_UNDER = ("ddp",)  # on an H200 (docs/benchmarks.md) and on 2 CPU processes (tests/test_train.py)
# The layers are compiled before the trainer wraps the model: FSDP1 then flattens their parameters, and ZeRO-3 adds
# the hooks that gather each one at its use, which dynamo would trace inside every compiled layer
ZERO3_HOOKS = "ZeRO-3's parameter-gathering hooks would run inside every compiled layer"
REFUSED = {"fsdp_qlora": "FSDP1 flattens the compiled layers' parameters after they were compiled",
           "zero3": ZERO3_HOOKS, "zero3_offload": ZERO3_HOOKS}


def decide_compile(cfg, on_gpu: bool, strategy: str) -> tuple[dict, str | None]:
    """({"compile": bool}, decision or None). auto: off. Measured on one H200 with Liger's kernels in the layers
    (docs/benchmarks.md, 2026-12-01 day): compiled layers ran 3-6% slower than eager ones (dynamo reported 8
    graph breaks for DPO and 5 for SFT, causes not traced) and the first step waited 21-26 s more."""
    wanted = cfg["train"].get("compile", "auto")
    if not (isinstance(wanted, bool) or wanted == "auto"):
        raise ConfigError("train.compile", f"train.compile={wanted!r}: give true, false or auto.")
    if wanted == "auto":
        why = ("the CPU runs too few steps for a compile to pay back" if not on_gpu else
               "measured on an H200, compiled layers ran slower than eager ones with Liger's kernels (1.5B DPO "
               "0.552 against 0.532-0.538 s/step, SFT 0.425 against 0.402) and the first step waited 21-26 s "
               "more (docs/benchmarks.md)")
        return {"compile": False}, f"train.compile=auto -> off: {why}"
    if not wanted:
        return {"compile": False}, None
    if strategy in REFUSED:
        raise ConfigError("train.compile", f"train.compile=true with strategy={strategy}: {REFUSED[strategy]}. "
                                           "Use train.compile=false.")
    untried = [f"strategy={strategy}"] if strategy not in MEASURED_UNDER else []
    untried += [f"quant={cfg['quant']['name']}"] if cfg["quant"]["bits"] else []
    return {"compile": True}, ("train.compile=true -> each decoder layer compiled (torch.compile, accelerate's "
                               "regional compilation); the first step waits for it"
                               + (f" (not run with {' and '.join(untried)} yet)" if untried else ""))
