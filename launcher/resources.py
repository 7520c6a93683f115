"""Where the shipped folders are: conf/, ds_configs/, accelerate_configs/ and slurm/.

A checkout (and the editable install of `make install`) keeps them at its top level, where users read and
edit them; the wheel maps them into the package (pyproject.toml: launcher/conf, launcher/slurm, ...).

`python -m launcher.resources slurm/dpo.sbatch` prints the path of a shipped file, e.g. to submit it:
`sbatch "$(python -m launcher.resources slurm/dpo.sbatch)" model=...`.
"""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FOLDERS = ("conf", "ds_configs", "accelerate_configs", "slurm")


def shipped(folder: str) -> Path:
    """The folder the installed package carries, else the checkout's (a checkout has no launcher/conf)."""
    packaged = PACKAGE / folder
    return packaged if packaged.is_dir() else PACKAGE.parent / folder


def main(argv: list[str]) -> int:
    if not argv:
        print("\n".join(f"{folder}: {shipped(folder)}" for folder in FOLDERS))
        return 0
    folder, _, rest = argv[0].partition("/")
    path = shipped(folder) / rest
    if folder not in FOLDERS or not path.exists():
        print(f"launcher.resources: {argv[0]} is not shipped (folders: {', '.join(FOLDERS)})", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
