"""The host memory plan (launcher/host_memory.py): what loading and ZeRO-3-offload need in RAM, and the planner
refusing a strategy the host cannot hold."""
import re
from dataclasses import replace

import pytest

from conftest import GPU_NODE, compose_cfg, run_launcher
from launcher import host_memory, memory
from launcher.errors import ConfigError
from launcher.machine import host_memory_gib
from launcher.plan import build_plan

GIB = 2**30
QWEN_7B = memory.Shape(3584, 18944, 28, 28, 4, 152064, False)
LLAMA_70B = memory.Shape(8192, 28672, 80, 64, 8, 128256, False)


def test_offloaded_full_fine_tune_holds_16_bit_weights_and_16_bytes_per_trainable_weight():
    n = QWEN_7B.total_params()

    def offload(world, procs, trainable=n, lora=False):
        return host_memory.estimate(n * 2, n * 2, trainable, strategy="zero3_offload", bits=None, lora=lora,
                                    world=world, procs_per_node=procs)

    one_gpu = offload(1, 1)
    assert one_gpu.offloaded * GIB == pytest.approx(1.5 * (n * 2 + n * 16))  # with DeepSpeed's own margin
    assert one_gpu.saving * GIB == pytest.approx(n * 2)  # the 16-bit model gathered into rank 0 to save it
    assert 200 < one_gpu.total < 220
    assert offload(2, 1).offloaded == pytest.approx(one_gpu.offloaded / 2)  # two hosts: each its rank's half
    lora = offload(1, 1, QWEN_7B.lora_params(16, "all-linear"), lora=True)
    assert lora.offloaded < 25 and lora.saving == 0  # an adapter's states are small; the 16-bit weights dominate


def test_loading_and_saving_by_strategy():
    """What 70B in 4 bits measured on 2x H200 (docs/memory.md): fsdp_qlora's saves gather the whole 4-bit model
    into rank 0, twice over (78.8 GiB in use at the peak); ZeRO-3 with LoRA took 6.3 GiB."""
    def plan(strategy, bits=4, procs=2):
        cfg = compose_cfg("model=llama-3.1-70b-instruct", f"quant={'4bit' if bits else 'none'}")
        return memory.host_estimate(cfg, LLAMA_70B, strategy, procs, procs)

    assert plan("fsdp_qlora").total == pytest.approx(78.8, rel=0.2)
    assert plan("fsdp_qlora").loading == 0  # 4-bit weights: from the mapped file to each rank's GPU
    assert plan("zero3").total == pytest.approx(6.3, rel=0.2)
    sixteen_bit = LLAMA_70B.total_params() * 2 / GIB
    # over 16-bit weights the other ranks of the host fill a zeroed copy to receive rank 0's weights into
    assert plan("fsdp_qlora", bits=None, procs=8).loading == pytest.approx(7 * sixteen_bit)
    assert plan("zero2", bits=None).saving == pytest.approx(2 * sixteen_bit)  # every rank copies it to save
    assert plan("ddp").saving == 0 and plan("ddp").loading == 0


def test_auto_skips_what_the_host_cannot_hold_and_names_the_smallest_change():
    args = ("model=qwen2.5-7b-instruct", "quant=none", "lora=none", "method=sft", "gpus=1", "gpu_mem_gib=24",
            "strategy=auto")
    big = build_plan(compose_cfg(*args, "host_mem_gib=256"), GPU_NODE)
    assert big.strategy == "zero3_offload"
    line = next(d for d in big.decisions if d.startswith("memory plan: "))
    assert re.search(r"host 2\d\d GiB of 256 \(saving 14 GiB, ZeRO-3-offload states 19\d GiB, fits\)", line), line
    dry = build_plan(compose_cfg(*args, "dry_run=true"), replace(GPU_NODE, gpu_count=0, host_mem_gib=8.0))
    assert dry.strategy == "zero3_offload"  # planned on a machine without GPUs: its memory is not the job's
    with pytest.raises(ConfigError, match=r"smallest change that fits: gpus=4 \(then fsdp_qlora fits\)"):
        build_plan(compose_cfg(*args, "host_mem_gib=64"), GPU_NODE)  # more GPUs, the weights loaded once
    # 70B: more GPUs do not help, a host with the offloaded states' memory does; detected when not given
    big_model = ("model=llama-3.1-70b-instruct", "quant=none", "lora=none", "method=sft", "gpus=2", "strategy=auto")
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg(*big_model), replace(GPU_NODE, host_mem_gib=100.0))
    message = str(info.value)
    assert info.value.key == "strategy" and "this one has 100 GiB" in message and "then zero3_offload fits" in message
    need = int(message.split("a host with ")[1].split()[0])
    assert 2000 < need < 2300  # 70.6B x (2 + 16) bytes x DeepSpeed's 1.5, the 16-bit model saved, the processes


def test_an_explicit_strategy_over_the_host_is_warned_about():
    plan = build_plan(compose_cfg("model=qwen2.5-7b-instruct", "quant=none", "lora=none", "method=sft", "gpus=1",
                                  "gpu_mem_gib=24", "strategy=zero3_offload", "micro_batch=1", "host_mem_gib=64"),
                      GPU_NODE)
    assert any("WARNING: over the host memory there is" in d for d in plan.decisions)


def test_bad_host_memory_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg("host_mem_gib=lots", "gpus=2"), GPU_NODE)
    assert info.value.key == "host_mem_gib" and "host_mem_gib=256" in str(info.value)


def test_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       263921072 kB\nMemFree:        1000 kB\n")
    absent = str(tmp_path / "absent")
    assert host_memory_gib(str(meminfo), absent) == pytest.approx(251.7, abs=0.1)
    assert host_memory_gib(absent, absent) is None
    limit = tmp_path / "memory.max"
    limit.write_text(f"{64 * 2**30}\n")  # a Slurm job's --mem=64G
    assert host_memory_gib(str(meminfo), str(limit)) == pytest.approx(64)
    limit.write_text("max\n")
    assert host_memory_gib(str(meminfo), str(limit)) == pytest.approx(251.7, abs=0.1)


def test_plan_command_shows_the_host_column():
    res = run_launcher("plan", "model=llama-3.1-70b-instruct", "quant=none", "lora=none", "method=sft", "gpus=2",
                       "gpu_mem_gib=139.8", "host_mem_gib=100")
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("zero3_offload"))
    assert "NO (host)" in row
    assert "then zero3_offload fits" in res.stdout and "host: GiB of RAM on each host (of 100)" in res.stdout


def test_plan_without_gpus_here_says_what_the_host_needs():
    res = run_launcher("plan", "model=qwen2.5-7b-instruct", "quant=none", "lora=none", "method=sft", "gpus=1",
                       "gpu_mem_gib=24")
    assert res.returncode == 0, res.stderr
    assert "strategy=auto would take zero3_offload" in res.stdout
    assert re.search(r"zero3_offload needs 2\d\d GiB of RAM per host; host_mem_gib=N checks it", res.stdout)
