"""train.trim_host_work: host work that the libraries repeat at every step, done once or by a cheaper path.

A 1.5B-parameter DPO step keeps the GPU busy about 430 ms, and the host needs nearly as long to launch its
kernels: wherever the host runs Python that launches nothing, the GPU idles. profile.txt's Python samples
(1x H200, 2026-11-24) found these in the idle gaps, each asked again at every step although its answer cannot
change during a run:
- PEFT's disable_adapter() for DPO's reference pass: a model-status walk over every module (building each LoRA
  layer's repr), then a walk to switch the adapters off and one to switch them on (14 ms per step: 0.514 s
  against 0.500 s with the flag switch below);
- accelerate's is_peft_available() / is_deepspeed_available() / is_lomo_available(): each looks the package's
  metadata up on disk (TRL's is_peft_model and unwrap_model ask twice or more per step, accelerate's optimizer
  wrapper once);
- transformers' FLOP count for the logs: a walk over every parameter and module for the parameter count;
- TRL's check whether gradient checkpointing is on, before the reference pass: a walk over every module.
All together: 0.500 -> 0.470 s per step (bench case ddp-untrimmed against the defaults, docs/benchmarks.md), with
the same losses on the CPU.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

from launcher.methods import METHODS

log = logging.getLogger("launcher")


def trim(trainer, cfg: dict) -> list[str]:
    """Applies every trim that fits this run and logs what it did."""
    done = [cache_package_lookups(), count_parameters_once(trainer)]
    model = trainer.model
    if hasattr(model, "disable_adapter"):  # a PeftModel, whose adapters TRL switches off for the reference
        if not cfg["plan"]["gradient_checkpointing"]:
            model.is_gradient_checkpointing = False  # the plan keeps it off for the whole run; read by TRL
            done.append("gradient checkpointing known to be off")
        method = cfg["method"]
        if METHODS[method["name"]].reference and not method["precompute_ref_log_probs"]:
            layers = switch_adapters_off_by_flag(model)
            done.append(f"{method['name'].upper()}'s reference pass switches {layers} LoRA layers off by their flag")
    log.debug("host work trimmed: %s", "; ".join(done))
    return done


def cache_package_lookups() -> str:
    """Whether a package is installed does not change during a run: accelerate asks the disk once per package."""
    from accelerate.utils import imports

    if not hasattr(imports._is_package_available, "cache_info"):
        imports._is_package_available = functools.lru_cache(maxsize=None)(imports._is_package_available)
    return "package lookups cached"


def count_parameters_once(trainer) -> str:
    """transformers' Trainer.floating_point_ops asks the model for its parameter count at every step: the model
    answers each question once, at its first asking (the first step, after any wrapping, as before)."""
    model = trainer.model
    if hasattr(model, "num_parameters") and not hasattr(model.num_parameters, "cache_info"):
        model.num_parameters = functools.lru_cache(maxsize=None)(model.num_parameters)
    return "parameters counted once for the FLOP log"


def switch_adapters_off_by_flag(model) -> int:
    """Gives the PeftModel a `disable_adapter()` that only sets the flag each LoRA layer's forward reads, on a
    list of the layers made once (PEFT's walks: see the module's docstring). TRL runs the reference pass under
    no_grad, where the requires_grad that PEFT's switch also sets does not matter. Returns the number of layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @contextmanager
    def disable_adapter():
        before = [layer._disable_adapters for layer in layers]
        was_disabled, model._adapters_disabled = model._adapters_disabled, True
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, before):
                layer._disable_adapters = flag
            model._adapters_disabled = was_disabled

    model.disable_adapter = disable_adapter
    return len(layers)
