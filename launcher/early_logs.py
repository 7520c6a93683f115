"""The log records of the libraries a rank imports before it knows where its logs go (launcher/console.py setup):
some warn as they are imported (bitsandbytes via transformers and peft, DeepSpeed), and some of that is known
noise. Imports nothing heavy, so that launcher/train.py and launcher/preflight.py can set this up before their
first library import."""
from __future__ import annotations

import atexit
import logging
import logging.handlers
import sys

# (logger name prefix, words of the message): seen on our own runs, harmless, and printed once per rank
KNOWN_NOISE = (
    # accelerate 1.15 wrapping DDP: the deprecated name is what the Trainer passes for ddp_broadcast_buffers
    ("py.warnings", "`broadcast_buffers` is deprecated"),
    # bitsandbytes on CPUs with AVX512-BF16 when the optional `kernels` package is absent: it falls back
    ("bitsandbytes", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # DeepSpeed imported on a machine without GPUs (the CPU runs of ZeRO)
    ("DeepSpeed", "Setting accelerator to CPU"),
    # torch's barrier before the process group knows its device (accelerate's main_process_first; 2x H200)
    ("py.warnings", "barrier(): using the device under current context"),
    # Liger's optional backends for other hardware (CuTe DSL, Ascend) that this machine does not have (2x H200)
    ("liger_kernel.backends", "could not be imported"),
    # TRL 1.16 on `use_liger_kernel`, which is how transformers' Trainer applies Liger's kernels (2x H200)
    ("py.warnings", "`use_liger_kernel=True` is deprecated"),
)


class KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(source) and words in message for source, words in KNOWN_NOISE)


early_records = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)


def hold() -> None:
    """Keep the records until console.setup sends them where they go; printed to stderr at exit if it never ran
    (a rank that died before it)."""
    logging.captureWarnings(True)  # Python's own filters still decide which warnings are raised at all
    logging.getLogger().addHandler(early_records)
    atexit.register(_print_held_records)


def _print_held_records() -> None:
    noise = KnownNoise()
    for record in early_records.buffer:
        if record.levelno >= logging.WARNING and noise.filter(record):
            print(f"{record.name}: {record.levelname}: {record.getMessage()}", file=sys.stderr)
    early_records.buffer.clear()


def to_stderr_without_known_noise() -> None:
    """For a process that has no rank logs (launcher/preflight.py): library warnings go to stderr, known noise
    does not."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    handler.addFilter(KnownNoise())
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)
