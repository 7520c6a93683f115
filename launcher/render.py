"""Rendering: the shipped files in accelerate_configs/ and ds_configs/ are the templates; a run's
copies differ only where the plan says (process counts, nodes, precision, paths, offload).
Every function here is pure: data in, data out.
"""
from __future__ import annotations

import copy
import json
import shlex
from functools import cache

import yaml

from launcher.resources import shipped
from launcher.strategies import Strategy

TRAIN_MODULE = "launcher.train"


@cache
def accelerate_template(strategy: str) -> dict:
    return yaml.safe_load((shipped("accelerate_configs") / f"{strategy}.yaml").read_text())


@cache
def deepspeed_template(name: str) -> dict:
    return json.loads((shipped("ds_configs") / name).read_text())


def mixed_precision(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")


def laid_over(base: dict, overrides: dict) -> dict:
    """A copy of base with overrides laid over it, nested dicts key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = laid_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render_accelerate_config(
    strategy: Strategy,
    settings: dict,
    *,
    procs_per_node: int,
    nodes: int,
    master_addr: str | None,
    master_port: int,
    deepspeed_config_path: str | None,
    fsdp_overrides: dict | None = None,
) -> dict:
    cfg = copy.deepcopy(accelerate_template(strategy.name))
    cfg["num_processes"] = procs_per_node * nodes
    cfg["num_machines"] = nodes
    if "deepspeed_config" not in cfg:  # accelerate refuses mixed_precision beside a DeepSpeed JSON: it says "auto"
        cfg["mixed_precision"] = mixed_precision(settings["dtype"])
    if settings["device"] == "cpu":
        cfg.update(distributed_type="MULTI_CPU", use_cpu=True)
    if nodes > 1:
        cfg["main_process_ip"] = master_addr
        cfg["main_process_port"] = master_port
    if "deepspeed_config" in cfg:
        cfg["deepspeed_config"]["deepspeed_config_file"] = deepspeed_config_path
        cfg["deepspeed_config"]["zero3_init_flag"] = settings["zero3_init"]
    if "fsdp_config" in cfg:
        cfg["fsdp_config"] = laid_over(cfg["fsdp_config"], fsdp_overrides or {})
        if settings.get("fsdp_cpu_offload"):
            cfg["fsdp_config"]["fsdp_offload_params"] = True
        if settings.get("fsdp_adapters_in_layers"):  # frozen and trainable weights in one flat parameter
            cfg["fsdp_config"]["fsdp_use_orig_params"] = True
    return cfg


def render_deepspeed_config(strategy: Strategy, overrides: dict | None = None) -> dict | None:
    if not strategy.deepspeed_template:
        return None
    cfg = laid_over(deepspeed_template(strategy.deepspeed_template), overrides or {})
    if strategy.name.startswith("zero3"):
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def render_command(
    backend: str,
    *,
    procs_per_node: int,
    nodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int,
    rdzv_id: str,
    accelerate_config_path: str,
    train_config_path: str,
) -> list[str]:
    """The argv that starts every rank on this node."""
    script = ["-m", TRAIN_MODULE, train_config_path]
    if backend == "accelerate":
        argv = ["accelerate", "launch", "--config_file", accelerate_config_path]
        if nodes > 1:
            argv += ["--machine_rank", str(node_rank)]
        else:
            argv += ["--main_process_port", str(master_port)]
        return argv + script
    if backend == "torchrun":
        argv = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(procs_per_node)]
        if nodes > 1:
            argv += ["--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"{master_addr}:{master_port}", "--rdzv-id", rdzv_id]
        else:
            argv += ["--standalone"]  # torchrun finds a free port itself
        return argv + script
    if backend == "deepspeed":
        argv = ["deepspeed"]
        if nodes > 1:
            argv += ["--num_nodes", str(nodes), "--num_gpus", str(procs_per_node), "--node_rank", str(node_rank),
                     "--master_addr", str(master_addr), "--master_port", str(master_port), "--no_ssh"]
        else:
            argv += ["--num_gpus", str(procs_per_node), "--master_port", str(master_port)]
        return argv + ["--no_local_rank", "--module", TRAIN_MODULE, train_config_path]
    raise ValueError(f"unknown backend {backend}")


def render_command_script(argv: list[str], env: dict[str, str], cwd: str) -> str:
    """A shell script that repeats the launch by hand, every value quoted."""
    lines = ["#!/usr/bin/env bash", "# Repeats this launch by hand (on this node: each node has its own command file).",
             "set -euo pipefail", f"cd {shlex.quote(cwd)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"
