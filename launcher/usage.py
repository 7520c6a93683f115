"""`python -m launcher --help [overrides]`: the subcommands, the config groups with their options, the top-level keys
with their defaults and comments, and where the config folders are.

Our own text rather than Hydra's help template: Hydra's $APP_CONFIG_GROUPS leaves out the groups and presets of a
`hydra.searchpath` given on the command line, and its $CONFIG prints every group's contents where a user looks
for the keys they can set.
"""
from __future__ import annotations

import json
import re
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.config import register_resolvers
from launcher.resources import shipped

KEY_WIDTH = 32  # of the key=default column; a longer one pushes its comment to the right
HEADER = "launcher: fine-tune LLMs (DPO, SFT; LoRA/QLoRA) on one GPU, many GPUs or a cluster, with one command."
COMMANDS = [
    ("python -m launcher [group=option ...] [key=value ...]", "plan the job and run it (dry_run=true: print the plan)"),
    ("python -m launcher plan [overrides]", "per-GPU and host memory of every strategy"),
    ("python -m launcher report <run_dir>", "<run_dir>/report.html: curves, plan, summary, sample answers"),
    ('python -m launcher generate <run_dir> "prompt" ...', "what a run's model answers (--base: the base's too)"),
    ("python -m launcher --cfg job [overrides]", "the composed config (Hydra's flags: --hydra-help)"),
    ("python -m launcher -m key=a,b [overrides]", "Hydra multirun: one job per value"),
    ("python -m launcher --help [overrides]", "this text, for the config the overrides compose"),
]
FOOTER = """\
Your own presets: a folder of group folders (my_conf/model/mine.yaml), added to Hydra's search path:
  python -m launcher hydra.searchpath=[file:///abs/path/my_conf] model=mine
Shipped files (sbatch scripts among them): python -m launcher.resources. See README.md."""


def key_comments(config_yaml: str) -> dict[str, str]:
    """The `# ...` comment after each key of config.yaml (nested keys dotted: train.lr), with the comment lines
    that continue it."""
    comments: dict[str, str] = {}
    parent, last = "", None
    for line in config_yaml.splitlines():
        key_line = re.match(r"^( *)([A-Za-z_]\w*):(.*?)(?:\s+#\s*(.*))?$", line)
        if key_line:
            indent, key, _, comment = key_line.groups()
            parent = parent if indent else key
            last = f"{parent}.{key}" if indent else key
            if comment:
                comments[last] = comment
        elif line.lstrip().startswith("#") and line.startswith(" ") and last in comments:
            comments[last] += " " + line.strip().lstrip("#").strip()
    return comments


def flat_keys(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in node.items():
        if isinstance(value, dict):
            items += flat_keys(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def shown(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def composed(overrides: list[str]) -> tuple:
    """The config the overrides compose (Hydra's part included) and {group: its options}, a user's search path
    counted."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(shipped("conf")), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        names = loader.get_group_options("", ObjectType.GROUP, config_name="config", overrides=overrides)
        groups = {name: loader.get_group_options(name, config_name="config", overrides=overrides)
                  for name in sorted(names) if name != "hydra"}
    return cfg, groups


def usage(overrides: list[str]) -> str:
    cfg, groups = composed(overrides)
    chosen = cfg.hydra.runtime.choices
    plain = OmegaConf.to_container(cfg, resolve=False)  # defaults as written: ${...} stays
    keys = flat_keys({k: v for k, v in plain.items() if k not in groups and k != "hydra"})
    comments = key_comments((shipped("conf") / "config.yaml").read_text())
    sources = [f"{s.path} ({'shipped' if s.provider == 'main' else s.provider})"
               for s in cfg.hydra.runtime.config_sources if s.provider not in ("hydra", "schema")]
    width = max(len(command) for command, _ in COMMANDS) + 2
    return "\n".join([
        HEADER, "", "Usage:", *(f"  {command.ljust(width)}{what}" for command, what in COMMANDS), "",
        "Config groups (group=option; [selected]):",
        *(f"  {group}: {', '.join(options)}  [{chosen.get(group)}]" for group, options in groups.items()), "",
        "Top-level keys (key=value; default, then what it does):",
        *(f"  {f'{k}={shown(v)}'.ljust(KEY_WIDTH)}  {comments.get(k, '')}".rstrip() for k, v in keys), "",
        "Config folders: " + ", ".join(sources), FOOTER])


def print_usage(overrides: list[str]) -> int:
    try:
        print(usage(overrides))
    except (HydraException, OmegaConfBaseException) as err:  # a bad override: Hydra's message, no traceback
        print(f"launcher: error: {err}", file=sys.stderr)
        return 2
    return 0
