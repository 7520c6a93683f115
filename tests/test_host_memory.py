"""The host memory plan (launcher/host_memory.py): what loading and ZeRO-3-offload need in RAM, and the planner
refusing a strategy the host cannot hold."""
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
    one_gpu = host_memory.estimate(n, n, strategy="zero3_offload", bits=None, world=1, procs_per_node=1)
    assert one_gpu.offloaded * GIB == pytest.approx(n * 2 + n * 16)
    assert 120 < one_gpu.total < 135  # the ~120 GiB of optimizer state the issue names, and the weights
    # two hosts of one rank each: each holds its rank's half
    two_hosts = host_memory.estimate(n, n, strategy="zero3_offload", bits=None, world=2, procs_per_node=1)
    assert two_hosts.offloaded == pytest.approx(one_gpu.offloaded / 2)
    lora = host_memory.estimate(n, QWEN_7B.lora_params(16, "all-linear"), strategy="zero3_offload", bits=None,
                                world=1, procs_per_node=1)
    assert lora.offloaded < 16  # an adapter's states are small; the 16-bit weights dominate


def test_loading_by_strategy():
    n = LLAMA_70B.total_params()

    def load(strategy, bits, procs=2):
        return host_memory.estimate(n, 0, strategy=strategy, bits=bits, world=2, procs_per_node=procs)

    assert load("fsdp_qlora", 4).loading_how == "streamed"  # 4-bit weights go straight to each rank's GPU
    assert load("fsdp_qlora", 4).total < 20
    assert load("fsdp_qlora", None).loading_how == "whole in rank 0"  # cpu_ram_efficient_loading
    assert load("fsdp_qlora", None).loading * GIB == pytest.approx(n * 2)
    assert load("zero2", None).loading * GIB == pytest.approx(2 * n * 2)  # every rank builds it on the CPU
    assert load("zero3", None).loading_how == "streamed"  # zero.Init


def test_auto_skips_what_the_host_cannot_hold_and_names_the_smallest_change():
    args = ("model=qwen2.5-7b-instruct", "quant=none", "lora=none", "method=sft", "gpus=1", "gpu_mem_gib=24",
            "strategy=auto")
    big = build_plan(compose_cfg(*args, "host_mem_gib=256"), GPU_NODE)
    assert big.strategy == "zero3_offload"
    assert any("host 1" in d and "ZeRO-3-offload states" in d and "fits)" in d for d in big.decisions), big.decisions
    with pytest.raises(ConfigError, match=r"smallest change that fits: gpus=4 \(then fsdp_qlora fits\)"):
        build_plan(compose_cfg(*args, "host_mem_gib=64"), GPU_NODE)  # more GPUs, the weights loaded once
    # 70B: more GPUs do not help, a host with the offloaded states' memory does; detected when not given
    big_model = ("model=llama-3.1-70b-instruct", "quant=none", "lora=none", "method=sft", "gpus=2", "strategy=auto")
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg(*big_model), replace(GPU_NODE, host_mem_gib=100.0))
    message = str(info.value)
    assert info.value.key == "strategy" and "this one has 100 GiB" in message and "then zero3_offload fits" in message
    need = int(message.split("a host with ")[1].split()[0])
    assert 1300 < need < 1500  # 70.6B x (2 + 16) bytes, and the processes


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
    assert host_memory_gib(str(meminfo)) == pytest.approx(251.7, abs=0.1)
    assert host_memory_gib(str(tmp_path / "absent")) is None


def test_plan_command_shows_the_host_column():
    res = run_launcher("plan", "model=llama-3.1-70b-instruct", "quant=none", "lora=none", "method=sft", "gpus=2",
                       "gpu_mem_gib=139.8", "host_mem_gib=100")
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("zero3_offload"))
    assert "NO (host)" in row
    assert "then zero3_offload fits" in res.stdout and "host: GiB of RAM on each host (of 100)" in res.stdout
