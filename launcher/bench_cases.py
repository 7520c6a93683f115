"""The benchmark's cases (launcher/bench.py runs them): each the launcher's defaults plus its overrides, or the
plain-TRL peer with its settings, on a preset's random-init model and a length mix of launcher/bench_assets.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

@dataclass(frozen=True)
class Case:
    kind: str  # launcher | peer (../shared/peer/dpo_trl.py) | peer_sft (bench/peer_sft_trl.py)
    method: str = "dpo"
    overrides: tuple[str, ...] = ()  # launcher cases: command-line overrides on top of the defaults
    env: dict = field(default_factory=dict)  # peer cases: the peer script's settings
    preset: str = "qwen2.5-1.5b-instruct"
    peer_config: str = "acc_ddp.yaml"
    mix: str = "uniform"  # the rows' lengths (launcher/bench_assets.py): uniform (the peer's job) or realistic
    weights: str = "bf16"  # the random checkpoint: bf16, or nf4 (pre-quantized 4-bit, stored as bf16: 70B in 40 GB)
    resume_to: int | None = None  # then resume the run's last checkpoint with resume=auto up to this step


# data.max_length per mix: no uniform row is cut (the longest sequence is 351 tokens); 1.4% of the realistic ones are
MAX_LENGTH = {"uniform": 384, "realistic": 2048}


CASES = {
    "defaults": Case("launcher"),  # what a user gets without choosing anything (strategy=auto)
    # the same run timed by the peer's clock (train.step_clock): single steps, GPU synced at start and end
    "defaults-clocked": Case("launcher", overrides=("train.step_clock=true",)),
    "peer-ddp-bs32": Case("peer", env={"STRATEGY": "ddp", "BS": "32", "GC": "0"}),  # the peer, hand-tuned
    "peer-ddp-bs4": Case("peer", env={"STRATEGY": "ddp", "BS": "4", "GC": "1"}),  # the tutorials' defaults
    "ddp": Case("launcher", overrides=("strategy=ddp",)),
    "ddp-resumed": Case("launcher", overrides=("strategy=ddp",), resume_to=22),  # then resume=auto, 2 steps more
    "zero2": Case("launcher", overrides=("strategy=zero2",)),
    "zero3": Case("launcher", overrides=("strategy=zero3",)),
    "zero3_offload": Case("launcher", overrides=("strategy=zero3_offload",)),
    "ddp-4bit": Case("launcher", overrides=("strategy=ddp", "quant=4bit")),
    "fsdp_qlora-4bit": Case("launcher", overrides=("strategy=fsdp_qlora", "quant=4bit")),
    # levers, each measured against "ddp"
    "ddp-no-liger": Case("launcher", overrides=("strategy=ddp", "train.liger=false")),
    # twice the defaults' micro-batch; on an H200 it fits without checkpointing since the adapters take bf16 inputs
    "ddp-mb64": Case("launcher", overrides=("strategy=ddp", "micro_batch=64")),
    "ddp-mb4-ckpt": Case("launcher", overrides=("strategy=ddp", "micro_batch=4", "train.gradient_checkpointing=true",
                                                "train.liger=false")),  # the launcher at the old defaults
    # levers for the sharded strategies, which trail zero2 (docs/benchmarks.md)
    "zero3-per-module": Case("launcher", overrides=("strategy=zero3", "strategy.fetch_whole_layers=false")),
    "zero3-prefetch": Case("launcher", overrides=(  # four times the shipped prefetch bucket: 2e8 parameters
        "strategy=zero3", "+strategy.deepspeed.zero_optimization.stage3_prefetch_bucket_size=200000000")),
    "fsdp_qlora": Case("launcher", overrides=("strategy=fsdp_qlora",)),  # FSDP over bf16 weights: no dequantizing
    "fsdp_qlora-4bit-grad-op": Case("launcher", overrides=(  # weights stay gathered from forward to backward
        "strategy=fsdp_qlora", "quant=4bit", "+strategy.fsdp.fsdp_sharding_strategy=SHARD_GRAD_OP")),
    # each decoder layer one FSDP unit with its adapters inside, not PEFT's unit per LoRA matrix (392 here)
    "fsdp_qlora-layer-units": Case("launcher", overrides=(
        "strategy=fsdp_qlora", "strategy.adapters_in_layer_units=true")),
    "fsdp_qlora-4bit-layer-units": Case("launcher", overrides=(
        "strategy=fsdp_qlora", "quant=4bit", "strategy.adapters_in_layer_units=true")),
    "fsdp_qlora-4bit-prefetch": Case("launcher", overrides=(
        "strategy=fsdp_qlora", "quant=4bit", "+strategy.fsdp.fsdp_forward_prefetch=true")),
    # 64 pairs (49k tokens) without checkpointing, as micro_batch=auto gives zero3 and fsdp_qlora: +2% for zero2
    "zero2-mb64": Case("launcher", overrides=("strategy=zero2", "micro_batch=64", "train.gradient_checkpointing=false")),
    # PEFT's own LoRA forward: the scaling and the sum as passes of their own over each layer's output
    "zero2-unfused": Case("launcher", overrides=("strategy=zero2", "train.fuse_lora_sum=false")),
    "ddp-unfused": Case("launcher", overrides=("strategy=ddp", "train.fuse_lora_sum=false")),
    # the per-step host work as the libraries do it (launcher/host_work.py)
    "ddp-untrimmed": Case("launcher", overrides=("strategy=ddp", "train.trim_host_work=false")),
    # TRL's metrics gathered once per log, not at every step (launcher/step_metrics.py); measured on 2+ GPUs only
    "ddp-metrics-at-log": Case("launcher", overrides=("strategy=ddp", "train.metrics_sync=log")),
    "sft-metrics-at-log": Case("launcher", "sft", overrides=("train.metrics_sync=log",)),
    # batches collated by the rank between steps, not by the 2 worker processes of the defaults on GPUs
    "ddp-workers0": Case("launcher", overrides=("strategy=ddp", "train.dataloader_workers=0")),
    # a user's choice, not a default (it changes the training): what LoRA's dropout costs, a pass over each
    # adapter's input and a saved copy of it (the profiled defaults' generic elementwise kernels, dropout's
    # among them, took 28 of the step's 464 GPU ms)
    "ddp-no-dropout": Case("launcher", overrides=("strategy=ddp", "lora.dropout=0")),
    # TRL's SFT keeps dropout on (its DPO, KTO, ORPO and CPO configs turn it off): its cost there, the bound for a
    # cheaper dropout
    "sft-no-dropout": Case("launcher", "sft", overrides=("lora.dropout=0",)),
    "real-sft-no-dropout": Case("launcher", "sft", overrides=("lora.dropout=0",), mix="realistic"),
    # ... torch's dropout, and LoRA's dropout in the adapter's kernel (launcher/lora_dropout.py)
    "sft-torch-dropout": Case("launcher", "sft", overrides=("train.lora_dropout_kernel=false",)),
    "real-sft-torch-dropout": Case("launcher", "sft", overrides=("train.lora_dropout_kernel=false",), mix="realistic"),
    "sft-dropout-kernel": Case("launcher", "sft", overrides=("train.lora_dropout_kernel=true",)),
    "real-sft-dropout-kernel": Case("launcher", "sft", overrides=("train.lora_dropout_kernel=true",), mix="realistic"),
    # each LoRA linear and its base as separate ops, autograd adding their input gradients (train.lora_one_node)
    "defaults-separate-ops": Case("launcher", overrides=("train.lora_one_node=false",)),
    "real-defaults-separate-ops": Case("launcher", overrides=("train.lora_one_node=false",), mix="realistic"),
    # the methods beyond DPO on the same model and pairs, with the launcher's defaults: ORPO and SimPO have no
    # reference pass; KTO takes each pair as a desirable and an undesirable row (rows/s counts those)
    "orpo-defaults": Case("launcher", "orpo"),
    "simpo-defaults": Case("launcher", "simpo"),
    "kto-defaults": Case("launcher", "kto"),
    # SFT on the same model and rows (prompt + chosen answer)
    "sft-defaults": Case("launcher", "sft"),
    "sft": Case("launcher", "sft", overrides=("strategy=ddp",)),
    "peer-sft-bs4": Case("peer_sft", "sft", env={"BS": "4", "GC": "1"}),
    "peer-sft-bs32": Case("peer_sft", "sft", env={"BS": "32", "GC": "0"}),
    # the defaults as they were before padding-free batches (padded, 32 pairs per micro-batch)
    "defaults-padded": Case("launcher", overrides=("train.padding_free=false",)),
    "defaults-checks-first": Case("launcher", overrides=("start_ranks_early=false",)),  # issue 20: the launch before
    # the realistic length mix (launcher/bench_assets.py): lengths from a few tokens to 5,000, data.max_length=2048.
    # The peer pads as TRL does, its batch the largest that fits a batch of rows at max_length without checkpointing
    # (DPO 8 pairs measured 107.2 GiB on an H200, 10 would take about 133; SFT 16 rows measured 123.5 GiB)
    "real-peer-bs10": Case("peer", env={"STRATEGY": "ddp", "BS": "10", "GC": "0", "MAXLEN": "2048"}, mix="realistic"),
    "real-peer-bs8": Case("peer", env={"STRATEGY": "ddp", "BS": "8", "GC": "0", "MAXLEN": "2048"}, mix="realistic"),
    "real-defaults": Case("launcher", mix="realistic"),  # padding-free, micro-batches filled to a token budget
    "real-padded": Case("launcher", overrides=("train.padding_free=false",), mix="realistic"),  # grouped by length
    "real-padded-random": Case("launcher", overrides=("train.padding_free=false", "train.group_by_length=false"),
                               mix="realistic"),
    "real-rows": Case("launcher", overrides=("micro_batch_tokens=null",), mix="realistic"),  # padding-free, 8 pairs
    "real-peer-sft-bs16": Case("peer_sft", "sft", env={"BS": "16", "GC": "0", "MAXLEN": "2048"}, mix="realistic"),
    "real-sft-defaults": Case("launcher", "sft", mix="realistic"),  # packed rows (padding-free)
    "real-sft-padded": Case("launcher", "sft", overrides=("method.packing=false",), mix="realistic"),
    "real-sft-metrics-at-log": Case("launcher", "sft", overrides=("train.metrics_sync=log",), mix="realistic"),
    "defaults-metrics-at-log": Case("launcher", overrides=("train.metrics_sync=log",)),
    "defaults-padded-metrics-at-log": Case("launcher", overrides=("train.padding_free=false", "train.metrics_sync=log")),
    # Qwen2.5-7B's shape, QLoRA, on two GPUs
    "7b-fsdp_qlora-4bit": Case("launcher", overrides=("strategy=fsdp_qlora", "quant=4bit"), preset="qwen2.5-7b-instruct"),
    "7b-zero3-4bit": Case("launcher", overrides=("strategy=zero3", "quant=4bit"), preset="qwen2.5-7b-instruct"),
}
# Models that do not fit one GPU in bf16 (issue 18): Llama-3.1-70B's shape from a pre-quantized 4-bit checkpoint,
# 2 pairs per micro-batch (a step of 20 at this size takes seconds), 200 rows of the peer's job (20 held out);
# each saves at its last step and resumes from it for 5 steps more.
BIG = ("quant=4bit", "micro_batch=2", "data.max_rows=200", "data.test_fraction=0.1")
for strategy in ("ddp", "fsdp_qlora", "zero3"):
    for method in ("dpo", "sft"):
        CASES[f"70b-{method}-{strategy}"] = Case(
            "launcher", method, overrides=(f"strategy={strategy}", *BIG), preset="llama-3.1-70b-instruct",
            weights="nf4", resume_to=25)
# The middle of the range: Llama-3.1-8B's shape, bf16 LoRA and 4-bit QLoRA under every strategy that takes them
for strategy in ("ddp", "zero2", "fsdp_qlora", "zero3", "zero3_offload"):
    for quant in ("none", "4bit"):
        if not (quant == "4bit" and strategy == "zero3_offload"):
            CASES[f"8b-{strategy}-{quant}"] = Case("launcher", overrides=(f"strategy={strategy}", f"quant={quant}"),
                                                   preset="llama-3.1-8b-instruct")
# FP8 for the frozen base (issue 22) where its matmuls are large enough to pay: Llama-3.1-8B's shape beside the
# plain-TRL peer on that shape (bf16, no checkpointing, its batch the largest power of two that fits an H200)
EIGHT_B = "llama-3.1-8b-instruct"
CASES["8b-peer-bs16"] = Case("peer", env={"STRATEGY": "ddp", "BS": "16", "GC": "0"}, preset=EIGHT_B)
CASES["8b-defaults"] = Case("launcher", preset=EIGHT_B)  # since 2026-12-02 train.fp8=auto -> backward for DPO here
CASES["8b-fp8"] = Case("launcher", overrides=("train.fp8=true",), preset=EIGHT_B)
CASES["8b-fp8-off"] = Case("launcher", overrides=("train.fp8=false",), preset=EIGHT_B)
CASES["8b-peer-sft-bs16"] = Case("peer_sft", "sft", env={"BS": "16", "GC": "0"}, preset=EIGHT_B)
CASES["8b-sft-fp8"] = Case("launcher", "sft", overrides=("train.fp8=true",), preset=EIGHT_B)
CASES["8b-sft-fp8-off"] = Case("launcher", "sft", overrides=("train.fp8=false",), preset=EIGHT_B)
# LoRA's dropout at 8B's widths (4096, 14336), torch's against the kernel, at one micro-batch (the kernel's memory
# would let the planner take a larger one)
CASES["8b-sft-torch-dropout"] = Case("launcher", "sft", overrides=("train.lora_dropout_kernel=false", "micro_batch=32"),
                                     preset=EIGHT_B)
CASES["8b-sft-dropout-kernel"] = Case("launcher", "sft", overrides=("train.lora_dropout_kernel=true", "micro_batch=32"),
                                      preset=EIGHT_B)
# what is learned with FP8 against bf16 at equal samples (the same token budget, seed and so batches), and bf16
# against itself with another seed (its run-to-run noise); lr 5e-4 so that 20 steps move the held-out accuracy.
# The peer's 1.5B job with every frozen linear in FP8 (k and v included), and Llama-3.1-8B's shape with FP8 where
# train.fp8_min_features puts it by default (4096 and wider: all but k and v)
LEARN = ("micro_batch_tokens=12288", "train.lr=5e-4")
CASES["fp8-learn"] = Case("launcher", overrides=("train.fp8=true", "train.fp8_min_features=256", *LEARN))
CASES["fp8-learn-off"] = Case("launcher", overrides=("train.fp8=false", *LEARN))
CASES["fp8-learn-off-seed1"] = Case("launcher", overrides=("train.fp8=false", "seed=1", *LEARN))
CASES["8b-learn"] = Case("launcher", overrides=("train.fp8=true", *LEARN), preset=EIGHT_B)
CASES["8b-learn-off"] = Case("launcher", overrides=("train.fp8=false", *LEARN), preset=EIGHT_B)
CASES["8b-learn-backward"] = Case("launcher", overrides=("train.fp8=backward", *LEARN), preset=EIGHT_B)
CASES["8b-learn-seed1"] = Case("launcher", overrides=("train.fp8=true", "seed=1", *LEARN), preset=EIGHT_B)
CASES["8b-learn-off-seed1"] = Case("launcher", overrides=("train.fp8=false", "seed=1", *LEARN), preset=EIGHT_B)
CASES["8b-learn-backward-seed1"] = Case("launcher", overrides=("train.fp8=backward", "seed=1", *LEARN), preset=EIGHT_B)
# SFT has no difference of two forwards for FP8's rounding to land in: its held-out loss with FP8 against bf16, at
# the same 16 rows per step and lr 1e-3 (at 5e-5 no run's loss moved in 20 steps)
SFT_LEARN = ("micro_batch=16", "train.lr=1e-3")
for name, fp8 in (("", "true"), ("-backward", "backward"), ("-off", "false")):
    CASES[f"8b-sft-learn{name}"] = Case("launcher", "sft", overrides=(f"train.fp8={fp8}", *SFT_LEARN), preset=EIGHT_B)
CASES["8b-sft-learn-off-seed1"] = Case("launcher", "sft", overrides=("train.fp8=false", "seed=1", *SFT_LEARN),
                                       preset=EIGHT_B)
# lr 5e-3: at 1e-3 the held-out loss moved 0.1 in 20 steps, FP8 or not, too little to tell them apart
for name, extra in (("", ("train.fp8=true",)), ("-off", ("train.fp8=false",)), ("-off-seed1", ("train.fp8=false", "seed=1"))):
    CASES[f"8b-sft-learn-fast{name}"] = Case("launcher", "sft", overrides=(*extra, "micro_batch=16", "train.lr=5e-3"),
                                             preset=EIGHT_B)
# each decoder layer compiled (train.compile, accelerate's regional compilation) against the same case eager
COMPILE = ("train.compile=true",)
CASES["compile"] = Case("launcher", overrides=COMPILE)
CASES["sft-compile"] = Case("launcher", "sft", overrides=COMPILE)
CASES["real-compile"] = Case("launcher", overrides=COMPILE, mix="realistic")
CASES["real-sft-compile"] = Case("launcher", "sft", overrides=COMPILE, mix="realistic")
CASES["8b-compile"] = Case("launcher", overrides=("train.fp8=false", *COMPILE), preset=EIGHT_B)
CASES["8b-fp8-compile"] = Case("launcher", overrides=("train.fp8=true", *COMPILE), preset=EIGHT_B)
CASES["8b-sft-compile"] = Case("launcher", "sft", overrides=("train.fp8=false", *COMPILE), preset=EIGHT_B)
# the reference log-probs computed once before the first step (what auto does for 3+ epochs): the steps without
# the reference forward, and the time to the first step with the precompute in it
CASES["precompute"] = Case("launcher", overrides=("method.precompute_ref_log_probs=true",))
CASES["precompute-zero2"] = Case("launcher", overrides=("method.precompute_ref_log_probs=true", "strategy=zero2"))
DEFAULT_CASES = ("peer-ddp-bs32", "defaults", "ddp", "zero2", "zero3", "ddp-4bit", "fsdp_qlora-4bit", "zero3_offload")
# Another family: Gemma 2 (logit caps, eager attention over padded rows, a 256k vocabulary, tied embeddings), its
# memory plan against the measured peak where the scores take memory quadratic in the row's length
GEMMA2 = "gemma-2-2b-it"
CASES["real-gemma2-defaults"] = Case("launcher", preset=GEMMA2, mix="realistic")
CASES["real-gemma2-sft-defaults"] = Case("launcher", "sft", preset=GEMMA2, mix="realistic")
# ... and under flex attention, which keeps the cap (a score_mod) without the [row, row] scores
CASES["real-gemma2-flex"] = Case("launcher", preset=GEMMA2, mix="realistic",
                                 overrides=("model.attn_implementation=flex_attention",))
