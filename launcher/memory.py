"""Per-GPU memory plan: predicted peak GiB per GPU for each strategy, from the model's dimensions alone.

Pure arithmetic (no torch, no weights). Bytes per parameter follow from what each strategy keeps where:

| what | none (bf16) | 4-bit | 8-bit |
|---|---|---|---|
| base linear weights | 2 | 0.53 (NF4 + double-quantized absmax) | 1.0 |
| embeddings, norms, lm_head | 2 | 2 | 2 |
| FP8 copies (train.fp8, ddp/zero2) | +1 per copy: W.T, and W for fp8=true | - | - |

Trainable parameters (the LoRA adapter, or every weight with lora=none) also carry gradients and AdamW's two
moments: in the parameter's dtype under torch's AdamW (float32 adapters: 4 + 4 + 8 bytes; a bf16 full fine-tune:
2 + 2 + 4), as float32 master weights, gradients and moments under DeepSpeed (4 + 4 + 8 + the bf16 copy). ZeRO-2
shards gradients and optimizer states; ZeRO-3 and FSDP the weights too; ZeRO-3-offload keeps weights and optimizer
states in CPU memory.

Activations per token were fitted to the plain-TRL peer's measurements on 2x H200 (../shared/peer, Qwen2.5-1.5B
shape, DPO, LoRA r16, 712 tokens per pair): 71.3 bytes per hidden unit per layer without gradient checkpointing; with
it 2 (the checkpointed inputs) plus one layer's worth; plus 0.47 bytes per vocabulary entry (logits). That holds for
float32 adapters under autocast (DDP) without Liger; the factors below, from our 2x H200 benchmark
(docs/benchmarks.md), scale it for Liger's kernels, bf16 adapters (DeepSpeed, FSDP) and 4-bit weights under DDP
(upcast to float32 by k-bit preparation). DPO runs chosen and rejected together; with LoRA the reference pass keeps
no activations, without it the reference model's weights are one more copy.

At Llama-3.1-70B's shape, ZeRO-3 over 4-bit weights held about the whole 4-bit model on each GPU (counted so; the
cause is not found). Beyond their shard, ZeRO-3 materializes up to stage3_max_live_parameters (1e9 in
ds_configs/zero3*.json) at a time and its prefetch and persistence buffers take about 0.8 GiB (docs/memory.md;
ZeRO-2 showed none); FSDP keeps the (tied) embedding gathered from the first layer to the last. Under DDP, 4-bit
weights go through prepare_model_for_kbit_training, which keeps the unquantized ones in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher import host_memory, lora_dropout
from launcher.batching import runs_eager
from launcher.fp8 import CACHED_UNDER
from launcher.fp8 import weight_copies as fp8_weight_copies
from launcher.host_memory import Host
from launcher.methods import METHODS
from launcher.model_shape import Shape, attention_softcap, model_shape  # noqa: F401 (the plan's callers read Shape
# and model_shape here too)
from launcher.strategies import STRATEGIES as RULES  # what each strategy shards, and where DeepSpeed runs

GIB = 2**30
# Bytes per token per layer without gradient checkpointing: per hidden unit and per MLP (intermediate) unit. Two
# runs fix the two: the peer's 1.5B shape (intermediate 5.83 x hidden: 71.3 bytes per hidden unit in all) and
# Llama-3.1-70B's under fsdp_qlora (3.5 x hidden; 2026-11-30, docs/memory.md)
ACT_PER_HIDDEN_LAYER = 17.47
ACT_PER_INTERMEDIATE_LAYER = 9.228
ACT_PER_HIDDEN_LAYER_GC = 2.0  # bytes per token: the checkpointed layer inputs
ACT_PER_VOCAB = 0.47  # bytes per token per vocabulary entry
# Factors on the in-layer activations, each from one pair of runs in docs/benchmarks.md (peak GiB per GPU):
ACT_LIGER = 0.79  # ddp with Liger 54.8 against 68.9 without
ACT_BF16_ADAPTERS = 0.86  # zero2 47.4 against ddp 54.8 when PEFT still ran DDP's adapters on float32 copies of
# their inputs; without those copies (modeling.feed_adapters_the_activations_as_they_are) ddp measured 47.6
ACT_KBIT_DDP = 1.46  # ddp 4-bit 77.4 against ddp bf16 54.8
# LoRA's dropout (on in SFT only) keeps a dropped copy and a byte mask of each adapter's input: at 24.6k tokens SFT
# peaked at 64.53 GiB against DPO's 47.65, SFT without dropout or with its kernel (first version) at 46.9 (2026-12-02;
# the kernel's bit per element, 1.4 GB at 22.5k tokens, is left to the plan's margin)
ACT_SFT = 1.38
# Eager attention (Gemma 2's logit cap, or model.attn_implementation=eager) keeps each head's [row, row] scores for
# the backward, where SDPA and the flash kernels keep none: bytes per score (one head, one query, one key) per layer,
# measured on an H200 (scripts/eager_attention_memory.py, docs/memory.md): 8 with the cap (tanh's output, softmax's
# float32 one and its bf16 copy), 6 without. Under checkpointing only the layer being recomputed holds them.
EAGER_SCORE_BYTES = {True: 8.0, False: 6.0}  # by: the logits capped
BYTES_4BIT = 0.53
LINEAR_BYTES = {None: 2.0, 4: BYTES_4BIT, 8: 1.0}  # per linear-layer weight, by quant bits
DEEPSPEED_BUFFERS_GIB = {"zero2": 0.0, "zero3": 0.8, "zero3_offload": 0.8}
ZERO3_MAX_LIVE_PARAMS = 1e9
CONTEXT_GIB = 1.0  # CUDA context and allocator slack, not counted by torch's peak
SAFETY = 0.9  # a plan fits when its peak stays under this share of (GPU memory - context)
# Expected speed relative to DDP (pairs/s per GPU), measured by `python -m launcher.bench` on 2x H200 with
# the defaults (docs/benchmarks.md: Qwen2.5-1.5B shape, DPO, micro_batch 32, no checkpointing, Liger). On
# 2026-11-24, ddp (bf16 adapter inputs, LoRA's sum in the matmul) against zero2 in two runs: 58.5 and 54.5,
# then 56.6 and 57.6: within the runs' noise, so 0.97, and ddp first on a tie: it needs no DeepSpeed. The
# sharded ones, against the ddp of 2026-11-23 (49.7): fsdp_qlora 4-bit 28.7, zero3 17.6 and 19.7 at
# micro_batch 32; ZeRO-3-offload was not measured there: the tiny-model matrix (docs/gpu-runs.md) ran it 4.3x
# slower than ZeRO-3, hence 0.375 / 4.3. At micro_batch=auto (64 where the weights are sharded) zero3 ran 42.9
# and fsdp_qlora over 4-bit weights 39.4; their order between each other only matters where neither ddp nor
# zero2 fits, and no run has compared the two over the same weights yet, so those values stay.
RELATIVE_SPEED = {"ddp": 1.0, "zero2": 0.97, "fsdp_qlora": 0.58, "zero3": 0.375, "zero3_offload": 0.09}
STRATEGIES = ("ddp", "zero2", "fsdp_qlora", "zero3", "zero3_offload")  # the order of the plan's table


@dataclass(frozen=True)
class Estimate:
    strategy: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    reference: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.reference


def tokens_per_micro_batch(micro_batch: int, method: str, seq_len: int) -> int:
    """DPO, ORPO and SimPO run each pair's chosen and rejected sequences together."""
    return micro_batch * METHODS[method].sequences_per_row * seq_len


