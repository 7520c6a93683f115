"""Turning Hydra's composed config into the plain dict the planner and launcher.train read."""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from launcher import ROOT


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("launcher_root"):
        OmegaConf.register_new_resolver("launcher_root", lambda: str(ROOT))


def to_plain(cfg: DictConfig) -> dict:
    """Resolve every interpolation; make run_dir absolute so every rank and node reads the same path."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run_dir"] = os.path.abspath(os.path.expanduser(str(plain["run_dir"])))
    return plain
