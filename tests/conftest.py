import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from launcher import ROOT
from launcher.config import register_resolvers, to_plain
from launcher.machine import Machine, find_free_port

register_resolvers()

# A fixed machine, so that plans (and golden files) do not depend on where the tests run.
GPU_NODE = Machine(gpu_count=8, gpu_name="NVIDIA H200", gpu_mem_gib=139.8, bf16=True, fp8=True, hostname="node0",
                   free_port=29555)
CPU_NODE = Machine(gpu_count=0, hostname="cpu0", free_port=29556)
FIXED = ["run_name=golden", "run_dir=/runs/golden", "model.cache_dir=/cache"]


def compose_cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_plain(compose("config", overrides=[*FIXED, *overrides]))


def run_launcher(*args: str, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` as a user types it."""
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (rank 0's logs, one JSON object per line)."""
    return [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]


def untrained_adapters(final: Path) -> list[str]:
    """The LoRA B matrices of a saved adapter still at their initial zeros: an adapter whose gradients never
    arrived. Fails if the adapter holds no LoRA B matrix at all."""
    from safetensors.torch import load_file

    weights = load_file(Path(final, "adapter_model.safetensors"))
    assert any("lora_B" in name for name in weights), f"{final}: no lora_B among {len(weights)} tensors"
    return sorted(name for name, w in weights.items() if "lora_B" in name and not w.abs().sum())


def lora_model(tiny_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"),
                          LoraConfig(r=4, target_modules="all-linear"))


def lora_model_with_b(tiny_dir, value: float):
    """lora_model with every lora_B at `value`: at its initial zeros a saved adapter would hold nothing to check,
    and lora_A would get no gradient."""
    import torch

    model = lora_model(tiny_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(value)
    return model


@pytest.fixture
def cache_dir() -> Path:
    """The shared cache of built-in models (built once per machine, reused by every test)."""
    path = Path(os.environ.get("LAUNCHER_CACHE", Path.home() / ".cache" / "launcher"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The embedded tiny model, built as the launcher builds it (once per cache)."""
    from launcher.plan import model_paths

    paths = model_paths(compose_cfg("model.cache_dir=" + os.environ.get(
        "LAUNCHER_CACHE", str(Path.home() / ".cache" / "launcher")))["model"])
    if not Path(paths["model_path"], "config.json").exists():
        import json

        subprocess.run([sys.executable, "-m", "launcher.tiny", json.dumps(paths["builtin_shape"]),
                        paths["builtin_dir"]], check=True)
    return Path(paths["builtin_dir"])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


def pytest_runtest_logreport(report):
    """With TEST_REPORT_FILE set, write each failure there as it happens (scripts/gpu_tests.sh sets it).

    On a lent GPU machine the command limit can stop pytest before its summary; under xdist the failure
    texts would then be lost with it.
    """
    path = os.environ.get("TEST_REPORT_FILE")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when}, {report.duration:.0f} s)\n{report.longreprtext}\n\n")


# ZeRO-3 for real on DeepSpeed's CPU accelerator (gloo). The launcher refuses DeepSpeed on a CPU machine (it
# is not for training there), so the test takes the plan it makes for GPUs and turns it to the CPU by hand.
# DeepSpeed 0.19.8's leaf-module step (the whole-layer fetch) calls grad.record_stream, a CUDA allocator call
# that CPU tensors refuse; on the CPU there is no stream to record, so the shim makes it a no-op.
ZERO3_ON_CPU = """
import sys, deepspeed, torch
torch.Tensor.record_stream = lambda self, stream: None
deepspeed.init_distributed(dist_backend="gloo")  # the Trainer, told use_cpu, does not start DeepSpeed's comm
from launcher import train
sys.exit(train.main(sys.argv[1]))
"""


def zero3_on_cpu(tmp_path, tiny_dir, *overrides):
    """A run directory planned for ZeRO-3 on 2 GPUs, and a function that trains it on the CPU."""
    from launcher.plan import build_plan

    run = tmp_path / "zero3"
    run.mkdir()
    plan = build_plan(compose_cfg("strategy=zero3", "gpus=2", "micro_batch=4", "save_steps=2", f"run_dir={run}",
                                  f"model.cache_dir={tiny_dir.parent}", *overrides), GPU_NODE)
    for name, text in plan.files.items():
        (run / name).write_text(text)
    ds = json.loads((run / "ds_config.json").read_text())
    ds["bf16"]["enabled"] = ds["fp16"]["enabled"] = False
    (run / "ds_config.json").write_text(json.dumps(ds))
    (tmp_path / "zero3_on_cpu.py").write_text(ZERO3_ON_CPU)

    def train(max_steps, plan_changes=None, **changes):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["plan"].update(device="cpu", dtype="float32", deepspeed_config=str(run / "ds_config.json"),
                           **(plan_changes or {}))
        cfg["train"]["max_steps"] = max_steps
        cfg["report"]["samples"] = 0  # ZeRO-3 generates on every rank over gloo: 8-12 s; one test asks for it
        cfg.update(changes)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(find_free_port()), str(tmp_path / "zero3_on_cpu.py"),
                               str(run / "config.yaml")], capture_output=True, text=True, timeout=300, env=env)

    return run, train