def estimate(shape: Shape, *, strategy: str, bits: int | None, lora_r: int | None, lora_targets, world: int,
             micro_batch: int, seq_len: int, method: str, gradient_checkpointing: bool,
             liger: bool = False, tokens: int | None = None, fp8: tuple[int, int] | None = None,
             precomputed_ref: bool = False, dropout_copies: bool | None = None,
             score_bytes: float = 0.0) -> Estimate:
    """Predicted peak GiB per GPU, split by what holds the memory. `tokens`: a micro-batch's tokens where they
    are given as a budget (padding-free batches: one packed row) rather than micro_batch rows of seq_len. `fp8`:
    (width, copies), FP8 on for linears this wide (launcher/fp8.py): where the strategy keeps weights whole, each such
    weight is also held in FP8, a byte per parameter per copy (W.T; and W where the forward is FP8). `score_bytes`:
    eager attention's bytes per attention score and layer (EAGER_SCORE_BYTES), 0 for fused attention."""
    quant_linear = LINEAR_BYTES[bits]
    other_bytes = 4.0 if bits and strategy == "ddp" else 2.0  # kbit preparation upcasts them (see above)
    base = shape.linear_params() * quant_linear + shape.other_params() * other_bytes
    lora = lora_r is not None
    trainable = shape.lora_params(lora_r, lora_targets) if lora else shape.total_params()
    sharded_weights = RULES[strategy].shards_params
    deepspeed = RULES[strategy].deepspeed_template is not None
    buckets = DEEPSPEED_BUFFERS_GIB.get(strategy, 0.0) * GIB
    if deepspeed:  # bf16 params, fp32 master weights + grads + 2 moments, sharded from ZeRO-2 on
        param_bytes, grad_bytes, opt_bytes = (4 if lora and strategy == "zero2" else 2), 4, 12
    else:  # torch AdamW: states in the parameter's dtype
        width = 2 if (not lora or (bits and strategy == "fsdp_qlora")) else 4
        param_bytes, grad_bytes, opt_bytes = width, width, 2 * width
    gathered = 0.0
    if strategy.startswith("zero3"):
        gathered = min(ZERO3_MAX_LIVE_PARAMS, shape.total_params()) * 2.0
    elif strategy == "fsdp_qlora":
        gathered = shape.vocab * shape.hidden * 2.0 + base / shape.layers  # embedding + the unit in use
    adapter = trainable * param_bytes if lora else 0.0  # a full fine-tune trains the base weights themselves
    if strategy == "zero3_offload":
        weights = gathered + adapter / world
        optimizer = 0.0
    elif sharded_weights:
        # ZeRO-3 over 4-bit weights measured as if every GPU held them all (Llama-3.1-70B: 88.8 GiB, where shards
        # would give 55; docs/memory.md): counted whole until the cause is found
        held = base if strategy == "zero3" and bits else base / world
        weights = held + gathered + adapter / world
        optimizer = trainable * opt_bytes / world
    else:
        weights = base + adapter
        optimizer = trainable * opt_bytes / (world if deepspeed else 1)
    if fp8 and strategy in CACHED_UNDER:
        width, copies = fp8
        weights += copies * shape.fp8_params(width)
    optimizer += buckets  # counted with the optimizer: DeepSpeed's own buffers
    gradients = trainable * grad_bytes / (world if (deepspeed or sharded_weights) else 1)
    if strategy == "zero3_offload":
        gradients = trainable * 2 / world
    row = tokens or seq_len  # the longest a row gets: a packed micro-batch is one row
    tokens = tokens or tokens_per_micro_batch(micro_batch, method, seq_len)
    h_layers = shape.hidden * shape.layers
    in_layer = ACT_PER_HIDDEN_LAYER * shape.hidden + ACT_PER_INTERMEDIATE_LAYER * shape.intermediate  # one layer
    in_layer *= ACT_LIGER if liger else 1.0
    in_layer *= ACT_KBIT_DDP if strategy == "ddp" and lora and bits else ACT_BF16_ADAPTERS
    per_token = (ACT_PER_HIDDEN_LAYER_GC * h_layers + in_layer if gradient_checkpointing
                 else in_layer * shape.layers) + ACT_PER_VOCAB * shape.vocab
    if dropout_copies is None:  # not given: as torch's dropout keeps them in SFT with LoRA
        dropout_copies = method == "sft" and lora
    activations = tokens * per_token * (ACT_SFT if dropout_copies else 1.0)
    activations += tokens * row * shape.heads * score_bytes * (1 if gradient_checkpointing else shape.layers)
    reference = 0.0
    if METHODS[method].reference and not lora and not precomputed_ref:  # a frozen copy, sharded like the policy
        reference = base / world if sharded_weights else base
    return Estimate(strategy, *(x / GIB for x in (weights, gradients, optimizer, activations, reference)))


