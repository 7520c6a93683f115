"""Checks of the composed config, made before anything starts. Each failure names the key to change.

`check_values` looks at the config and the machine only; `check_paths` and `check_run_dir` read
(never write) the file system.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from launcher.checkpoints import MARKER, is_complete
from launcher.data_files import FILE_TYPES
from launcher.model_shape import model_config
from launcher.errors import ConfigError
from launcher import methods
from launcher.machine import Machine

BUILTIN_PREFIX = "builtin:"


def _whole(cfg, key: str, minimum: int, allow=()) -> int | str:
    value = cfg[key]
    if value in allow:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        hint = f" or {' / '.join(map(str, allow))}" if allow else ""
        raise ConfigError(key, f"{key}={value!r} is not a whole number; give an integer >= {minimum}{hint}.")
    if value < minimum:
        raise ConfigError(key, f"{key}={value} must be >= {minimum}.")
    return value


def procs_per_node(cfg, machine: Machine) -> tuple[int, bool]:
    """(processes per node, on GPU). gpus=auto on a machine without GPUs means CPU processes."""
    gpus = _whole(cfg, "gpus", 1, allow=("auto",))
    dry_run = bool(cfg["dry_run"])
    if gpus == "auto":
        if machine.gpu_count:
            return machine.gpu_count, True
        return _whole(cfg, "cpu_procs", 1), False
    if gpus > machine.gpu_count and not dry_run:
        have = f"{machine.gpu_count} visible GPU(s)" if machine.gpu_count else "no GPU"
        raise ConfigError(
            "gpus",
            f"gpus={gpus} but this machine has {have}. Use gpus=auto or a smaller number "
            "(or dry_run=true to only look at the plan for a bigger machine).",
        )
    return gpus, True


# Values the libraries take without a word where they make a run learn nothing (lora.alpha=0, a negative beta), or
# reject only once the ranks run: (key, whole number, lowest, lowest allowed, below this, null allowed)
RANGES = [("seed", True, 0, True, None, False),
          ("lora.r", True, 1, True, None, True), ("lora.alpha", False, 0, False, None, True),
          ("lora.dropout", False, 0, True, 1, True),
          ("data.test_fraction", False, 0, False, 1, False), ("data.max_rows", True, 1, True, None, True),
          ("train.warmup_ratio", False, 0, True, 1, False), ("train.weight_decay", False, 0, True, None, False),
          ("train.max_grad_norm", False, 0, True, None, True), ("train.eval_steps", True, 1, True, None, True),
          ("method.beta", False, 0, False, None, False), ("method.label_smoothing", False, 0, True, 0.5, False),
          ("method.gamma", False, 0, True, None, False), ("method.desirable_weight", False, 0, False, None, False),
          ("method.undesirable_weight", False, 0, False, None, False)]
SWITCHES = ("dry_run", "merge", "overwrite", "checkpoint_on_signal", "memory_plan")


def check_ranges(cfg) -> None:
    for key, whole, low, low_ok, below, null_ok in RANGES:
        group, _, name = key.rpartition(".")
        holder = cfg.get(group, {}) if group else cfg
        if name not in holder or (holder[name] is None and null_ok):
            continue
        value = holder[name]
        fine = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
        if not (fine and (value >= low if low_ok else value > low) and (below is None or value < below)):
            what = "a whole number" if whole else "a number"
            bounds = f"{'>=' if low_ok else '>'} {low}" + (f" and < {below}" if below is not None else "")
            raise ConfigError(key, f"{key}={value!r}: give {what} {bounds}{' (or null)' if null_ok else ''}.")
    for key in SWITCHES:
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(key, f"{key}={cfg[key]!r}: give true or false.")
    if cfg["data"].get("conversational", "auto") not in (True, False, "auto"):
        raise ConfigError("data.conversational", f"data.conversational={cfg['data']['conversational']!r}: give "
                                                 "true, false or auto.")


def check_values(cfg, machine: Machine) -> None:
    check_ranges(cfg)
    methods.check(cfg)
    if cfg["quant"]["bits"] and cfg["lora"]["r"] is None:  # before strategy=auto looks for a strategy
        raise ConfigError(
            "lora",
            f"quant={cfg['quant']['name']} with lora=none: quantized weights cannot be trained directly. "
            "Use lora=default (QLoRA), or quant=none for a full fine-tune.",
        )
    nodes = _whole(cfg, "nodes", 1)
    node_rank = _whole(cfg, "node_rank", 0)
    if node_rank >= nodes:
        raise ConfigError("node_rank", f"node_rank={node_rank} must be below nodes={nodes} (ranks count from 0).")
    if nodes > 1 and not cfg["master_addr"] and cfg["cluster"]["name"] == "local":
        raise ConfigError(
            "master_addr",
            f"nodes={nodes} needs master_addr=<host of node 0> (and the same master_port on every node); "
            "under Slurm the sbatch scripts set it from the allocation.",
        )
    if cfg["master_port"] is not None:
        port = _whole(cfg, "master_port", 1)
        if port > 65535:
            raise ConfigError("master_port", f"master_port={port} is not a TCP port (1-65535).")
    _whole(cfg, "micro_batch", 1, allow=("auto",))
    if cfg.get("micro_batch_tokens", "auto") not in ("auto", None):
        budget = _whole(cfg, "micro_batch_tokens", 1, allow=("auto", None))
        if cfg["micro_batch"] != "auto":
            raise ConfigError("micro_batch_tokens", f"micro_batch_tokens={budget} and micro_batch={cfg['micro_batch']} "
                                                    "both size the micro-batch: give one of them (tokens for "
                                                    "micro-batches of varying rows, micro_batch for a fixed count).")
    _whole(cfg, "save_steps", 1)
    for key in ("gradient_checkpointing", "liger", "fuse_lora_sum", "lora_dropout_kernel", "lora_one_node",
                "padding_free", "group_by_length"):
        value = cfg["train"][key]
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f"train.{key}", f"train.{key}={value!r}: give true, false or auto.")
    for key in ("step_clock", "trim_host_work"):
        if not isinstance(cfg["train"][key], bool):
            raise ConfigError(f"train.{key}", f"train.{key}={cfg['train'][key]!r}: give true or false.")
    if not isinstance(cfg.get("start_ranks_early", True), bool):
        raise ConfigError("start_ranks_early", f"start_ranks_early={cfg['start_ranks_early']!r}: give true or false.")
    if cfg["train"]["metrics_sync"] not in ("step", "log"):
        raise ConfigError("train.metrics_sync", f"train.metrics_sync={cfg['train']['metrics_sync']!r}: give step "
                                                "(TRL's gathers at every step) or log (once per log).")
    for key, example in (("gpu_mem_gib", "the GPU memory in GiB, e.g. gpu_mem_gib=80"),
                         ("host_mem_gib", "the host's RAM in GiB, e.g. host_mem_gib=256")):
        mem = cfg.get(key)
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0):
            raise ConfigError(key, f"{key}={mem!r}: give {example}.")
    for key, minimum in (("grad_accum", 1), ("epochs", 1), ("logging_steps", 1), ("save_total_limit", 1),
                         ("dataloader_workers", 0)):
        value = cfg["train"][key]
        auto_allowed = key == "dataloader_workers"
        if auto_allowed and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            also = " or auto" if auto_allowed else ""
            raise ConfigError(f"train.{key}", f"train.{key}={value!r} must be a whole number >= {minimum}{also}.")
    max_steps = cfg["train"]["max_steps"]
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps == 0 or max_steps < -1:
        raise ConfigError("train.max_steps", f"train.max_steps={max_steps!r}: give a number of steps >= 1, or -1.")
    lr = cfg["train"]["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError("train.lr", f"train.lr={lr!r} must be a positive number.")
    steps = cfg["train"]["profile_steps"]
    if steps is not None and not (isinstance(steps, list) and len(steps) == 2
                                  and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
                                  and 1 <= steps[0] <= steps[1]):
        raise ConfigError("train.profile_steps", f"train.profile_steps={steps!r}: give the first and last step to "
                                                 "profile, e.g. train.profile_steps=[6,8], or null.")
    max_length = cfg["data"]["max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise ConfigError("data.max_length", f"data.max_length={max_length!r} must be a whole number >= 8.")
    if cfg["resume"] not in (None, "auto") and not isinstance(cfg["resume"], str):
        raise ConfigError("resume", f"resume={cfg['resume']!r}: use resume=auto or resume=<checkpoint dir>.")


def is_local_path(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def check_paths(cfg) -> None:
    model = cfg["model"]
    for key in ("path", "tokenizer"):
        value = model[key]
        if not value or value.startswith(BUILTIN_PREFIX) or not is_local_path(value):
            continue  # a hub id: checked when it is downloaded
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"model.{key}", f"model.{key}={value} does not exist. Give a model directory or a hub id.")
        if not path.is_dir():
            raise ConfigError(
                f"model.{key}", f"model.{key}={value} is a file; give the directory that holds config.json."
            )
        if key == "path" and not (path / "config.json").is_file():
            raise ConfigError("model.path", f"model.path={value} holds no config.json: give the directory of a "
                                            "transformers checkpoint (config.json beside the weights).")
    template = model.get("chat_template")
    # a template is Jinja text or a file holding it: a path-like value that names no file would be taken as the
    # template's text, and every row would read as that path
    if template and "{" not in template and not Path(template).expanduser().is_file():
        raise ConfigError("model.chat_template", f"model.chat_template={template} is no file here and no Jinja "
                                                 "template: give a file that holds one, or the template's text.")
    resume = cfg["resume"]
    if resume not in (None, "auto") and not is_complete(Path(resume).expanduser()):
        raise ConfigError("resume", f"resume={resume} is not a complete checkpoint (no {MARKER} file inside). "
                                    "Use resume=auto to take the newest complete one in run_dir.")
    data_path = cfg["data"]["path"]
    # a file's name (pairs.jsonl) is no hub id: asking the hub for it would retry for half a minute, then mislead
    named_file = Path(data_path).suffix.lower() in FILE_TYPES
    if (is_local_path(data_path) or named_file) and not Path(data_path).expanduser().exists():
        raise ConfigError("data.path", f"data.path={data_path} does not exist. Give a file, a folder or a hub id.")
    check_context(cfg)


def check_context(cfg) -> None:
    """data.max_length within the positions the model was built for (config.json's max_position_embeddings, where
    on disk and with no rope_scaling to stretch them): past them, memory grows with no model to use it."""
    try:
        config = model_config(cfg["model"]) or {}
    except ValueError:
        return  # the memory plan names the file
    config = config.get("text_config", config) if "max_position_embeddings" not in config else config
    positions, max_length = config.get("max_position_embeddings"), cfg["data"]["max_length"]
    if isinstance(positions, int) and not config.get("rope_scaling") and max_length > positions:
        raise ConfigError("data.max_length", f"data.max_length={max_length} is over the {positions} positions "
                                             f"model.path={cfg['model']['path']} was built for "
                                             f"(max_position_embeddings): give data.max_length={positions} or less.")


def _can_make(run_dir: Path) -> None:
    """Whether run_dir can be made: its nearest existing parent is a directory where one can be made (tried with a
    folder of our own, removed at once: a read-only or virtual file system, /proc, says no only when asked)."""
    parent = next(p for p in run_dir.parents if p.exists())
    try:
        if not parent.is_dir():
            raise NotADirectoryError(parent)
        os.rmdir(tempfile.mkdtemp(prefix=".launcher-probe-", dir=parent))
    except OSError as err:
        raise ConfigError("run_dir", f"run_dir={run_dir} cannot be made under {parent} ({err.strerror or err}). "
                                     "Choose a run_dir in a folder you can write to.") from None


# What makes two runs "the same run": resuming with a different model or adapter shape cannot work.
IDENTITY_KEYS = (("model", "path"), ("method", "name"), ("lora", "r"), ("lora", "alpha"), ("lora", "target_modules"),
                 ("quant", "bits"))  # (alpha: the saved adapter's output scale; another would change what it computes)
# What a resume may change, and is told it did: what is learned from, and how
LEARNING_KEYS = (("data", "path"), ("data", "max_length"), ("train", "lr"), ("train", "lr_scheduler"),
                 ("method", "beta"), ("lora", "dropout"), ("seed",))


def _setting(config: dict, keys: tuple[str, ...]):
    """config["a"]["b"] for keys ("a", "b"); None where a level is missing (a config of an older version)."""
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def changed_since_last_launch(cfg) -> list[str]:
    """For a resume: the LEARNING_KEYS whose values differ from the run's config.yaml (its last launch's)."""
    try:
        old = yaml.safe_load(Path(cfg["run_dir"], "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [f"{'.'.join(keys)} {_setting(old, keys)!r} -> {_setting(cfg, keys)!r}" for keys in LEARNING_KEYS
            if _setting(old, keys) != _setting(cfg, keys)]


PARTIAL_WRITE = re.compile(r"^\..+\.tmp-\d+$")  # execute.prepare_run_dir's file before its rename


def check_run_dir(cfg) -> str:
    """'new', 'resume' or 'overwrite'. Refuses to touch a directory that holds another run, or one that cannot be
    made here (found now, not once the checks have passed and the ranks wait)."""
    run_dir = Path(cfg["run_dir"])
    if cfg["cluster"]["name"] == "slurm" and not shutil.which("sbatch"):
        raise ConfigError("cluster", "cluster=slurm submits the job with sbatch, which is not on PATH here: run it "
                                     "on a host of the cluster (a login node), or give cluster=local.")
    if not run_dir.exists():
        _can_make(run_dir)
        return "new"
    if not run_dir.is_dir():
        raise ConfigError("run_dir", f"run_dir={run_dir} is a file. Choose another run_dir.")
    if not [p for p in run_dir.iterdir() if not PARTIAL_WRITE.match(p.name)]:  # (a launch that could not write)
        return "new"
    saved = run_dir / "config.yaml"
    if not saved.is_file() and not (run_dir / "job.sbatch").is_file():  # never deleted, even with overwrite=true
        raise ConfigError(
            "run_dir",
            f"run_dir={run_dir} is not empty and holds no launcher run (no config.yaml, no job.sbatch). "
            "Choose another run_dir.",
        )
    if cfg["overwrite"]:
        return "overwrite"
    if cfg["resume"] is None:
        raise ConfigError(
            "run_dir",
            f"run_dir={run_dir} already holds a run. Use resume=auto to continue it, overwrite=true to replace it, "
            "or another run_dir (or run_name) for a new run.",
        )
    if not saved.is_file():
        return "resume"  # submitted with cluster=slurm; its job writes config.yaml
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("run_dir", f"{saved} cannot be read ({exc}); overwrite=true replaces the run.") from None
    differ = [f"{'.'.join(keys)}: {_setting(old, keys)!r} there, {_setting(cfg, keys)!r} now" for keys in IDENTITY_KEYS
              if _setting(old, keys) != _setting(cfg, keys)]
    if differ:
        raise ConfigError(
            "run_dir",
            f"run_dir={run_dir} holds a different run ({'; '.join(differ)}); its checkpoints cannot be resumed "
            "with this config. Use another run_dir, or overwrite=true to replace it.",
        )
    return "resume"


def prequantized(model_path: str) -> dict | None:
    """The quantization_config of a local checkpoint saved pre-quantized (bitsandbytes), or None."""
    path = Path(str(model_path)).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        quant = json.loads(path.read_text()).get("quantization_config")
    except json.JSONDecodeError as err:
        raise ConfigError("model.path", f"{path} is not JSON ({err}; cut short?): copy the model's config.json again "
                                        "from where the model came from.") from None
    return quant if quant and quant.get("quant_method") == "bitsandbytes" else None


def check_prequantized(cfg: dict, settings: dict) -> str | None:
    """A pre-quantized checkpoint is loaded as it was saved: the config must ask for what it holds. Returns the
    plan's decision line, or None where the checkpoint is not pre-quantized."""
    quant = prequantized(cfg["model"]["path"])
    if quant is None:
        return None
    where = f"model.path={cfg['model']['path']} (its config.json's quantization_config)"
    bits = 4 if quant.get("load_in_4bit") else 8
    if cfg["quant"]["bits"] != bits:
        raise ConfigError("quant", f"{where} holds {bits}-bit weights, quantized when it was saved: give "
                                   f"quant={bits}bit (its weights load as they are), or a 16-bit checkpoint.")
    if cfg["merge"]:
        raise ConfigError("merge", f"merge=true merges the adapter into the 16-bit base, and {where} holds "
                                   f"{bits}-bit weights only: give merge=false and merge onto the 16-bit model "
                                   "elsewhere (PeftModel.from_pretrained(base, <run_dir>/final).merge_and_unload()).")
    if bits == 4:
        stored = quant.get("bnb_4bit_quant_storage", "uint8")
        wanted = settings.get("quant_storage_dtype")
        if wanted != stored:
            if settings["strategy"] in ("fsdp_qlora", "zero3", "zero3_offload"):
                raise ConfigError("quant.storage_dtype", f"{where} stores its 4-bit weights as {stored}, and "
                                                         f"strategy={settings['strategy']} shards them only stored as "
                                                         f"{wanted}. Save the checkpoint with bnb_4bit_quant_storage="
                                                         f"{wanted} (python -m launcher.random_checkpoint --storage), "
                                                         "or use strategy=ddp.")
            settings["quant_storage_dtype"] = stored  # ddp and zero2 take either
        return (f"{where}: {quant.get('bnb_4bit_quant_type', 'nf4')} 4-bit weights stored as {stored}, loaded as "
                "they are (no quantizing on load)")
    return f"{where}: 8-bit weights, loaded as they are"
