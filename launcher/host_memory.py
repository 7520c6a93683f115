"""Host memory plan: what one host's RAM must hold for a job, besides the GPUs' (launcher/memory.py).

Pure arithmetic, as memory.py. Three things take host RAM:

- every rank's process: Python, torch, CUDA's host side, the tokenized data (PROCESS_GIB each);
- loading, where the weights pass through the host on their way to the GPUs:
  - streamed (each tensor read from the checkpoint and moved to its GPU; ddp, 4-bit anywhere, ZeRO-3 under
    zero.Init): about one checkpoint shard per process;
  - whole in one process (FSDP's cpu_ram_efficient_loading over 16-bit weights: rank 0 reads the model, the
    others receive it): the 16-bit model once;
  - whole in every process (ZeRO-2 and ZeRO-3 without zero.Init over 16-bit weights: each rank builds the model
    on the CPU before DeepSpeed moves it): the 16-bit model per rank;
- ZeRO-3-offload's states in pinned CPU memory: the 16-bit parameters, and for each trainable one float32 master
  weights, gradients and AdamW's two moments (16 bytes), this host's share of them (its ranks' partitions).

Loading ends before training starts, so the peak is the processes plus the larger of loading and offloaded
states. The page cache that holds checkpoint files is not counted: the kernel gives it back under pressure.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
PROCESS_GIB = 4.0  # per rank
STREAM_GIB = 2.0  # per rank, while streaming a checkpoint to its GPU
OFFLOAD_BYTES_PER_TRAINABLE = 16  # float32 master weights, gradients, two AdamW moments
SAFETY = 0.9  # a plan fits when its peak stays under this share of the host's memory


@dataclass(frozen=True)
class Host:
    mem_gib: float | None  # None: unknown, not checked
    procs_per_node: int


@dataclass(frozen=True)
class HostEstimate:
    processes: float
    loading: float
    offloaded: float
    loading_how: str

    @property
    def total(self) -> float:
        return self.processes + max(self.loading, self.offloaded)


def loading_pattern(strategy: str, bits: int | None) -> str:
    """How the weights reach the GPUs: streamed, whole in one process, or whole in every process."""
    if bits or strategy in ("ddp", "zero3", "zero3_offload"):  # bnb quantizes on the GPU; ZeRO-3: zero.Init
        return "streamed"
    if strategy == "fsdp_qlora":
        return "whole in rank 0"
    return "whole in every rank"  # zero2 over 16-bit weights


def estimate(total_params: int, trainable_params: int, *, strategy: str, bits: int | None, world: int,
             procs_per_node: int, reference_copy: bool = False) -> HostEstimate:
    """GiB of host RAM at the peak, for one host running `procs_per_node` of the job's `world` ranks.
    reference_copy: DPO without LoRA loads a second (frozen) model the same way."""
    sixteen_bit = total_params * 2
    how = loading_pattern(strategy, bits)
    copies = 2 if reference_copy else 1
    if how == "streamed":
        loading = procs_per_node * STREAM_GIB * GIB
    elif how == "whole in rank 0":
        loading = sixteen_bit * copies
    else:
        loading = procs_per_node * sixteen_bit * copies
    offloaded = 0.0
    if strategy == "zero3_offload":
        share = procs_per_node / world  # each rank offloads its own partition
        offloaded = share * (sixteen_bit * copies + trainable_params * OFFLOAD_BYTES_PER_TRAINABLE)
    return HostEstimate(procs_per_node * PROCESS_GIB, loading / GIB, offloaded / GIB, how)


def fits(est: HostEstimate, host: Host | None) -> bool:
    return host is None or host.mem_gib is None or est.total <= host.mem_gib * SAFETY


def needed_gib(est: HostEstimate) -> int:
    """The host memory (whole GiB) this estimate fits in."""
    return int(-(-est.total // SAFETY))
