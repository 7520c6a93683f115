"""The planner: composed config + machine -> LaunchPlan, a plain data object.

Nothing here starts a process, writes a file or imports a training library; `launcher.execute`
does the doing. A dry run prints the plan.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
from dataclasses import asdict, dataclass, field

import yaml

from launcher import compiling, fp8, gate, host_memory, lora_dropout, memory, methods, slurm, validate
from launcher.batching import decide_batching
from launcher.errors import ConfigError
from launcher.host_memory import Host
from launcher.machine import Machine
from launcher.render import render_accelerate_config, render_command, render_command_script, render_deepspeed_config
from launcher.strategies import decide, resolve_backend, resolve_strategy

ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "ds_config.json"
CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.sh"
PLAN_FILE = "plan.json"
DEFAULT_MULTINODE_PORT = 29500
BUILTIN_VERSION = "v1"  # bump when launcher/tiny.py builds something different
# Passed through to every rank; the launcher never writes a secret into a file, only inherits it.
BASE_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class LaunchPlan:
    backend: str
    strategy: str
    run_dir: str
    argv: list[str]
    env: dict[str, str]
    files: dict[str, str] = field(repr=False)  # file name in run_dir -> content
    settings: dict = field(repr=False)  # config.yaml's `plan:` section: what launcher.train carries out
    decisions: list[str]
    procs_per_node: int
    nodes: int
    node_rank: int
    world_size: int
    device: str

    def summary(self) -> dict:
        d = asdict(self)
        d["files"] = sorted(self.files)
        del d["settings"]  # in config.yaml
        return d

    def describe(self) -> str:
        lines = [
            f"run_dir:   {self.run_dir}",
            f"strategy:  {self.strategy} on {self.device}, backend {self.backend}",
            f"world:     {self.nodes} node(s) x {self.procs_per_node} process(es) = {self.world_size}"
            + (f", this is node {self.node_rank}" if self.nodes > 1 else ""),
            "decisions:",
            *[f"  - {d}" for d in self.decisions or ["(none beyond the defaults)"]],
            "env:",
            *[f"  {k}={v}" for k, v in sorted(self.env.items())],
            "command:",
            "  " + shlex.join(self.argv),
            f"files:     {', '.join(sorted(self.files))} (written into run_dir; config.yaml: --cfg job shows it)",
        ]
        for name in sorted(self.files):
            if name.startswith(("command", "plan")) or name == CONFIG_FILE:
                continue
            lines += [f"--- {name}", self.files[name].rstrip()]
        return "\n".join(lines)


def model_paths(model: dict) -> dict:
    """Where launcher.train loads from; `builtin:NAME` models are built into the cache on first use."""
    path = model["path"]
    if path.startswith(validate.BUILTIN_PREFIX):
        name = path[len(validate.BUILTIN_PREFIX):]
        base = os.path.join(os.path.expanduser(model["cache_dir"]), f"{name}-{BUILTIN_VERSION}")
        return {"model_path": f"{base}/model", "tokenizer_path": model["tokenizer"] or f"{base}/tokenizer",
                "builtin_model": name, "builtin_dir": base, "builtin_shape": model["shape"]}
    return {"model_path": path, "tokenizer_path": model["tokenizer"] or path, "builtin_model": None,
            "builtin_dir": None, "builtin_shape": None}


def plan_slurm_submission(cfg: dict, overrides: list[str], cwd: str) -> LaunchPlan:
    """cluster=slurm: write job.sbatch and submit it; each node of the job then plans its own launch."""
    files = {slurm.SBATCH_FILE: slurm.render_sbatch(cfg, overrides, cwd)}
    argv = slurm.submit_argv(cfg)
    gpus = cfg["gpus"] if cfg["gpus"] != "auto" else 0
    decisions = [f"sbatch: {cfg['nodes']} node(s), one launcher per node (slurm/launch.sh: master address, port and "
                 "node rank from Slurm), resume=auto, checkpoint + requeue on the warning signal"]
    files[COMMAND_FILE] = render_command_script(argv, {}, cwd)
    plan = LaunchPlan(backend="sbatch", strategy=cfg["strategy"]["name"], run_dir=cfg["run_dir"], argv=argv, env={},
                      files=files, settings={}, decisions=decisions, procs_per_node=gpus, nodes=cfg["nodes"],
                      node_rank=0, world_size=gpus * cfg["nodes"], device="cuda" if gpus else "per node")
    files[PLAN_FILE] = json.dumps(plan.summary(), indent=2) + "\n"
    return plan


def node_file(name: str, node_rank: int) -> str:
    """Files that differ per node get the node's rank in their name (nodes share the run directory)."""
    if node_rank == 0:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem}.node{node_rank}{ext}"


