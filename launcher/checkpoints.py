"""Checkpoints that are known to be whole.

The Trainer writes checkpoint-N from every rank that holds a part of it (DeepSpeed and FSDP shards).
After every rank has returned from the save, rank 0 writes checkpoint-N/COMPLETE; resume only ever
loads a checkpoint with that marker, so one cut short by a kill or a preemption is skipped.
Only `complete_marker_callback` needs transformers, so the launcher can check a resume path cheaply.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("launcher")
MARKER = "COMPLETE"
STOP_FILE = "STOP"  # <run_dir>/STOP asks a running job to checkpoint and exit (Slurm's warning signal writes it)
STOPPED_FILE = "STOPPED"  # written by rank 0 once that checkpoint is complete
EXIT_STOPPED = 75  # the launcher's exit code then: "stopped at a checkpoint, resume me" (EX_TEMPFAIL)
EXIT_NOTHING_LEFT = 3  # the preflight's: the checkpoint to resume is at train.max_steps already (the launch exits 0)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(run_dir: str) -> Path:
    return Path(run_dir, "checkpoints")


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def unreadable(folder: Path, model: bool = False) -> str | None:
    """Why a complete checkpoint (or, `model`, a model folder) cannot be loaded: a file cut short or lost since it
    was saved (a full disk, a download or copy broken off), or None. Reads what each file's loader reads first: a JSON
    file whole, a safetensors header (which covers the whole file), a torch file's zip directory (at its end); the
    tensors are not read. In a model folder only the files transformers loads are looked at (others, an OpenVINO or
    GGUF export beside them, are none of ours)."""
    import json
    import zipfile

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    if not model and not [f for f in files if f.name not in (MARKER, "adapter_config.json", "README.md")]:
        return f"it holds nothing but its {MARKER} marker (its files are gone)"
    for f in files:
        if model and not (f.name in MODEL_JSON or f.name.endswith((".safetensors", ".safetensors.index.json"))
                          or (f.name.startswith("pytorch_model") and f.suffix == ".bin")):
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), "np"):
                    pass
            elif f.suffix in (".pt", ".pth", ".bin") and not _pickled(f):  # torch.save's legacy format: not checked
                zipfile.ZipFile(f).close()
        except Exception as err:  # each library's own error: what matters is which file
            return f"{f.relative_to(folder)} cannot be read ({type(err).__name__}: {str(err)[:150]}; cut short?)"
    return None


MODEL_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


def _pickled(f: Path) -> bool:
    with open(f, "rb") as head:
        return head.read(1) == b"\x80"  # a pickle's protocol opcode

def describe_adapter(ckpt: Path, model) -> None:
    """Write the LoRA adapter's adapter_config.json into a checkpoint that lacks it.

    With sharded FSDP checkpoints (+strategy.fsdp.fsdp_state_dict_type=SHARDED_STATE_DICT) the Trainer saves
    only accelerate's shards (pytorch_model_fsdp_0/); with the config beside them the launcher's preflight
    can tell before any rank starts whether a resume fits (lora.r, base model).
    """
    peft_config = getattr(model, "peft_config", None)  # FSDP's wrapper hands attribute lookups to the PeftModel
    if peft_config and not (ckpt / "adapter_config.json").exists():
        next(iter(peft_config.values())).save_pretrained(str(ckpt))


def adapter_tensor_count(adapter_dir) -> int:
    """How many tensors a saved adapter holds (read from the safetensors header only); 0 where none was saved."""
    from safetensors import safe_open

    path = Path(adapter_dir, "adapter_model.safetensors")
    if not path.exists():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys()))


def require_adapter_weights(adapter_dir: Path) -> None:
    """Stop a run whose saved adapter came out empty: it would resume and merge as if it had never trained."""
    if (Path(adapter_dir) / "adapter_model.safetensors").exists() and not adapter_tensor_count(adapter_dir):
        raise RuntimeError(f"{adapter_dir}/adapter_model.safetensors was saved with no tensors: the adapter is lost "
                           "(see modeling.find_adapter_weights_under_fsdp1 for the case known so far)")


def complete_marker_callback():
    import torch.distributed as dist
    from transformers import TrainerCallback

    class CompleteMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has finished writing its part
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir, f"checkpoint-{state.global_step}")
                if ckpt.is_dir():
                    describe_adapter(ckpt, kwargs.get("model"))
                    require_adapter_weights(ckpt)
                    (ckpt / MARKER).write_text(f"{state.global_step}\n")
                    log.info("checkpoint %s complete", ckpt)

    return CompleteMarker()


def stop_request_callback(run_dir: str):
    """Checkpoint and stop at the end of the step in which <run_dir>/STOP appeared.

    Rank 0 looks for the file and every rank learns its answer in the same collective, so all ranks
    stop after the same step and take part in the same save.
    """
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    stop_file = Path(run_dir, STOP_FILE)

    class StopRequest(TrainerCallback):
        requested = False

        def on_step_end(self, args, state, control, **kwargs):
            wanted = state.is_world_process_zero and stop_file.exists()
            if dist.is_available() and dist.is_initialized():
                device = "cuda" if dist.get_backend() == "nccl" else "cpu"
                flag = torch.tensor([int(wanted)], device=device)
                dist.broadcast(flag, src=0)
                wanted = bool(flag.item())
            if wanted:
                self.requested = True
                control.should_save = True
                control.should_training_stop = True
                if state.is_world_process_zero:
                    log.info("%s found: saving a checkpoint at step %d and stopping", stop_file, state.global_step)

    return StopRequest()


def nothing_left(ckpt: str, max_steps: int) -> str | None:
    """Why resuming `ckpt` would train nothing: it is at train.max_steps or past it (the Trainer would run one step
    more, past the schedule's end, and save it). None where steps are left, or the run counts epochs."""
    step = int(m.group(1)) if (m := CHECKPOINT.match(Path(ckpt).name)) else None
    if step is None or max_steps is None or max_steps <= 0 or step < max_steps:
        return None
    return (f"{ckpt} is at step {step} and train.max_steps={max_steps}: nothing is left to train, and the run "
            f"directory stays as it is (give train.max_steps above {step} to train on from there)")


def find_resume(run_dir: str, resume) -> str | None:
    """The checkpoint to continue from: None for a fresh run. An explicit path was checked by the launcher."""
    if resume is None:
        return None
    if resume != "auto":
        return str(resume)
    found = sorted(
        ((int(m.group(1)), p) for p in checkpoints_dir(run_dir).glob("checkpoint-*")
         if (m := CHECKPOINT.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for step, path in found:
        if is_complete(path) and (why := unreadable(path)):
            log.warning("resume=auto: skipping %s: %s", path, why)
        elif is_complete(path):
            log.info("resume=auto: continuing from %s (step %d)", path, step)
            return str(path)
        else:
            log.warning("resume=auto: skipping %s: incomplete (no %s marker; cut short while saving)", path, MARKER)
    log.info("resume=auto: no complete checkpoint in %s, starting from step 0", checkpoints_dir(run_dir))
    return None
