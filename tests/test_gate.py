"""launcher/gate.py: ranks start while the launcher's checks run, and wait at a gate until they pass."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import GPU_NODE, compose_cfg, run_launcher
from launcher import gate
from launcher.plan import build_plan

WAITER = "from launcher import gate; print(f'waited {gate.wait():.2f}', flush=True)"


def test_the_plan_says_the_ranks_start_early_and_what_they_import_while_they_wait():
    plan = build_plan(compose_cfg("gpus=2", "strategy=zero2", "quant=none"), GPU_NODE)
    assert plan.settings["start_ranks_early"] is True
    assert any(d.startswith("start_ranks_early=true") for d in plan.decisions)
    assert plan.settings["gate_imports"] == ["datasets", "trl.trainer.dpo_trainer", "peft", "deepspeed"]
    plan = build_plan(compose_cfg("gpus=2", "strategy=ddp", "quant=4bit", "method=orpo",
                                  "start_ranks_early=false"), GPU_NODE)
    assert plan.settings["start_ranks_early"] is False and plan.settings["gate_imports"] == []
    assert not any("start_ranks_early" in d for d in plan.decisions)
    assert gate.imports_to_warm(compose_cfg("method=orpo", "quant=4bit", "lora=none"), {}) == [
        "datasets", "trl.experimental.orpo"]  # (bitsandbytes would ask CUDA for a device before the rank has one)
    several = build_plan(compose_cfg("gpus=2", "nodes=2", "master_addr=10.0.0.1", "overwrite=true"), GPU_NODE)
    assert several.settings["start_ranks_early"] is False  # every node replaces the shared run dir first
    assert any(d.startswith("start_ranks_early -> off: with overwrite=true") for d in several.decisions)


def test_only_the_files_the_launch_command_reads_come_from_the_gate_directory(tmp_path):
    plan = build_plan(compose_cfg("gpus=2", "strategy=fsdp_qlora", "backend=accelerate"), GPU_NODE)
    g = gate.Gate([])
    try:
        argv = g.stage(plan.argv, plan.files, plan.run_dir)
        staged = Path(argv[argv.index("--config_file") + 1])
        assert staged.parent == g.dir and staged.read_text() == plan.files["accelerate.yaml"]
        assert argv[-1] == plan.argv[-1] == f"{plan.run_dir}/config.yaml"  # the ranks read it after the gate
        assert [a for a in argv if a != str(staged)] == [a for a in plan.argv if not a.endswith("accelerate.yaml")]
    finally:
        g.remove()
    assert not g.dir.exists()


def _waiter(tmp_path, parent: int) -> subprocess.Popen:
    env = {**os.environ, gate.ENV: str(tmp_path), gate.PARENT_ENV: str(parent), gate.WARM_ENV: "json,no_such_module"}
    return subprocess.Popen([sys.executable, "-c", WAITER], env=env, stdout=subprocess.PIPE, text=True)


def test_a_rank_waits_for_go_and_leaves_when_its_launcher_is_gone(tmp_path):
    rank = _waiter(tmp_path, os.getpid())
    time.sleep(3)
    assert rank.poll() is None  # still at the gate
    (tmp_path / gate.GO).touch()
    out, _ = rank.communicate(timeout=30)
    assert rank.returncode == 0 and float(out.split()[1]) > 1.0

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / gate.GO).unlink()
    rank = _waiter(tmp_path, gone.pid)
    out, _ = rank.communicate(timeout=30)
    assert rank.returncode == 0 and out == ""  # it left without passing the gate


def _ranks_waiting(under: Path) -> list[int]:
    """pids of processes started with a gate directory under `under`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{gate.ENV}={under}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


def test_failed_checks_end_the_ranks_that_started_early_and_leave_the_run_dir_alone(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a"}) + "\n" for i in range(20)))
    run = tmp_path / "run"
    env = {"TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", f"run_dir={run}", f"data.path={data}"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = set(), time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        seen.update(_ranks_waiting(tmp_path))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "missing rejected" in err, err[-2000:]
    assert len(seen) >= 2, "no rank started while the checks ran"  # torchrun and its ranks carry the gate
    assert not _ranks_waiting(tmp_path)
    assert not run.exists() and not list(tmp_path.glob("launcher-gate-*"))
    assert "launcher: torchrun" not in out


def test_a_run_started_early_trains_after_the_checks(tmp_path):
    run = tmp_path / "run"
    res = run_launcher(f"run_dir={run}", "train.max_steps=2", "save_steps=2", "data.max_rows=40", "report.samples=0",
                       timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.index("launcher: data:") < res.stdout.index("launcher: torchrun")  # checks, then the launch
    for rank in (0, 1):
        waited = [line for line in Path(run, "logs", f"rank{rank}.log").read_text().splitlines()
                  if "waited" in line]
        assert waited and "for the launcher's checks" in waited[0]
    assert yaml.safe_load(Path(run, "config.yaml").read_text())["plan"]["start_ranks_early"] is True
