"""Every strategy for real on CUDA GPUs (run on the lent GPU machine: scripts/gpu_tests.sh). Skipped without CUDA.

Each case goes through `python -m launcher` like a user: the planned wrapper must be in effect (the
banner checks it and stops otherwise), the run must learn, checkpoint, and leave an adapter.
"""
import json
import shutil

import pytest

from conftest import run_launcher

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")]
GPUS = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 0

def rank_log(run) -> str:
    path = run / "logs" / "rank0.log"
    return path.read_text()[-4000:] if path.exists() else "(no rank0.log)"


CASES = [
    ("ddp", "none", "accelerate", "DistributedDataParallel"),
    ("ddp", "4bit", "torchrun", "DistributedDataParallel"),
    ("fsdp_qlora", "4bit", "accelerate", "FullyShardedDataParallel"),
    ("fsdp_qlora", "4bit", "torchrun", "FullyShardedDataParallel"),
    ("zero2", "none", "deepspeed", "DeepSpeedEngine"),
    ("zero2", "4bit", "accelerate", "DeepSpeedEngine"),
    ("zero3", "none", "deepspeed", "DeepSpeedEngine"),
    ("zero3", "4bit", "accelerate", "DeepSpeedEngine"),
    ("zero3_offload", "none", "deepspeed", "DeepSpeedEngine"),
]


@pytest.mark.parametrize("strategy,quant,backend,wrapper", CASES, ids=[f"{s}-{q}-{b}" for s, q, b, _ in CASES])
def test_strategy_runs_learns_and_saves(tmp_path, tiny_dir, strategy, quant, backend, wrapper):
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"strategy={strategy}", f"quant={quant}", f"backend={backend}", f"gpus={GPUS}",
            "train.max_steps=20", "save_steps=10", "train.lr=5e-4"]
    res = run_launcher(*args, timeout=900)
    assert res.returncode == 0, rank_log(run) + res.stdout[-2000:]
    assert f"wrapped in {wrapper if GPUS > 1 or strategy != 'ddp' else ''}" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_rewards/accuracies"] > 0.6
    assert (run / "checkpoints" / "checkpoint-20" / "COMPLETE").exists()
    assert (run / "final" / "adapter_config.json").exists()
    print("GPU-CASE", strategy, quant, backend, json.dumps(summary))


@pytest.mark.parametrize("strategy", ["zero3", "fsdp_qlora"])
def test_resume_continues_from_checkpoint(tmp_path, tiny_dir, strategy):
    run = tmp_path / "run"
    base = [f"run_dir={run}", f"strategy={strategy}", f"gpus={GPUS}", "save_steps=5", "train.save_total_limit=5"]
    if strategy == "fsdp_qlora":
        base.append("quant=4bit")
    first = run_launcher(*base, "train.max_steps=10", timeout=900)
    assert first.returncode == 0, rank_log(run) + first.stdout[-2000:]
    shutil.rmtree(run / "final")
    second = run_launcher(*base, "train.max_steps=15", "resume=auto", timeout=900)
    assert second.returncode == 0, rank_log(run) + second.stdout[-2000:]
    assert "(step 10)" in second.stdout
    assert json.loads((run / "summary.json").read_text())["global_step"] == 15
