"""`python -m launcher [overrides]`: compose the config, plan the launch, print it (dry_run) or run it."""
from __future__ import annotations

import sys

if len(sys.argv) > 1 and sys.argv[1] == "plan":  # reserved: the memory plan of a later release
    sys.exit("launcher: `python -m launcher plan` (the per-GPU memory plan) is not built yet; "
             "`python -m launcher dry_run=true ...` prints the launch plan.")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launcher import ROOT, validate  # noqa: E402
from launcher.config import register_resolvers, to_plain  # noqa: E402
from launcher.errors import ConfigError  # noqa: E402
from launcher.machine import detect_machine  # noqa: E402
from launcher.plan import build_plan  # noqa: E402

register_resolvers()


@hydra.main(config_path=str(ROOT / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        plain = to_plain(cfg)
        machine = detect_machine(ports=[plain["master_port"]])
        plan = build_plan(plain, machine, overrides=list(HydraConfig.get().overrides.task))
        if plain["dry_run"]:
            print(plan.describe())
            return
        from launcher.execute import execute  # only now: writing files and starting processes

        validate.check_paths(plain)
        state = validate.check_run_dir(plain)
    except ConfigError as err:
        print(f"launcher: error: {err}", file=sys.stderr)
        sys.exit(2)
    code = execute(plan, state)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
