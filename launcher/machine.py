"""What the planner needs to know about this machine, found without importing torch.

nvidia-smi answers in a fraction of a second; importing torch to ask CUDA takes seconds, and the
dry run must stay fast. CUDA_VISIBLE_DEVICES is honoured the way CUDA honours it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    gpu_count: int = 0
    gpu_name: str | None = None
    gpu_mem_gib: float | None = None
    bf16: bool = False  # every visible GPU has compute capability >= 8.0
    fp8: bool = False  # every visible GPU has FP8 tensor cores (compute capability >= 8.9)
    hostname: str = "localhost"
    free_port: int = 29500
    busy_ports: frozenset = frozenset()  # of the ports asked about, those something here already listens on
    liger: bool = False  # liger-kernel is installed (found, not imported: it pulls in triton)
    triton: bool = False  # triton is installed (torch's CUDA builds bring it)
    deepspeed: bool = True  # deepspeed is installed (strategy=auto only picks ZeRO where it is)
    host_mem_gib: float | None = None  # this host's RAM (MemTotal)

    @property
    def runs_triton(self) -> bool:
        """Triton installed and GPUs it runs on (compute capability 8.0+ for triton 3, as for bf16); with no GPU
        visible, a plan is for GPUs as current ones are."""
        return self.triton and (self.bf16 or not self.gpu_count)


def _query_nvidia_smi() -> list[tuple[str, str, float, float]]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        idx, name, mem_mib, cc = (part.strip() for part in line.split(","))
        rows.append((idx, name, float(mem_mib) / 1024, float(cc)))
    return rows


def _visible(rows, cuda_visible: str | None):
    if cuda_visible is None:
        return rows
    wanted = [v.strip() for v in cuda_visible.split(",") if v.strip() and v.strip() != "-1"]
    return [r for r in rows if r[0] in wanted][: len(wanted)]


def find_free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def host_memory_gib(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup/memory.max") -> float | None:
    """MemTotal, or the cgroup's limit where it is lower (a Slurm job's --mem, a container): where the OOM
    killer acts."""
    total = None
    try:
        with open(meminfo) as f:
            total = next((int(line.split()[1]) / 2**20 for line in f if line.startswith("MemTotal:")), None)  # kB
        with open(cgroup) as f:
            limit = f.read().strip()
        if total and limit.isdigit():
            total = min(total, int(limit) / 2**30)
    except OSError:
        pass
    return total


def detect_machine(ports=()) -> Machine:
    rows = _visible(_query_nvidia_smi(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return Machine(
        gpu_count=len(rows),
        gpu_name=rows[0][1] if rows else None,
        gpu_mem_gib=min(r[2] for r in rows) if rows else None,
        bf16=bool(rows) and all(r[3] >= 8.0 for r in rows),
        fp8=bool(rows) and all(r[3] >= 8.9 for r in rows),
        hostname=socket.gethostname(),
        free_port=find_free_port(),
        busy_ports=frozenset(p for p in ports if isinstance(p, int) and 0 < p < 65536 and port_in_use(p)),
        liger=importlib.util.find_spec("liger_kernel") is not None,
        triton=importlib.util.find_spec("triton") is not None,
        deepspeed=importlib.util.find_spec("deepspeed") is not None,
        host_mem_gib=host_memory_gib(),
    )