def with_liger(cfg: dict, on_gpu: bool, installed: bool) -> dict:
    """train.liger=auto made true or false: on where the job runs on GPUs and liger-kernel is installed."""
    if cfg["train"]["liger"] != "auto":
        return cfg
    return dict(cfg, train=dict(cfg["train"], liger=on_gpu and installed))


def host_of(cfg: dict, machine: Machine, procs_per_node: int) -> Host:
    """host_mem_gib, or this host's memory where it has the GPUs to run on (a plan made on a login node or a
    laptop is for another machine: its memory is unknown unless given)."""
    return Host(cfg.get("host_mem_gib") or (machine.host_mem_gib if machine.gpu_count else None), procs_per_node)


def size_the_job(cfg: dict, machine: Machine, world: int, on_gpu: bool, decisions: list[str],
                 procs_per_node: int | None = None) -> dict:
    """train.liger, train.lora_dropout_kernel and train.fp8 settled (they change the memory needed), then
    strategy=auto, micro_batch=auto and train.gradient_checkpointing=auto from the memory plan (launcher/memory.py,
    launcher/host_memory.py); a copy of cfg, resolved. FP8 that train.fp8=auto turned on is kept only where its
    weight copies leave the sizing as it is without them: the job is sized both ways. LoRA's dropout kernel runs
    wherever train.lora_dropout_kernel=auto can run it, LoRA's one node too (launcher/lora_dropout.py)."""
    cfg = with_liger(copy.deepcopy(cfg), on_gpu, machine.liger)
    kernel_auto = cfg["train"].get("lora_dropout_kernel", "auto") == "auto"
    one_node_auto = cfg["train"].get("lora_one_node", "auto") == "auto"
    cfg = lora_dropout.resolved(cfg, on_gpu, machine.runs_triton)
    cfg = lora_dropout.one_node_resolved(cfg, on_gpu, machine.runs_triton)
    sized = size_with_fp8(cfg, decisions, machine=machine, world=world, on_gpu=on_gpu, procs_per_node=procs_per_node)
    strategy = sized["strategy"]["name"]
    if kernel_auto:  # on only where it runs under the strategy sized for (zero3 and FSDP run PEFT's forward)
        sized = dict(sized, train=dict(sized["train"], lora_dropout_kernel=lora_dropout.in_kernel(sized, strategy)))
    if one_node_auto and sized["train"]["lora_one_node"]:
        runs = lora_dropout.one_node_why_not(sized, strategy) is None
        sized = dict(sized, train=dict(sized["train"], lora_one_node=runs))
    return sized


def size_with_fp8(cfg: dict, decisions: list[str], *, machine: Machine, world: int, on_gpu: bool,
                  procs_per_node: int | None) -> dict:
    """The job sized, with FP8 where train.fp8 asks for it (auto: sized both ways)."""
    fp8_auto = cfg["train"].get("fp8", "auto") == "auto"
    fp8_lines: list[str] = []
    cfg = fp8.with_fp8(cfg, on_gpu, fp8_gpus(machine), fp8_lines, known_shape(cfg))
    if not (fp8_auto and cfg["train"]["fp8"]):
        decisions += fp8_lines
        return size_for_memory(cfg, machine, world, on_gpu, decisions, procs_per_node)
    without, without_lines = dict(cfg, train=dict(cfg["train"], fp8=False)), []
    sized_without = size_for_memory(without, machine, world, on_gpu, without_lines, procs_per_node)
    with_lines: list[str] = []
    try:
        sized = size_for_memory(cfg, machine, world, on_gpu, with_lines, procs_per_node)
    except ConfigError:
        sized = None
    if sized and not fits_as_sized(sized, machine, world) and fits_as_sized(sized_without, machine, world):
        sized = None  # a micro_batch given: sizing changed nothing, but the copies would not fit beside it
    if why := fp8.why_auto_drops_it(sized, sized_without):
        decisions += [f"train.fp8=auto -> off: {why}", *without_lines]
        return sized_without
    decisions += fp8_lines + with_lines
    return sized


def gpu_estimate(cfg: dict, machine: Machine, world: int, shape: memory.Shape | None,
                 token_budget: int | None = None) -> tuple[memory.Estimate, float] | None:
    """The memory plan's peak per GPU for cfg as sized, and the GPU memory; None where it cannot say (GPU memory or
    the model unknown, or a strategy the plan does not cover)."""
    gpu_mem, name = cfg["gpu_mem_gib"] or machine.gpu_mem_gib, cfg["strategy"]["name"]
    if not gpu_mem or shape is None or not memory.supported(name, cfg["quant"]["bits"], cfg["lora"]["r"]):
        return None
    return memory.job_estimate(cfg, shape, name, world, cfg["micro_batch"], tokens=token_budget), gpu_mem