def fits(est: Estimate, gpu_mem_gib: float) -> bool:
    return est.total <= (gpu_mem_gib - CONTEXT_GIB) * SAFETY


def supported(strategy: str, bits: int | None, lora_r: int | None) -> bool:
    """The combinations the planner accepts (launcher/strategies.py refuses the others)."""
    if bits == 8 and RULES[strategy].shards_params:
        return False
    return not (bits and lora_r is None)


# ---- choosing: strategy=auto, micro_batch=auto, and what to change when nothing fits -------------------

MAX_MICRO_BATCH = 64
# micro_batch=auto stops here: 24.6k tokens per micro-batch already reached 47% MFU on an H200 (docs/benchmarks.md);
# larger micro-batches mostly cut the number of optimizer steps (zero2 at 49k tokens: +2%)
MAX_TOKENS_PER_MICRO_BATCH = 32768
# ... except where the weights are sharded: ZeRO-3 and FSDP gather every layer in each pass, a cost per step that
# more tokens amortize (zero3 at 49k tokens: 1.49 s per 64 pairs against 1.00 s per 32, same run)
MAX_TOKENS_PER_MICRO_BATCH_SHARDED = 65536
# Gradient checkpointing costs one more forward per step (about a third more compute). Without it the
# plain-TRL peer ran fastest (2x H200, 1.5B: 37.1 pairs/s at batch 32 without, 31.5 at 64 with it), as long
# as the micro-batch left without it still holds this many tokens.
CHECKPOINTING_OFF_MIN_TOKENS = 8192


