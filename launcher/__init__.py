"""launcher: Hydra configs -> a launch plan -> accelerate / torchrun / deepspeed -> launcher.train."""
from pathlib import Path

# The checkout (bench/, tests/) when running from one; site-packages when installed. The shipped folders
# (conf/, ds_configs/, ...) are found by launcher.resources.shipped, which works in both.
ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"
