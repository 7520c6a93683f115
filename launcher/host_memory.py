"""Host memory plan: what one host's RAM must hold for a job, besides the GPUs' (launcher/memory.py).

Pure arithmetic, as memory.py. What takes host RAM (the page cache that holds checkpoint files is not counted:
transformers 5.17 reads safetensors memory-mapped, and the kernel gives that memory back under pressure):

- every rank's process: Python, torch, CUDA's host side, the data (PROCESS_GIB each, measured);
- loading: nothing more where the weights go from the mapped file to the GPUs (device_map, 4-bit anywhere,
  ZeRO-3's zero.Init, ZeRO-2 in the checkpoint's own dtype). FSDP's cpu_ram_efficient_loading over 16-bit
  weights is the exception: rank 0 reads the file, every other rank of the host fills a zeroed copy of the
  model in CPU memory to receive it into;
- saving, at every checkpoint and at the end: FSDP with FULL_STATE_DICT gathers the whole model (frozen base
  included) into rank 0's CPU memory, twice over (accelerate's get_state_dict, then save_fsdp_model): measured
  75 GiB above the processes for Llama-3.1-70B in 4 bits; ZeRO-2 copies the whole model to the CPU on every rank;
  ZeRO-3 without LoRA gathers the 16-bit model into rank 0; LoRA under ZeRO-3 and anything under ddp save the
  trained weights only (70B under ZeRO-3: 6.3 GiB for the whole run, processes included);
- ZeRO-3-offload's states in pinned CPU memory: the 16-bit parameters and, per trainable one, float32 master
  weights, gradients and AdamW's two moments (16 bytes), this host's share of them, with the half again that
  DeepSpeed's own estimate (estimate_zero3_model_states_mem_needs) adds for its buffers.

Loading ends before training starts; saving happens while the offloaded states are held. So the peak is the
processes plus the larger of loading and (offloaded states + saving).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
PROCESS_GIB = 3.0  # per rank: 70B under ZeRO-3 took 6.3 GiB for its two ranks, the run and its saves
OFFLOAD_BYTES_PER_TRAINABLE = 16  # float32 master weights, gradients, two AdamW moments
OFFLOAD_MARGIN = 1.5  # DeepSpeed's additional_buffer_factor
SAFETY = 0.9  # a plan fits when its peak stays under this share of the host's memory


@dataclass(frozen=True)
class Host:
    mem_gib: float | None  # None: unknown, not checked
    procs_per_node: int


@dataclass(frozen=True)
class HostEstimate:
    processes: float
    loading: float
    saving: float
    offloaded: float

    @property
    def total(self) -> float:
        return self.processes + max(self.loading, self.offloaded + self.saving)


def estimate(held_bytes: float, sixteen_bit_bytes: float, trainable_params: int, *, strategy: str, bits: int | None,
             lora: bool, world: int, procs_per_node: int, reference_copy: bool = False) -> HostEstimate:
    """GiB of host RAM at the peak, for one host running `procs_per_node` of the job's `world` ranks.
    held_bytes: the weights as the GPUs hold them (4-bit or 16-bit); reference_copy: DPO without LoRA loads a
    second, frozen model the same way."""
    copies = 2 if reference_copy else 1
    loading = 0.0
    if strategy == "fsdp_qlora" and not bits:
        loading = (procs_per_node - 1) * sixteen_bit_bytes * copies
    saving = 0.0
    if strategy == "fsdp_qlora":
        saving = 2 * held_bytes
    elif strategy == "zero2":
        saving = procs_per_node * held_bytes
    elif strategy.startswith("zero3") and not lora:
        saving = sixteen_bit_bytes
    offloaded = 0.0
    if strategy == "zero3_offload":
        share = procs_per_node / world  # each rank offloads its own partition
        offloaded = share * OFFLOAD_MARGIN * (sixteen_bit_bytes * copies
                                              + trainable_params * OFFLOAD_BYTES_PER_TRAINABLE)
    return HostEstimate(procs_per_node * PROCESS_GIB, loading / GIB, saving / GIB, offloaded / GIB)


def fits(est: HostEstimate, host: Host | None) -> bool:
    return host is None or host.mem_gib is None or est.total <= host.mem_gib * SAFETY


def needed_gib(est: HostEstimate) -> int:
    """The host memory (whole GiB) this estimate fits in."""
    return int(-(-est.total // SAFETY))
