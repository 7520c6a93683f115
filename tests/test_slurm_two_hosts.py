"""Two hosts under a real Slurm (tests/two_hosts.py): `sbatch --nodes=2` starts one launcher per host, the ranks
of both join one world over the hosts' own addresses, and a lost host ends the job on the other one too."""
import json
import os
import re
import signal
import sys
import time

import pytest

import two_hosts
from launcher import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if why := two_hosts.unavailable():
        pytest.skip(why)
    c = two_hosts.start(tmp_path_factory.mktemp("two-hosts"))
    try:
        c.wait_idle()
        yield c
    finally:
        two_hosts.stop(c)


def field(cluster, job: str, name: str) -> str:
    out = cluster.run("scontrol", "show", "job", job).stdout
    return next(tok.split("=", 1)[1] for tok in out.split() if tok.startswith(name + "="))


def wait(cluster, job: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while (state := field(cluster, job, "JobState")) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.time() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    return state


def sbatch(cluster, tmp_path, script: str, *overrides: str, options=()) -> str:
    res = cluster.run("sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
                      f"--output={tmp_path}/job.out", *options, f"slurm/{script}", *overrides,
                      env={"PWD": str(ROOT), "TMPDIR": str(tmp_path)})  # a launcher killed with its host leaves its
    # gate directory (launcher/gate.py) behind: in the test's own folder, not the machine's /tmp
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def job_processes(cluster, host: str) -> list[str]:
    """What runs in a host's namespace besides Slurm's own daemons."""
    names = []
    for pid in cluster.pids(host):
        try:
            names.append(open(f"/proc/{pid}/comm").read().strip())
        except OSError:
            continue
    return [n for n in names if n not in ("slurmctld", "slurmscriptd", "slurmd")]


def two_per_host(run) -> bool:
    """Ranks 0-1 on one host and 2-3 on the other (c10d hands node ranks out in arrival order: which host holds
    rank 0 varies), from each rank log's start line (the last launch's)."""
    hosts = hosts_of_ranks(run)
    return sorted(hosts) == [0, 1, 2, 3] and hosts[0] == hosts[1] != hosts[2] == hosts[3]


def hosts_of_ranks(run) -> dict:
    """rank -> host, from each rank log's start line (the last launch's)."""
    seen = {}
    for path in (run / "logs").glob("rank*.log"):
        starts = [line for line in path.read_text().splitlines() if "rank started:" in line]
        if starts:
            seen[int(path.stem[4:])] = starts[-1].rsplit("host ", 1)[-1]
    return seen


@pytest.mark.parametrize("script,metric", [("dpo.sbatch", "held-out reward accuracy"), ("sft.sbatch", "held-out loss")])
def test_a_job_on_two_hosts_joins_one_world(cluster, tmp_path, tiny_dir, script, metric):
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, script, f"run_dir={run}", "train.max_steps=6", "save_steps=3")
    state = wait(cluster, job)
    out = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", out[-4000:]
    assert "on 2 node(s), master 10.77.0.1:" in out and metric in out
    assert two_per_host(run), hosts_of_ranks(run)  # world size 4, 2 per host
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    assert (run / "plan.node1.json").exists() and (run / "command.node1.sh").exists()  # host B's own files


def test_a_lost_host_ends_the_job_on_both_and_resume_continues(cluster, tmp_path, tiny_dir):
    """--no-requeue: the shipped scripts' --requeue would have Slurm requeue the job after the lost node instead
    (it then waits for two hosts and resumes)."""
    run = tmp_path / "run"
    args = (f"run_dir={run}", "train.max_steps=300", "save_steps=5", "data.max_length=64")
    job = sbatch(cluster, tmp_path, "dpo.sbatch", *args, options=("--no-requeue",))
    deadline = time.time() + 300
    while not (run / "checkpoints" / "checkpoint-5" / "COMPLETE").exists():
        assert time.time() < deadline and field(cluster, job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    before_b = set(cluster.pids("hostb"))
    for pid in before_b:  # host B is gone: its slurmd, the launcher, its ranks
        os.kill(pid, signal.SIGKILL)
    lost = time.time()
    state = wait(cluster, job, timeout=120)
    assert time.time() - lost < 60, "the job outlived its lost host by a minute"
    assert state in ("FAILED", "NODE_FAIL"), state
    deadline = time.time() + 15  # the job's step daemons close after the state is recorded
    while left := job_processes(cluster, "hosta"):
        assert time.time() < deadline, f"processes of the job left on host A: {left}"
        time.sleep(0.5)
    out = (tmp_path / "job.out").read_text()
    on_b = min(r for r, host in hosts_of_ranks(run).items() if host == "hostb")
    assert f"first: rank{on_b} stopped without a word on hostb (killed" in out, out[-3000:]

    cluster.start_slurmd("hostb")
    cluster.run("scontrol", "update", "NodeName=hostb", "State=RESUME")
    cluster.wait_idle()
    job = sbatch(cluster, tmp_path, "dpo.sbatch", *args[:1], "train.max_steps=12", "save_steps=5",
                 "data.max_length=64")
    assert wait(cluster, job) == "COMPLETED", (tmp_path / "job.out").read_text()[-4000:]
    assert f"continuing from {run}/checkpoints/checkpoint-" in (tmp_path / "job.out").read_text()
    assert json.loads((run / "summary.json").read_text())["global_step"] == 12


def test_the_warning_signal_checkpoints_both_hosts_requeues_and_resumes(cluster, tmp_path, tiny_dir):
    """What --signal=B:USR1@300 sends before the time limit: every rank of both hosts checkpoints, the job
    requeues itself and the requeued job resumes on both hosts to the planned step."""
    run = tmp_path / "run"
    job = sbatch(cluster, tmp_path, "dpo.sbatch", f"run_dir={run}", "train.max_steps=40", "save_steps=100",
                 "data.max_length=64")
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists():
        assert time.time() < deadline and field(cluster, job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    deadline, hurried = time.time() + 900, False
    while (state := field(cluster, job, "JobState")) != "COMPLETED":
        assert state in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "CONFIGURING") and time.time() < deadline, \
            (state, (tmp_path / "job.out").read_text()[-3000:])
        if state == "PENDING" and field(cluster, job, "Reason") == "BeginTime" and not hurried:
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now+5")  # not Slurm's two minutes
            hurried = True
        time.sleep(0.5)
    out = (tmp_path / "job.out").read_text()
    assert field(cluster, job, "Restarts") == "1" and "requeueing job" in out
    stopped = int(re.search(r"stopped on request at step (\d+)", out).group(1))  # its checkpoint
    assert stopped < 40 and f"continuing from {run}/checkpoints/checkpoint-{stopped} (step {stopped})" in out
    assert two_per_host(run), hosts_of_ranks(run)  # the resumed launch's
    assert json.loads((run / "summary.json").read_text())["global_step"] == 40


def test_cluster_slurm_submits_to_two_hosts(cluster, tmp_path, tiny_dir):
    run = tmp_path / "run"
    res = cluster.run(sys.executable, "-m", "launcher", "cluster=slurm", "nodes=2",
                      f"cluster.cpus_per_task={os.cpu_count()}", f"run_dir={run}", "train.max_steps=4", "save_steps=4",
                      env={"PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().splitlines()[-1]
    assert wait(cluster, job) == "COMPLETED", next(run.glob("slurm-*.out")).read_text()[-4000:]
    assert two_per_host(run), hosts_of_ranks(run)
    assert json.loads((run / "summary.json").read_text())["global_step"] == 4