def frozen_reference_precomputed(cfg: dict) -> bool:
    """Precomputed reference log-probs: a full fine-tune loads no frozen copy (auto counts as no, until resolved)."""
    return cfg["method"].get("precompute_ref_log_probs") is True


def job_estimate(cfg: dict, shape: Shape, strategy: str, world: int, micro_batch: int, **changes) -> Estimate:
    """estimate() for this config; `changes` override bits / seq_len / gradient_checkpointing."""
    args = dict(bits=cfg["quant"]["bits"], lora_r=cfg["lora"]["r"], lora_targets=cfg["lora"].get("target_modules"),
                world=world, micro_batch=micro_batch, seq_len=cfg["data"]["max_length"], method=cfg["method"]["name"],
                gradient_checkpointing=cfg["train"]["gradient_checkpointing"] is not False,  # auto: at least on
                liger=cfg["train"].get("liger") is True,  # auto counts as off until the planner resolves it
                fp8=fp8_weight_copies(cfg), precomputed_ref=frozen_reference_precomputed(cfg),
                dropout_copies=lora_dropout.keeps_dropout_copies(cfg, strategy),
                score_bytes=EAGER_SCORE_BYTES[attention_softcap(cfg["model"]) is not None]
                if runs_eager(cfg["model"]) else 0.0)
    args.update(changes)
    return estimate(shape, strategy=strategy, **args)


def host_estimate(cfg: dict, shape: Shape, strategy: str, world: int, procs_per_node: int,
                  bits: int | None = None) -> host_memory.HostEstimate:
    """launcher/host_memory.py's estimate for this config on one host running procs_per_node ranks (bits: the
    quantization to plan for instead of the config's)."""
    bits = cfg["quant"]["bits"] if bits is None else bits
    lora = cfg["lora"]["r"] is not None
    trainable = shape.lora_params(cfg["lora"]["r"], cfg["lora"].get("target_modules")) if lora else shape.total_params()
    held = shape.linear_params() * LINEAR_BYTES[bits or None] + shape.other_params() * 2.0
    return host_memory.estimate(held, shape.total_params() * 2.0, trainable, strategy=strategy, bits=bits, lora=lora,
                                world=world, procs_per_node=min(procs_per_node, world),
                                reference_copy=METHODS[cfg["method"]["name"]].reference and not lora
                                and not frozen_reference_precomputed(cfg))


def host_fits(cfg, shape, strategy, world, host: Host | None, bits: int | None = None) -> bool:
    if host is None or host.mem_gib is None:
        return True
    return host_memory.fits(host_estimate(cfg, shape, strategy, world, host.procs_per_node, bits), host)


def at_cap(cfg, micro_batch: int, strategy: str) -> bool:
    """micro_batch=auto goes no further than this micro-batch, whatever the memory."""
    doubled = tokens_per_micro_batch(micro_batch * 2, cfg["method"]["name"], cfg["data"]["max_length"])
    cap = MAX_TOKENS_PER_MICRO_BATCH_SHARDED if RULES[strategy].shards_params else MAX_TOKENS_PER_MICRO_BATCH
    return micro_batch * 2 > MAX_MICRO_BATCH or doubled > cap


