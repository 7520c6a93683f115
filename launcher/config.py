"""Turning Hydra's composed config into the plain dict the planner and launcher.train read."""
from __future__ import annotations

import os
import re

from omegaconf import DictConfig, OmegaConf

from launcher import ROOT
from launcher.errors import ConfigError


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("launcher_root"):
        OmegaConf.register_new_resolver("launcher_root", lambda: str(ROOT))


def to_plain(cfg: DictConfig) -> dict:
    """Resolve every interpolation; make run_dir absolute so every rank and node reads the same path."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run_dir"] = os.path.abspath(os.path.expanduser(str(plain["run_dir"])))
    return plain


# A model folder's last part that says nothing of the model: the one above it names it (runs/x/merged, llama/model)
GENERIC_FOLDERS = {"model", "models", "hf", "checkpoint", "final", "merged", "weights"}


def name_model_after_its_path(cfg: DictConfig, overrides: list[str]) -> None:
    """model.path given without a preset (`model=...`) or model.name: the default preset's name and shape (the tiny
    model's) would name and size a user's model in the plan, the run's name and its run_dir. The path's last
    meaningful part names it instead (a hub id's model part; a hub cache's models--org--name), and its own
    config.json sizes it (launcher/model_shape.py)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "model.path" not in given or "model" in given:
        return
    cfg.model.shape = None
    if "model.name" in given:
        return
    parts = [p for p in re.split(r"[/\\]", os.path.normpath(str(cfg.model.path))) if p not in ("", ".")]
    if "snapshots" in parts[:-1] and parts[parts.index("snapshots") - 1].startswith("models--"):
        parts = [parts[parts.index("snapshots") - 1].split("--")[-1]]
    while len(parts) > 1 and parts[-1].lower() in GENERIC_FOLDERS:
        parts = parts[:-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", parts[-1] if parts else "").strip("-.")
    if name and not re.fullmatch(r"[A-Za-z]", name):  # not a drive letter
        cfg.model.name = name


# Where a key the shipped config lacks is still read: engine settings passed through as they are, each method's own
# TRL settings, Hydra's, a model's dimensions (config.json's names)
ADDED_KEYS_READ_UNDER = ("strategy.deepspeed.", "strategy.fsdp.", "method.", "hydra.", "model.shape.")


def shipped_keys() -> set[str]:
    """Every key of the shipped config, dotted: conf/config.yaml's and each group option's (`train.lr`, `model.path`)."""
    from launcher.resources import shipped

    conf, keys = shipped("conf"), set()

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            keys.add(prefix + str(key))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(OmegaConf.load(conf / "config.yaml")), "")
    for group in (p for p in conf.iterdir() if p.is_dir()):
        for option in group.glob("*.yaml"):
            walk(OmegaConf.to_container(OmegaConf.load(option)) or {}, f"{group.name}.")
    return keys


def check_added_keys(overrides: list[str]) -> None:
    """`+group.key=value` adds a key the shipped config lacks (`++` adds it or sets it): outside ADDED_KEYS_READ_UNDER
    nothing reads an added key, so a misspelt `+train.lr_sheduler=...` would change nothing, silently."""
    known = None
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith(ADDED_KEYS_READ_UNDER):
            continue
        if override.startswith("++"):  # adds the key, or sets it where it exists
            known = known or shipped_keys()
            if key in known:
                continue
        raise ConfigError(key, f"{override}: the launcher reads no key {key}, so it would change nothing. Check "
                               "its spelling (python -m launcher --help lists the keys), and drop the '+' for a "
                               "key that exists.")
