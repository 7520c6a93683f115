"""Slurm and multi-node: the rendered sbatch (pure), two nodes on one machine, and a real one-node Slurm
(Debian's slurmctld, slurmd and munge, started here when installed; .ci/run installs them). Two hosts, a lost host
and `cluster=slurm nodes=2`: tests/test_slurm_two_hosts.py."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import GPU_NODE, compose_cfg, run_launcher
from launcher import ROOT
from launcher.plan import build_plan
from two_hosts import SLURM_BASICS, start_munged


def test_sbatch_for_this_config_passes_the_overrides_quoted(tmp_path):
    run_dir = f"{tmp_path}/a b;$(touch {tmp_path}/pwned)"
    overrides = ["cluster=slurm", "nodes=2", "gpus=8", "strategy=zero3", "run_name='my run'", f"run_dir='{run_dir}'"]
    plan = build_plan(compose_cfg(*overrides), GPU_NODE, cwd="/work/project", overrides=overrides)
    script = plan.files["job.sbatch"]
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --signal=B:USR1@300\n" in script and "#SBATCH --requeue\n" in script
    assert plan.argv[:4] == ["sbatch", "--parsable", "--output", f"{run_dir}/slurm-%j.out"]
    # run by bash, the exec line hands launch.sh exactly these arguments; nothing is executed
    exec_line = script.strip().splitlines()[-1].replace("exec bash", "printf '%s\\n'", 1)
    args = subprocess.run(["bash", "-c", exec_line], capture_output=True, text=True, check=True).stdout.splitlines()
    assert args[1:] == ["gpus=8", "strategy=zero3", "run_name='my run'", f"run_dir='{run_dir}'", "resume=auto"]
    assert not (tmp_path / "pwned").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_join_one_world(tmp_path, tiny_dir):
    """Two launchers, node ranks 0 and 1, one rendezvous on localhost: one world of 2, trained together."""
    run, port = tmp_path / "run", free_port()
    common = ["-m", "launcher", f"run_dir={run}", "nodes=2", "cpu_procs=1", "master_addr=127.0.0.1",
              f"master_port={port}", "resume=auto", "train.max_steps=6", "save_steps=3"]
    nodes = [subprocess.Popen([sys.executable, *common, f"node_rank={r}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    # c10d hands out global ranks in arrival order: the banner comes from whichever node holds rank 0
    assert (outs[0] + outs[1]).count("world size 2 (torchrun), strategy ddp, wrapped in DistributedDataParallel") == 1
    assert "--node-rank 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in outs[1]
    assert (run / "logs" / "rank0.log").exists() and (run / "logs" / "rank1.log").exists()
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    assert (run / "command.sh").exists() and (run / "command.node1.sh").exists()


# ---- a real Slurm ---------------------------------------------------------------------------------

SLURM_CONF = """ClusterName=launchertest
SlurmctldHost={host}
""" + SLURM_BASICS + """\
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={p1}
SlurmdPort={p2}
ReturnToService=2
MpiDefault=none
JobRequeue=1
MinJobAge=3600
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _run(*cmd, env=None, check=True):
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=check)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster on this machine; yields the environment that points the Slurm commands at it."""
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("Slurm is not installed (.ci/run installs slurmctld slurmd munge slurm-client)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(SLURM_CONF.format(host=host, d=d, p1=free_port(), p2=free_port(),
                                                    cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    started_munged = start_munged()
    _run("slurmctld", env=env)
    _run("slurmd", env=env)
    deadline = time.time() + 60
    while "idle" not in _run("sinfo", "-h", "-o", "%t", env=env, check=False).stdout:
        assert time.time() < deadline, (d / "slurmctld.log").read_text()[-2000:] + (d / "slurmd.log").read_text()[-2000:]
        time.sleep(0.5)
    yield env
    for pidfile in ("slurmd.pid", "slurmctld.pid"):
        if (d / pidfile).exists():
            subprocess.run(["kill", (d / pidfile).read_text().strip()], check=False)
    if started_munged:  # a munged that was running before the tests stays
        subprocess.run(["pkill", "-x", "munged"], check=False)


def job_field(env, job: str, field: str) -> str:
    out = _run("scontrol", "show", "job", job, env=env).stdout
    return next(tok.split("=", 1)[1] for tok in out.split() if tok.startswith(field + "="))


def wait_job(env, job: str, timeout=600, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
    deadline, seen, hurried = time.time() + timeout, [], False
    while (state := job_field(env, job, "JobState")) not in until:
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "PENDING" and job_field(env, job, "Reason") == "BeginTime" and not hurried:
            # A requeued job waits two minutes before it may start again; the test waits 5 s. Not less:
            # slurmd refuses a restart in the second its credential was revoked ("Job credential revoked").
            _run("scontrol", "update", f"JobId={job}", "StartTime=now+5", env=env)
            hurried = True
        assert time.time() < deadline, f"job {job} still {state} ({job_field(env, job, 'Reason')})"
        time.sleep(0.2)
    print("job", job, "states:", " -> ".join(seen + [state]))
    return state


@pytest.mark.slow
def test_sbatch_dpo_runs_the_embedded_default(slurm, tmp_path, tiny_dir):
    run = tmp_path / "run"
    job = _run("sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}", f"--output={tmp_path}/job.out", "slurm/dpo.sbatch",
               f"run_dir={run}", "train.max_steps=8", "save_steps=4", env={**slurm, "PWD": str(ROOT)}).stdout.strip()
    assert wait_job(slurm, job) == "COMPLETED", (tmp_path / "job.out").read_text()[-4000:]
    assert job_field(slurm, job, "ExitCode") == "0:0"
    out = (tmp_path / "job.out").read_text()
    assert "on 1 node(s), master" in out and "held-out reward accuracy" in out
    assert json.loads((run / "summary.json").read_text())["global_step"] == 8


@pytest.mark.slow
def test_warning_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, tiny_dir):
    run = tmp_path / "run"
    job = _run("sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}", f"--output={tmp_path}/job.out", "slurm/dpo.sbatch",
               f"run_dir={run}", "train.max_steps=400", "save_steps=100", "data.max_length=64",
               env=slurm).stdout.strip()
    deadline = time.time() + 300
    while not list(run.glob("metrics.jsonl")):
        assert time.time() < deadline and job_field(slurm, job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    _run("scancel", "--signal=USR1", "--batch", job, env=slurm)  # what --signal=B:USR1@300 sends
    assert wait_job(slurm, job, timeout=900) == "COMPLETED", (tmp_path / "job.out").read_text()[-4000:]
    out = (tmp_path / "job.out").read_text()
    assert job_field(slurm, job, "Restarts") == "1"
    assert "warning signal: checkpoint, then requeue" in out and "requeueing job" in out
    stopped = [int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/checkpoint-*/COMPLETE")]
    assert "(restart 1)" in out and f"continuing from {run}/checkpoints/checkpoint-" in out
    assert json.loads((run / "summary.json").read_text())["global_step"] == 400
    assert min(stopped) < 400