def largest_micro_batch(cfg, shape, strategy, world, gpu_mem_gib, **changes) -> int:
    """The largest micro-batch that fits, doubling from 1 (0: not even one)."""
    best, mb = 0, 1
    while fits(job_estimate(cfg, shape, strategy, world, mb, **changes), gpu_mem_gib):
        best = mb
        if at_cap(cfg, mb, strategy):
            break
        mb *= 2
    return best


def checkpointing_pays(cfg, shape, strategy, world, gpu_mem_gib, micro_batch) -> tuple[bool, str]:
    """gradient_checkpointing=auto: (on?, why). Off when the job still fits without it with enough work per
    micro-batch to keep the GPU busy; `micro_batch` is an int or 'auto'."""
    if micro_batch == "auto":
        mb = largest_micro_batch(cfg, shape, strategy, world, gpu_mem_gib, gradient_checkpointing=False)
        tokens = tokens_per_micro_batch(mb, cfg["method"]["name"], cfg["data"]["max_length"])
        if mb and (tokens >= CHECKPOINTING_OFF_MIN_TOKENS or at_cap(cfg, mb, strategy)):
            return False, f"off: micro_batch {mb} ({tokens} tokens) fits without it"
        return True, (f"on: without it only micro_batch {mb} ({tokens} tokens, under {CHECKPOINTING_OFF_MIN_TOKENS})"
                      " would fit")
    if fits(job_estimate(cfg, shape, strategy, world, micro_batch, gradient_checkpointing=False), gpu_mem_gib):
        return False, f"off: micro_batch {micro_batch} fits without it"
    return True, f"on: micro_batch {micro_batch} does not fit without it"


def sized(cfg, shape, strategy, world, gpu_mem_gib, micro_batch) -> tuple[bool, int, Estimate]:
    """(checkpointing, micro_batch, estimate) of this job under `strategy`, with each `auto` decided."""
    gc = cfg["train"]["gradient_checkpointing"]
    if gc == "auto":
        gc = checkpointing_pays(cfg, shape, strategy, world, gpu_mem_gib, micro_batch)[0]
    mb = micro_batch
    if micro_batch == "auto":
        mb = largest_micro_batch(cfg, shape, strategy, world, gpu_mem_gib, gradient_checkpointing=bool(gc))
    return bool(gc), mb, job_estimate(cfg, shape, strategy, world, max(mb, 1), gradient_checkpointing=bool(gc))


def candidates(cfg, deepspeed: bool = True, deepspeed_only: bool = False, exclude=()) -> list[str]:
    """The strategies this job can use (the DeepSpeed ones only where deepspeed is installed; only those where
    backend=deepspeed or DeepSpeed settings were given; none of `exclude`)."""
    return [s for s in STRATEGIES if supported(s, cfg["quant"]["bits"], cfg["lora"]["r"]) and s not in exclude
            and (deepspeed or RULES[s].deepspeed_template is None)
            and (not deepspeed_only or RULES[s].deepspeed_template is not None)]


def choose(cfg, shape, world, gpu_mem_gib, micro_batch, deepspeed: bool = True,
           deepspeed_only: bool = False, host: Host | None = None, exclude=()) -> tuple[str | None, int, str]:
    """(strategy, micro_batch, why): the fastest strategy that fits the GPUs and the host (micro_batch: an int,
    or 'auto')."""
    for strategy in sorted(candidates(cfg, deepspeed, deepspeed_only, exclude), key=lambda s: -RELATIVE_SPEED[s]):
        _, mb, est = sized(cfg, shape, strategy, world, gpu_mem_gib, micro_batch)
        if mb and fits(est, gpu_mem_gib) and host_fits(cfg, shape, strategy, world, host):
            return strategy, mb, (f"{strategy}: the fastest that fits ({est.total:.1f} GiB of {gpu_mem_gib:.0f} GiB "
                                  f"per GPU at micro_batch={mb}; relative speed {RELATIVE_SPEED[strategy]})")
    return None, 0, ""


