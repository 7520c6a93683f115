"""A two-host Slurm cluster on one machine, for tests/test_slurm_two_hosts.py (root only).

Two network namespaces joined by a veth pair, each with its own address and host name (a UTS namespace per
daemon; /etc/hosts names both while the cluster is up); Debian's munged, one slurmctld and one slurmd per
namespace (NodeName hosta / hostb, NodeAddr their addresses). The project directory is the shared file system:
both namespaces see the same mounts. Slurm's commands reach the controller from host A's namespace (`TwoHosts.run`).
Torn down after the tests: every process left in either namespace, the namespaces (and the veth pair with them),
the /etc/hosts lines, and munged if it was started here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOSTS = {"hosta": "10.77.0.1", "hostb": "10.77.0.2"}
MARK = "# launcher-test-two-hosts"
# what both test clusters share: daemons as root, munge, no cgroups (the test machines have none to give)
SLURM_BASICS = """\
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
"""
CONF = """\
ClusterName=launcher2
SlurmctldHost=hosta({a})
""" + SLURM_BASICS + """\
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldPort=6917
SlurmdPort=6918
ReturnToService=2
SlurmdTimeout=20
MpiDefault=none
JobRequeue=1
MinJobAge=3600
NodeName=hosta NodeAddr={a} CPUs={cpus} RealMemory=4000 State=UNKNOWN
NodeName=hostb NodeAddr={b} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _sh(*cmd, check=True, env=None):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, env=env)


def unavailable() -> str | None:
    """Why the cluster cannot be built here, or None."""
    if os.geteuid() != 0:
        return "the two-host cluster needs root (network namespaces, the daemons)"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "ip", "nsenter", "unshare") if not shutil.which(b)]
    return f"not installed: {', '.join(missing)} (.ci/run installs Slurm)" if missing else None


@dataclass
class TwoHosts:
    dir: Path
    namespaces: dict  # host name -> network namespace name
    env: dict
    started_munged: bool

    def run(self, *cmd, host: str = "hosta", check=False, env=None, timeout=None):
        """A command in a host's network namespace (Slurm's commands: from host A, where the controller is)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.namespaces[host]}", *cmd], capture_output=True,
                              text=True, check=check, env={**self.env, **(env or {})}, timeout=timeout)

    def start_slurmd(self, host: str) -> None:
        daemon(self.namespaces[host], host, ["slurmd", "-N", host], self.env)

    def pids(self, host: str) -> list[int]:
        out = _sh("ip", "netns", "pids", self.namespaces[host], check=False).stdout.split()
        return [int(p) for p in out]

    def wait_idle(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
            if states.count("idle") == 2:
                return
            if time.time() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in sorted(self.dir.glob("*.log")))
                raise AssertionError(f"the two hosts are not idle: {states}\n{logs}")
            time.sleep(0.5)


def daemon(netns: str, hostname: str, argv: list[str], env: dict) -> None:
    """A daemon in a network namespace under its own host name (it forks into the background itself)."""
    _sh("unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec nsenter --net=/run/netns/{netns} "$@"', "sh",
        *argv, env=env)


def start_munged() -> bool:
    """munged, unless one runs already; whether it was started here (then the tests stop it)."""
    if _sh("munge", "-n", check=False).returncode == 0:
        return False
    for sub in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        os.makedirs(sub, exist_ok=True)
    _sh("munged", "--force")
    return True


def start(d: Path) -> TwoHosts:
    tag = str(os.getpid() % 100000)
    names = {host: f"lt{tag}{host[-1]}" for host in HOSTS}
    a, b = names["hosta"], names["hostb"]
    _sh("ip", "netns", "add", a)
    _sh("ip", "netns", "add", b)
    _sh("ip", "link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b")
    for host, ns in names.items():
        dev = f"v{tag}{host[-1]}"
        _sh("ip", "link", "set", dev, "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{HOSTS[host]}/24", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    with open("/etc/hosts", "a") as f:  # real clusters resolve their host names; torchrun and gloo need it
        f.writelines(f"{addr} {host} {MARK}\n" for host, addr in HOSTS.items())
    for sub in ("state", "spool"):
        (d / sub).mkdir(exist_ok=True)
    (d / "slurm.conf").write_text(CONF.format(a=HOSTS["hosta"], b=HOSTS["hostb"], d=d, cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    cluster = TwoHosts(d, names, env, start_munged())
    daemon(a, "hosta", ["slurmctld"], env)
    for host in HOSTS:
        cluster.start_slurmd(host)
    return cluster


def stop(cluster: TwoHosts) -> None:
    for host, ns in cluster.namespaces.items():
        for pid in cluster.pids(host):  # the daemons and whatever a job left
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        _sh("ip", "netns", "del", ns, check=False)  # its end of the veth pair goes with it
    lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
    Path("/etc/hosts").write_text("".join(line for line in lines if MARK not in line))
    if cluster.started_munged:
        _sh("pkill", "-x", "munged", check=False)