def fits_as_sized(cfg: dict, machine: Machine, world: int) -> bool:
    """The memory plan's verdict for cfg as sized; True where it cannot say."""
    planned = gpu_estimate(cfg, machine, world, known_shape(cfg))
    return planned is None or memory.fits(*planned)


def size_for_memory(cfg: dict, machine: Machine, world: int, on_gpu: bool, decisions: list[str],
                    procs_per_node: int | None = None) -> dict:
    """strategy, micro_batch and gradient checkpointing where they are auto, for cfg as it is (a copy)."""
    cfg = copy.deepcopy(cfg)
    auto_strategy, auto_mb = cfg["strategy"]["name"] == "auto", cfg["micro_batch"] == "auto"
    auto_gc = cfg["train"]["gradient_checkpointing"] == "auto"
    gpu_mem = cfg["gpu_mem_gib"] or machine.gpu_mem_gib
    host = host_of(cfg, machine, procs_per_node or world)
    if not on_gpu or not gpu_mem:
        if auto_strategy:
            cfg["strategy"] = dict(cfg["strategy"], name="ddp")
            decisions.append("strategy=auto -> ddp: " + ("the GPU memory is unknown here (give gpu_mem_gib= to "
                                                         "choose by it)" if on_gpu else "the only strategy on the CPU"))
        if auto_mb:
            cfg["micro_batch"] = 4
            decisions.append("micro_batch=auto -> 4: " + (
                "no GPU visible to size it to (give gpu_mem_gib=)" if on_gpu else "no GPU memory to size it to"))
        if auto_gc:
            cfg["train"]["gradient_checkpointing"] = on_gpu
            decisions.append("train.gradient_checkpointing=auto -> " + (
                "on: the GPU memory is unknown" if on_gpu else "off: no GPU memory to save"))
        return cfg
    try:
        shape = memory.model_shape(cfg["model"])
    except ValueError as err:
        if auto_strategy or auto_mb:
            raise ConfigError("model.shape", f"{err}: the memory plan needs the model's dimensions (or give "
                                             "strategy=<name> and micro_batch=<n> to launch without it)") from None
        if auto_gc:
            cfg["train"]["gradient_checkpointing"] = True
            decisions.append(f"train.gradient_checkpointing=auto -> on: {err}")
        return cfg
    # backend=deepspeed, or DeepSpeed settings given: strategy=auto chooses among the DeepSpeed strategies
    ds_only = cfg["backend"] == "deepspeed" or bool(cfg["strategy"].get("deepspeed"))
    # a checkpoint saved in 4 bits stored as uint8 cannot be sharded (FSDP and ZeRO-3 need the compute dtype)
    saved = validate.prequantized(cfg["model"]["path"]) or {}
    exclude = (("fsdp_qlora", "zero3", "zero3_offload")
               if saved.get("load_in_4bit") and saved.get("bnb_4bit_quant_storage", "uint8") == "uint8" else ())
    if auto_gc:  # decided for the strategy asked for, or the fastest that fits without checkpointing
        name = cfg["strategy"]["name"]
        if auto_strategy:
            without = dict(cfg, train=dict(cfg["train"], gradient_checkpointing=False))
            name = memory.choose(without, shape, world, gpu_mem, cfg["micro_batch"], machine.deepspeed,
                                 ds_only, host, exclude)[0] or "ddp"
        on, why = memory.checkpointing_pays(cfg, shape, name, world, gpu_mem, cfg["micro_batch"])
        cfg["train"]["gradient_checkpointing"] = on
        decisions.append(f"train.gradient_checkpointing=auto -> {why}")
    if auto_strategy:
        name, mb, why = memory.choose(cfg, shape, world, gpu_mem, cfg["micro_batch"], machine.deepspeed, ds_only,
                                      host, exclude)
        if name is None:
            raise ConfigError("strategy", f"strategy=auto: no strategy fits {gpu_mem:.0f} GiB per GPU with this "
                                          f"config; the smallest change that fits: "
                                          f"{memory.smallest_change(cfg, shape, world, gpu_mem, host)}")
        cfg["strategy"] = dict(cfg["strategy"], name=name)  # with any strategy.deepspeed / strategy.fsdp given
        decisions.append(f"strategy=auto -> {why}" + (" among the DeepSpeed ones (backend=deepspeed or strategy."
                                                       "deepspeed settings)" if ds_only else ""))
        if auto_mb:
            cfg["micro_batch"] = mb
            decisions.append(f"micro_batch=auto -> {mb}: the largest that fits under {name}")
    elif auto_mb:
        name = cfg["strategy"]["name"]
        mb = memory.largest_micro_batch(cfg, shape, name, world, gpu_mem)
        if not mb:
            raise ConfigError("micro_batch", f"micro_batch=auto: not even 1 fits {gpu_mem:.0f} GiB per GPU under "
                                             f"strategy={name}; the smallest change that fits: "
                                             f"{memory.smallest_change(cfg, shape, world, gpu_mem, host)}")
        cfg["micro_batch"] = mb
        decisions.append(f"micro_batch=auto -> {mb}: the largest that fits under {name}")
    return cfg


