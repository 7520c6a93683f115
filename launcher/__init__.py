"""launcher: Hydra configs -> a launch plan -> accelerate / torchrun / deepspeed -> launcher.train."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project checkout: conf/, ds_configs/, accelerate_configs/
__version__ = "0.1.0"
