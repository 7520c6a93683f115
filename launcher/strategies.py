"""Every strategy's rules, in one place: which backends drive it, which files it renders from,
and the decisions that make each combination of strategy, quantization and LoRA actually work.

`decide` is pure: config + machine in, a dict of settings for launcher.train and the list of
decisions (each with its reason) out. The dry run prints those decisions.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import ConfigError


@dataclass(frozen=True)
class Strategy:
    name: str
    backends: tuple[str, ...]  # the first is the default on GPUs
    wrapper: str  # the class launcher.train expects around the model (checked at start-up)
    deepspeed_template: str | None  # file in ds_configs/
    shards_params: bool  # FSDP / ZeRO-3 split the weights themselves across ranks


STRATEGIES = {
    "ddp": Strategy("ddp", ("accelerate", "torchrun"), "DistributedDataParallel", None, False),
    "fsdp_qlora": Strategy("fsdp_qlora", ("accelerate", "torchrun"), "FullyShardedDataParallel", None, True),
    "zero2": Strategy("zero2", ("deepspeed", "accelerate", "torchrun"), "DeepSpeedEngine", "zero2.json", False),
    "zero3": Strategy("zero3", ("deepspeed", "accelerate", "torchrun"), "DeepSpeedEngine", "zero3.json", True),
    "zero3_offload": Strategy(
        "zero3_offload", ("deepspeed", "accelerate", "torchrun"), "DeepSpeedEngine", "zero3_offload.json", True
    ),
}
BACKENDS = ("accelerate", "torchrun", "deepspeed")


def resolve_strategy(name: str) -> Strategy:
    return STRATEGIES[name]


def resolve_backend(cfg, strategy: Strategy, on_gpu: bool) -> str:
    backend = cfg["backend"]
    if backend is None:
        return strategy.backends[0] if on_gpu else "torchrun"
    if backend not in BACKENDS:
        raise ConfigError("backend", f"backend={backend} is not one of {', '.join(BACKENDS)}.")
    if backend not in strategy.backends:
        raise ConfigError(
            "backend",
            f"strategy={strategy.name} cannot run under backend={backend}: the deepspeed launcher only drives "
            f"DeepSpeed strategies. Use backend={' or backend='.join(strategy.backends)}, "
            f"or a strategy among zero2, zero3, zero3_offload.",
        )
    if backend != "torchrun" and not on_gpu:
        raise ConfigError(
            "backend",
            f"backend={backend} needs GPUs; on a CPU-only machine the launcher runs torchrun with gloo. "
            "Use backend=torchrun (or leave backend unset), or dry_run=true to only look at the plan.",
        )
    return backend


def flat(settings: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for key, value in settings.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def compute_dtype(cfg, machine_bf16: bool, on_gpu: bool) -> str:
    if not on_gpu:
        return "float32"
    wanted = (cfg["quant"].get("compute_dtype") or "auto") if cfg["quant"]["bits"] else "auto"
    if wanted == "auto":
        return "bfloat16" if machine_bf16 else "float16"
    return {"bf16": "bfloat16", "fp16": "float16"}.get(wanted, wanted)


def fetch_whole_layers(cfg) -> bool:
    """ZeRO-3 leaf modules (launcher/modeling.py): measured 2.2x faster for DPO with LoRA on 2x H200, so `auto`
    with LoRA. SFT failed on the GPUs until the first layer's input was made to need a gradient (the cause was
    found on the CPU, docs/gpu-runs.md)."""
    wanted = cfg["strategy"].get("fetch_whole_layers", "auto")
    if wanted == "auto":
        return cfg["lora"]["r"] is not None
    if wanted not in (True, False):
        raise ConfigError("strategy.fetch_whole_layers", f"strategy.fetch_whole_layers={wanted}: use auto, true or false.")
    if wanted and cfg["lora"]["r"] is None:
        raise ConfigError(
            "strategy.fetch_whole_layers",
            "strategy.fetch_whole_layers=true is tested only with LoRA (lora=none gathers and reduces every weight "
            "of a layer at once, untested). Use strategy.fetch_whole_layers=auto.",
        )
    return wanted


def adapters_in_layer_units(cfg, world_size: int) -> bool:
    """fsdp_qlora: each decoder layer one FSDP unit with its LoRA matrices inside (use_orig_params=true), where
    PEFT's wrap policy makes every LoRA matrix a unit of its own (392 on the 1.5B shape, each with its own
    gathers, reductions and hooks per step: in the profiled 1950 ms fsdp_qlora step of 2026-11-24, FSDP's
    pre-forward and backward hooks held the host about 1.2 s)."""
    wanted = cfg["strategy"].get("adapters_in_layer_units", False)
    if wanted not in (True, False):
        raise ConfigError("strategy.adapters_in_layer_units",
                          f"strategy.adapters_in_layer_units={wanted!r}: give true or false.")
    if wanted and cfg["lora"]["r"] is None:
        raise ConfigError("strategy.adapters_in_layer_units",
                          "strategy.adapters_in_layer_units=true puts LoRA adapters into their layers' FSDP units; "
                          "lora=none trains no adapter. Drop it, or use a LoRA config.")
    if wanted and world_size == 1:
        raise ConfigError("strategy.adapters_in_layer_units",
                          "strategy.adapters_in_layer_units=true needs 2 or more processes: with one, FSDP runs "
                          "NO_SHARD, where FSDP1 with use_orig_params fails on tied embeddings (AssertionError "
                          "'as_params=True type(prim_param)', 1x H200, torch 2.11). Drop it, or give gpus=2 or more.")
    return wanted


def decide(cfg, strategy: Strategy, world_size: int, on_gpu: bool, machine_bf16: bool,
           liger_installed: bool = False) -> tuple[dict, list[str]]:
    """The settings launcher.train needs for this strategy, and why each non-obvious one was chosen."""
    decisions: list[str] = []
    quant, lora = cfg["quant"], cfg["lora"]
    bits = quant["bits"]
    dtype = compute_dtype(cfg, machine_bf16, on_gpu)
    settings = {
        "strategy": strategy.name,
        "device": "cuda" if on_gpu else "cpu",
        "dtype": dtype,
        "expected_wrapper": strategy.wrapper,
        "device_map": None,
        "quant_storage_dtype": None,
        "optim": cfg["train"]["optim"],
        "gradient_checkpointing": bool(cfg["train"]["gradient_checkpointing"]),
        "fsdp_config": None,
        "deepspeed_config": None,
        "zero3_init": False,
        "fsdp_cpu_offload": strategy.name == "fsdp_qlora" and bool(cfg["strategy"].get("cpu_offload")),
        "kbit_prepare": bool(bits),
        "checkpoint_on_signal": bool(cfg.get("checkpoint_on_signal")),
        "trainable_dtype": None,
        "liger": False,
        "zero3_whole_layers": False,
        "adapter_input_cast": True,
        "fuse_lora_sum": False,
        "trim_host_work": False,
        "metrics_sync": "step",
        "dataloader_workers": cfg["train"]["dataloader_workers"],
        "fsdp_adapters_in_layers": False,
    }
    if on_gpu and dtype != "bfloat16":
        decisions.append(f"dtype={dtype}: these GPUs lack bf16 (compute capability < 8.0)")

    if bits and not on_gpu:
        raise ConfigError(
            "quant",
            f"quant={quant['name']} needs a CUDA GPU (bitsandbytes); this machine has none. "
            "Use quant=none here, or dry_run=true to only look at the plan.",
        )
    if bits == 8 and strategy.shards_params:
        raise ConfigError(
            "quant",
            f"quant=8bit cannot be sharded by strategy={strategy.name}. Use quant=4bit (stored in the compute "
            "dtype, which FSDP and ZeRO-3 can shard) or strategy=ddp / zero2.",
        )

    # Where the weights are loaded.
    if strategy.name == "ddp" or (strategy.name == "fsdp_qlora" and bits):
        if on_gpu:
            settings["device_map"] = "local_rank"
            if strategy.name == "fsdp_qlora":
                decisions.append(
                    "device_map={'': local_rank}: 4-bit weights under FSDP must be loaded on each rank's own GPU "
                    "(else every rank loads to cuda:0 and FSDP fails with 'Inconsistent compute device')"
                )
    if strategy.name.startswith("zero3"):
        decisions.append("no device_map under ZeRO-3: DeepSpeed places (and partitions) the weights itself")

    # 4-bit storage.
    if bits == 4:
        storage = quant.get("storage_dtype") or "auto"
        if strategy.shards_params:
            if storage not in ("auto", dtype):
                raise ConfigError(
                    "quant.storage_dtype",
                    f"quant.storage_dtype={storage} under strategy={strategy.name}: FSDP and ZeRO-3 can only shard "
                    f"4-bit weights stored in the compute dtype. Use quant.storage_dtype=auto (= {dtype}).",
                )
            storage = dtype
            decisions.append(
                f"bnb_4bit_quant_storage={dtype}: {strategy.name} shards the 4-bit weights, which needs them stored "
                "in the compute dtype"
            )
        elif storage == "auto":
            storage = "uint8"
        settings["quant_storage_dtype"] = storage
    if bits and strategy.name != "ddp":
        settings["kbit_prepare"] = False
        settings["trainable_dtype"] = dtype
        decisions.append(
            f"no prepare_model_for_kbit_training and LoRA weights in {dtype}: it upcasts norms and adapters to "
            f"float32, and {strategy.name} flattens parameters that must share one dtype"
        )

    # Optimizer. auto: torch's fused AdamW (one kernel over all the adapters; transformers' own default, which
    # the peer runs) where the optimizer steps on the GPU; on the CPU and under offloading, the foreach one.
    optim = settings["optim"]
    if optim == "auto":
        offloaded = strategy.name == "zero3_offload" or settings["fsdp_cpu_offload"]
        settings["optim"] = "adamw_torch_fused" if on_gpu and not offloaded else "adamw_torch"
    elif "paged" in optim and strategy.name != "ddp":
        settings["optim"] = "adamw_torch"
        decisions.append(
            f"optim={optim} -> adamw_torch: paged 8-bit optimizers manage their own memory and do not work "
            f"with {strategy.name}'s sharded optimizer states"
        )

    user_ds, user_fsdp = cfg["strategy"].get("deepspeed") or {}, cfg["strategy"].get("fsdp") or {}
    if user_ds and not strategy.deepspeed_template:
        raise ConfigError("strategy.deepspeed", f"these are DeepSpeed settings, and this run uses strategy="
                                                f"{strategy.name}. Name a DeepSpeed strategy (strategy=zero2, zero3 "
                                                "or zero3_offload), or drop them.")
    if user_fsdp and strategy.name != "fsdp_qlora":
        raise ConfigError("strategy.fsdp", f"these are FSDP settings, and this run uses strategy={strategy.name}. "
                                           "Use strategy=fsdp_qlora, or drop them.")
    if bad := [k for k in user_fsdp if not k.startswith("fsdp_")]:
        raise ConfigError("strategy.fsdp", f"strategy.fsdp.{bad[0]}: accelerate's FSDP settings are named fsdp_*, "
                                           "as in accelerate_configs/fsdp_qlora.yaml (e.g. fsdp_sharding_strategy).")
    for key, value in flat(user_ds).items() | flat(user_fsdp).items():
        decisions.append(f"{key}={value}: yours, laid over the shipped config")

    if strategy.name == "fsdp_qlora":
        in_layers = settings["fsdp_adapters_in_layers"] = adapters_in_layer_units(cfg, world_size)
        if in_layers:  # one flat parameter per layer: its adapters must share the base weights' dtype
            settings["trainable_dtype"] = dtype
            decisions.append(f"each decoder layer is one FSDP unit with its LoRA matrices inside (use_orig_params="
                             f"true; adapters in {dtype}), not PEFT's unit per LoRA matrix")
        else:
            decisions.append("FSDP1 FULL_SHARD, use_orig_params=false (PEFT under FSDP: a unit per LoRA matrix)")
        decisions.append("FULL_STATE_DICT checkpoints: they hold the adapter as PEFT saves it (sharded ones came back "
                         "empty for PEFT under FSDP1)")
        if settings["fsdp_cpu_offload"]:
            decisions.append("fsdp_offload_params=true: parameters live in CPU memory between uses")

    if strategy.deepspeed_template:
        if strategy.name.startswith("zero3"):
            decisions.append(
                "stage3_gather_16bit_weights_on_model_save=true: without it a ZeRO-3 save holds only this rank's shard"
            )
            settings["zero3_init"] = not bits
            settings["zero3_whole_layers"] = fetch_whole_layers(cfg)
            if settings["zero3_whole_layers"]:
                decisions.append(
                    "ZeRO-3 fetches each decoder layer whole (DeepSpeed leaf modules): one gather and one set of "
                    "hooks per layer, not per LoRA sub-module (strategy.fetch_whole_layers=false: per module)"
                )
            if bits:
                decisions.append("zero3_init_flag=false: bitsandbytes cannot quantize weights created under zero.Init")
        if strategy.name == "zero3_offload":
            decisions.append("offload_param and offload_optimizer to CPU (pinned): fits larger models, runs slower")

    liger = cfg["train"]["liger"]
    if liger is True and not (on_gpu and liger_installed):
        raise ConfigError("train.liger", "train.liger=true needs CUDA GPUs and the liger-kernel package: "
                                         "pip install 'launcher[gpu]' (liger-kernel==0.8.5), or train.liger=auto.")
    if liger:  # plan.size_the_job has turned auto into true or false
        settings["liger"] = True
        decisions.append("Liger kernels for RMSNorm, RoPE and SwiGLU: fused passes over the activations "
                         "(train.liger=false turns them off)")

    if strategy.name == "ddp" and lora["r"] is not None and on_gpu:
        settings["adapter_input_cast"] = False
        decisions.append(f"LoRA's float32 weights take the {dtype} activations as they are: autocast multiplies in "
                         f"{dtype} either way, PEFT's float32 copy of each adapter input only costs time and memory")

    fuse = cfg["train"].get("fuse_lora_sum", "auto")
    fusable = strategy.name in ("ddp", "zero2") and lora["r"] is not None and not bits
    if fuse is True and not fusable:
        raise ConfigError("train.fuse_lora_sum", "train.fuse_lora_sum=true needs LoRA on unquantized weights under "
                                                 "strategy=ddp or zero2 (elsewhere the weights are gathered in module "
                                                 "hooks, or PEFT's bitsandbytes layers run). "
                                                 "Use train.fuse_lora_sum=auto.")
    if fuse and fusable:
        settings["fuse_lora_sum"] = True
        decisions.append("each LoRA output is scaled and added to its layer's inside the lora_B matmul (one addmm), "
                         "not in two more passes over the layer's output (train.fuse_lora_sum=false: PEFT's forward)")

    if settings["dataloader_workers"] == "auto":
        settings["dataloader_workers"] = 2 if on_gpu else 0
        if on_gpu:
            decisions.append("train.dataloader_workers=auto -> 2: the next batch is collated in worker processes "
                             "while the GPU runs the step, not by the rank between steps")

    if cfg["train"]["trim_host_work"]:
        settings["trim_host_work"] = True
        decisions.append("per-step host work the libraries repeat is done once (package lookups, parameter count, "
                         "the reference pass's adapter switch; launcher/host_work.py): the GPU idles less "
                         "(train.trim_host_work=false: as the libraries do it)")

    if cfg["train"]["metrics_sync"] == "log" and world_size > 1:
        settings["metrics_sync"] = "log"
        decisions.append("training metrics stay on each rank until a log, then one gather of their averages "
                         "(launcher/step_metrics.py; train.metrics_sync=step: TRL's gathers at every step)")

    if world_size == 1 and strategy.name == "ddp":
        settings["expected_wrapper"] = None
        decisions.append("one process: no DistributedDataParallel wrapper")
    return settings, decisions