def fp8_gpus(machine: Machine) -> bool:
    """FP8 tensor cores here; or no GPU visible, where a dry run plans for GPUs as current ones are (as for bf16)."""
    return machine.fp8 or not machine.gpu_count


def known_shape(cfg: dict):
    """The model's dimensions (launcher/memory.py), or None where neither its config.json nor a preset gives them."""
    try:
        return memory.model_shape(cfg["model"])
    except ValueError:
        return None


def memory_decision(cfg: dict, machine: Machine, world: int, token_budget: int | None, shape: memory.Shape | None,
                    procs_per_node: int | None = None) -> str | None:
    """The memory plan's peak per GPU and per host for the job as planned (a token budget counted as its tokens)."""
    planned = gpu_estimate(cfg, machine, world, shape, token_budget)
    if planned is None:
        return None
    (est, gpu_mem), name = planned, cfg["strategy"]["name"]
    verdict = "fits" if memory.fits(est, gpu_mem) else "WARNING: over the memory there is, expect OOM"
    line = f"memory plan: {est.total:.1f} GiB per GPU predicted of {gpu_mem:.0f} GiB ({verdict})"
    host = host_of(cfg, machine, procs_per_node or world)
    if host.mem_gib:
        on_host = memory.host_estimate(cfg, shape, name, world, host.procs_per_node)
        fits = host_memory.fits(on_host, host)
        parts = [f"{what} {gib:.0f} GiB" for what, gib in (("loading", on_host.loading), ("saving", on_host.saving),
                                                              ("ZeRO-3-offload states", on_host.offloaded)) if gib]
        line += (f"; host {on_host.total:.0f} GiB of {host.mem_gib:.0f} ({', '.join(parts + [''])}"
                 f"{'fits' if fits else 'WARNING: over the host memory there is, expect the OOM killer'})")
    return line