def smallest_change(cfg, shape, world, gpu_mem_gib, host: Host | None = None) -> str:
    """What would make the job fit, tried from the least to the most intrusive change; the host's memory
    last, as it is another machine."""
    bits, mb = cfg["quant"]["bits"], cfg["micro_batch"] if cfg["micro_batch"] != "auto" else 1
    tries = [("", {}, world)]  # as it is: the GPUs may be enough, the host not
    if not cfg["train"]["gradient_checkpointing"]:
        tries.append(("train.gradient_checkpointing=true", dict(gradient_checkpointing=True), world))
    if bits != 4 and cfg["lora"]["r"] is not None:
        tries.append(("quant=4bit", dict(bits=4), world))
    tries.append((f"data.max_length={cfg['data']['max_length'] // 2}", dict(seq_len=cfg["data"]["max_length"] // 2),
                  world))
    tries.append((f"gpus={world * 2} (twice the GPUs)", {}, world * 2))
    tries.append((f"gpus={world * 4}", {}, world * 4))
    short_host = None  # (change, strategy, GiB it needs) of the first that fits the GPUs but not the host
    for change, kwargs, w in tries:
        # more GPUs: on this host while it has room for them (host.procs_per_node grows with them)
        here = host and Host(host.mem_gib, host.procs_per_node * w // world)
        for strategy in candidates(cfg) if "bits" not in kwargs else STRATEGIES:
            if supported(strategy, kwargs.get("bits", bits), cfg["lora"]["r"]) and fits(
                    job_estimate(cfg, shape, strategy, w, mb, **kwargs), gpu_mem_gib):
                if host_fits(cfg, shape, strategy, w, here, kwargs.get("bits")):
                    if change:  # (as it is, it fits: not this function's question)
                        return f"{change} (then {strategy} fits)"
                    continue
                if short_host is None:
                    est = host_estimate(cfg, shape, strategy, w, here.procs_per_node, kwargs.get("bits"))
                    short_host = change, strategy, host_memory.needed_gib(est)
    if short_host:
        change, strategy, need = short_host
        return (f"{change + ' and ' if change else ''}a host with {need} GiB of memory or more (this one has "
                f"{host.mem_gib:.0f} GiB; host_mem_gib=N plans for another), then {strategy} fits")
    return "a GPU with more memory: even twice the GPUs, 4-bit and half the length do not fit"


def table(cfg, shape, world, gpu_mem_gib, micro_batch, host: Host | None = None) -> str:
    """Every strategy's predicted peak per GPU and on the host, for `python -m launcher plan`."""
    params = shape.total_params()
    count = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"  # a tiny model is not 0.00B
    rows = [f"model {cfg['model']['name']}: {count} parameters, quant "
            f"{cfg['quant']['name']}, lora {cfg['lora']['name']}, method {cfg['method']['name']}, "
            f"max_length {cfg['data']['max_length']}, {world} GPU(s) of {gpu_mem_gib:.0f} GiB",
            f"{'strategy':<14}{'mb':>4}{'ckpt':>5}{'weights':>9}{'grads':>7}{'optim':>7}{'activ':>8}{'ref':>6}"
            f"{'total':>8}{'host':>7}  fits       speed (vs ddp)"]
    for strategy in STRATEGIES:
        if not supported(strategy, cfg["quant"]["bits"], cfg["lora"]["r"]):
            rows.append(f"{strategy:<14}  -- not with quant={cfg['quant']['name']} lora={cfg['lora']['name']}")
            continue
        gc, mb, e = sized(cfg, shape, strategy, world, gpu_mem_gib, micro_batch)
        on_host = host_estimate(cfg, shape, strategy, world, host.procs_per_node if host else world)
        verdict = "yes" if mb and fits(e, gpu_mem_gib) else "NO "
        if verdict == "yes" and not host_memory.fits(on_host, host):
            verdict = "NO (host)"
        rows.append(f"{strategy:<14}{max(mb, 1):>4}{'on' if gc else 'off':>5}{e.weights:>9.2f}{e.gradients:>7.2f}"
                    f"{e.optimizer:>7.2f}{e.activations:>8.2f}{e.reference:>6.2f}{e.total:>8.2f}{on_host.total:>7.1f}"
                    f"  {verdict:<9}  {RELATIVE_SPEED[strategy]:.2f}")
    known = host is not None and host.mem_gib is not None
    rows.append(f"GiB per GPU; ckpt: gradient checkpointing; host: GiB of RAM on each host "
                f"({'of ' + format(host.mem_gib, '.0f') if known else 'not checked: its memory is unknown'}); fits: under "
                f"{SAFETY:.0%} of (GPU memory - {CONTEXT_GIB:.0f} GiB CUDA context) and {host_memory.SAFETY:.0%} of the "
                "host's memory")
    return "\n".join(rows)
