"""`cluster=slurm`: the sbatch script for exactly this config, rendered into the run directory.

The script asks for the allocation and hands the user's overrides, each quoted, to slurm/launch.sh,
which starts one launcher per node (master address, port and node rank from Slurm). Pure: no file
is written and nothing is submitted here.
"""
from __future__ import annotations

import re
import shlex

from launcher.errors import ConfigError
from launcher.resources import shipped

SBATCH_FILE = "job.sbatch"
# Set per node by slurm/launch.sh, or by this module: never passed through from the submit command.
# run_name is fixed here: its default is a time stamp, which each node would otherwise take for itself.
NODE_KEYS = {"cluster", "nodes", "node_rank", "master_addr", "master_port", "dry_run", "run_dir", "run_name",
             "resume", "overwrite"}


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def passed_through(overrides: list[str]) -> list[str]:
    return [o for o in overrides if _key(o) not in NODE_KEYS and not _key(o).startswith("cluster.")]


def job_name(run_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_name)[:64] or "launcher"


def hydra_quote(value: str) -> str:
    """A value Hydra's override parser reads back unchanged (spaces, ;, $(...) and all)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_sbatch(cfg: dict, overrides: list[str], cwd: str) -> str:
    cluster = cfg["cluster"]
    gpus = cfg["gpus"]
    if gpus != "auto" and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
        raise ConfigError("gpus", f"gpus={gpus!r}: with cluster=slurm give GPUs per node (>= 1), or auto "
                                  "to take what the partition gives")
    warn = cluster["warning_seconds"]
    lines = [
        "#!/bin/bash",
        f"# Rendered by `python -m launcher cluster=slurm` for run {shlex.quote(cfg['run_dir'])}",
        f"# Submit again with: {shlex.join(a for a in submit_argv(cfg) if a != '--parsable')}",
        f"#SBATCH --job-name={job_name(cfg['run_name'])}",
        f"#SBATCH --nodes={cfg['nodes']}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus != "auto":
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    lines += [f"#SBATCH --cpus-per-task={cluster['cpus_per_task']}", f"#SBATCH --time={cluster['time']}"]
    if cluster["partition"]:
        lines.append(f"#SBATCH --partition={cluster['partition']}")
    lines += [
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{warn}",
        f"cd {shlex.quote(cwd)}",
        f"export LAUNCHER_RUN_DIR={shlex.quote(cfg['run_dir'])}",
        "exec bash " + shlex.join([str(shipped("slurm") / "launch.sh"), *passed_through(overrides),
                                    f"run_name={hydra_quote(cfg['run_name'])}", f"run_dir={hydra_quote(cfg['run_dir'])}",
                                    "resume=auto"]),
    ]
    return "\n".join(lines) + "\n"


def submit_argv(cfg: dict) -> list[str]:
    """--output on the command line: a path with spaces cannot be written inside an #SBATCH line."""
    return ["sbatch", "--parsable", "--output", f"{cfg['run_dir']}/slurm-%j.out", f"{cfg['run_dir']}/{SBATCH_FILE}"]