def rendezvous_id(master_addr: str | None, master_port: int) -> str:
    """torchrun's --rdzv-id: every node must give the same one. The endpoint is what the nodes share by
    definition; run_name is not (its default is a time stamp each node takes for itself, a second apart)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"launcher-{master_addr}-{master_port}")


def build_plan(cfg: dict, machine: Machine, cwd: str | None = None, overrides: list[str] = ()) -> LaunchPlan:
    """cfg: the resolved config as plain containers, run_dir absolute. overrides: the command line's, which
    cluster=slurm passes on to the job."""
    validate.check_values(cfg, machine)
    if cfg["cluster"]["name"] == "slurm":
        return plan_slurm_submission(cfg, list(overrides), cwd or os.getcwd())
    procs, on_gpu = validate.procs_per_node(cfg, machine)
    decisions: list[str] = []
    if on_gpu and not machine.gpu_count:
        decisions.append("no GPU visible here: planned for GPUs with bf16 and FP8 (compute capability 8.9+, e.g. H100; "
                         "dry run)")
    micro_batch_was_auto = cfg["micro_batch"] == "auto"
    cfg = size_the_job(cfg, machine, procs * cfg["nodes"], on_gpu, decisions, procs)
    methods.check(cfg)  # again, with micro_batch sized
    strategy = resolve_strategy(cfg["strategy"]["name"])
    cfg = methods.with_precompute(cfg, strategy.name, decisions)
    if not on_gpu and strategy.name != "ddp":
        raise ConfigError(
            "strategy",
            f"strategy={strategy.name} needs CUDA GPUs (FSDP and DeepSpeed do not run on the CPU); this machine "
            "has none. Use strategy=ddp here, or gpus=N dry_run=true to look at the plan for a GPU machine.",
        )
    backend = resolve_backend(cfg, strategy, on_gpu)
    nodes, node_rank = cfg["nodes"], cfg["node_rank"]
    world_size = procs * nodes
    settings, rule_decisions = decide(cfg, strategy, world_size, on_gpu, machine.bf16 or not machine.gpu_count,
                                      machine.liger)
    decisions += rule_decisions
    shape = known_shape(cfg)
    fp8_settings, line = fp8.decide_fp8(cfg, strategy.name, shape)
    settings.update(fp8_settings)
    decisions += [line] if line else []
    for decide_lora_kernel in (lora_dropout.decide, lora_dropout.decide_one_node):
        kernel_settings, line = decide_lora_kernel(cfg, strategy.name)
        settings.update(kernel_settings)
        decisions += [line] if line else []
    compile_settings, line = compiling.decide_compile(cfg, on_gpu, strategy.name)
    settings.update(compile_settings)
    decisions += [line] if line else []
    if line := validate.check_prequantized(cfg, settings):
        decisions.append(line)
    batch_settings, batch_decisions = decide_batching(cfg, on_gpu, micro_batch_was_auto, world_size)
    settings.update(batch_settings)
    decisions += batch_decisions
    if on_gpu and (line := memory_decision(cfg, machine, world_size, batch_settings["token_budget"], shape, procs)):
        decisions.append(line)
    settings["start_ranks_early"], line = gate.decide(cfg)
    decisions += [line] if line else []
    if not on_gpu:
        decisions.append(f"no GPU: {procs} CPU processes, torchrun with the gloo backend, float32")

    master_port = cfg["master_port"]
    if master_port in machine.busy_ports:
        if nodes == 1:
            decisions.append(f"master_port={master_port} is in use here: using free port {machine.free_port}")
            master_port = None
        elif node_rank == 0:
            raise ConfigError("master_port", f"port {master_port} is already in use on this host, where node 0 "
                                             "must listen on it: choose another master_port= for every node")
    master_port = master_port or (DEFAULT_MULTINODE_PORT if nodes > 1 else machine.free_port)
    run_dir = cfg["run_dir"]
    path = lambda name: os.path.join(run_dir, name)  # noqa: E731

    ds_cfg = render_deepspeed_config(strategy, cfg["strategy"].get("deepspeed"))
    acc_cfg = render_accelerate_config(
        strategy, settings, procs_per_node=procs, nodes=nodes, master_addr=cfg["master_addr"],
        master_port=master_port, deepspeed_config_path=path(DEEPSPEED_FILE) if ds_cfg else None,
        fsdp_overrides=cfg["strategy"].get("fsdp"),
    )
    if ds_cfg:
        settings["deepspeed_config"] = path(DEEPSPEED_FILE)
    if "fsdp_config" in acc_cfg:
        settings["fsdp_config"] = copy.deepcopy(acc_cfg["fsdp_config"])  # the same settings, whoever launches
    settings["gate_imports"] = gate.imports_to_warm(cfg, settings) if settings["start_ranks_early"] else []
    settings.update(backend=backend, world_size=world_size, decisions=decisions, **model_paths(cfg["model"]))

    train_cfg = copy.deepcopy(cfg)
    del train_cfg["node_rank"]  # every node writes the same config.yaml
    train_cfg["plan"] = settings
    files = {
        CONFIG_FILE: yaml.safe_dump(train_cfg, sort_keys=False, allow_unicode=True),
        ACCELERATE_FILE: yaml.safe_dump(acc_cfg, sort_keys=False),
    }
    if ds_cfg:
        files[DEEPSPEED_FILE] = json.dumps(ds_cfg, indent=2) + "\n"

    argv = render_command(
        backend, procs_per_node=procs, nodes=nodes, node_rank=node_rank, master_addr=cfg["master_addr"],
        master_port=master_port, rdzv_id=rendezvous_id(cfg["master_addr"], master_port),
        accelerate_config_path=path(ACCELERATE_FILE),
        train_config_path=path(CONFIG_FILE),
    )
    env = dict(BASE_ENV, LAUNCHER_RUN_DIR=run_dir)
    if settings["device"] == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's own guess says it with a warning on every rank
    files[node_file(COMMAND_FILE, node_rank)] = render_command_script(argv, env, cwd or os.getcwd())
    plan = LaunchPlan(
        backend=backend, strategy=strategy.name, run_dir=run_dir, argv=argv, env=env, files=files,
        settings=settings, decisions=decisions, procs_per_node=procs, nodes=nodes, node_rank=node_rank, world_size=world_size,
        device=settings["device"],
    )
    files[node_file(PLAN_FILE, node_rank)] = json.dumps(plan.summary(), indent=2) + "\n"
    return plan
