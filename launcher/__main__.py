"""`python -m launcher [overrides]`: compose the config, plan the launch, print it (dry_run) or run it.

Subcommands: `plan`, `report <run_dir>`, `generate <run_dir> "prompt" ...`; `--help` lists them and the config."""
from __future__ import annotations

import sys

# Subcommands before Hydra parses the command line; each imports only what it needs.
if sys.argv[1:2] == ["report"]:
    from launcher import report

    sys.exit(report.main(sys.argv[2:]))
if sys.argv[1:2] == ["generate"]:
    from launcher import generate

    sys.exit(generate.main(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "plan":  # `python -m launcher plan ...`: the per-GPU memory plan
    sys.argv[1:2] = ["memory_plan=true"]
if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
    from launcher.usage import print_usage

    sys.exit(print_usage([arg for arg in sys.argv[1:] if arg not in ("--help", "-h")]))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launcher import lora_dropout, validate  # noqa: E402
from launcher.config import check_added_keys, name_model_after_its_path, register_resolvers, to_plain  # noqa: E402
from launcher.errors import ConfigError  # noqa: E402
from launcher.machine import detect_machine  # noqa: E402
from launcher.plan import build_plan, host_of, size_the_job, with_liger  # noqa: E402
from launcher.resources import shipped  # noqa: E402

register_resolvers()


def as_launched(cfg: dict, machine, world: int, procs_per_node: int) -> dict:
    """cfg with train.fp8 and train.lora_dropout_kernel as a launch on these GPUs would settle them (`python -m
    launcher plan` sizes with them)."""
    keys = ("fp8", "lora_dropout_kernel")
    lora_dropout.resolved(cfg, True, machine.runs_triton)  # true where it cannot run: refused, not "nothing fits"
    lora_dropout.one_node_resolved(cfg, True, machine.runs_triton)
    try:
        settled = size_the_job(cfg, machine, world, True, [], procs_per_node)["train"]
    except ConfigError:  # nothing fits (the table says so): auto adds no FP8 copies and no kernel
        settled = {key: False if cfg["train"].get(key, "auto") == "auto" else cfg["train"][key] for key in keys}
    return dict(cfg, train=dict(cfg["train"], **{key: settled[key] for key in keys}))


def memory_plan_text(cfg: dict, machine) -> str:
    from launcher import memory, validate

    validate.check_values(cfg, machine)
    gpu_mem = cfg["gpu_mem_gib"] or machine.gpu_mem_gib
    if not gpu_mem:
        raise ConfigError("gpu_mem_gib", "no GPU visible here: give gpu_mem_gib=<GiB per GPU> to plan for one")
    gpus = cfg["gpus"] if cfg["gpus"] != "auto" else max(machine.gpu_count, 1)
    world = gpus * cfg["nodes"]
    try:
        shape = memory.model_shape(cfg["model"])
    except ValueError as err:
        raise ConfigError("model.shape", str(err)) from None
    cfg = with_liger(cfg, on_gpu=True, installed=machine.liger)  # as on a GPU of this machine
    cfg = as_launched(cfg, machine, world, gpus)  # FP8's weight copies and the dropout kernel count in the table
    host = host_of(cfg, machine, gpus)
    text = memory.table(cfg, shape, world, gpu_mem, cfg["micro_batch"], host)
    text += f"\nLiger kernels: {'on' if cfg['train']['liger'] else 'off (train.liger=true if they will be installed)'}"
    text += f"\ntrain.fp8: {str(cfg['train']['fp8']).lower()} (as a launch would settle it; launcher/fp8.py)"
    text += (f"\ntrain.lora_dropout_kernel: {str(cfg['train']['lora_dropout_kernel']).lower()} (as a launch would "
             "settle it; launcher/lora_dropout.py)")
    name, mb, why = memory.choose(cfg, shape, world, gpu_mem, cfg["micro_batch"], machine.deepspeed, host=host)
    if name:
        text += f"\nstrategy=auto would take {why}"
        if host.mem_gib is None:
            need = memory.host_estimate(cfg, shape, name, world, host.procs_per_node).total
            text += (f"\nhost memory not checked (no GPUs here, so not the job's host): {name} needs {need:.0f} GiB "
                     "of RAM per host; host_mem_gib=N checks it")
        return text
    change = memory.smallest_change(cfg, shape, world, gpu_mem, host)
    return f"{text}\nnothing fits; the smallest change that fits: {change}"


@hydra.main(config_path=str(shipped("conf")), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        overrides = list(HydraConfig.get().overrides.task)
        check_added_keys(overrides)
        name_model_after_its_path(cfg, overrides)
        plain = to_plain(cfg)
        machine = detect_machine(ports=[plain["master_port"]])
        if plain["memory_plan"]:
            print(memory_plan_text(plain, machine))
            return
        plan = build_plan(plain, machine, overrides=overrides)
        if plain["dry_run"]:
            print(plan.describe())
            return
        from launcher.execute import execute  # only now: writing files and starting processes

        validate.check_paths(plain)
        state = validate.check_run_dir(plain)
        if state == "resume" and (changed := validate.changed_since_last_launch(plain)):
            print(f"launcher: resume: changed since the run's last launch: {'; '.join(changed)} (the new values "
                  "apply from here; the last launch's config is kept as config.previous.yaml)", flush=True)
    except ConfigError as err:
        print(f"launcher: error: {err}", file=sys.stderr)
        sys.exit(2)
    code = execute(plan, state)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
