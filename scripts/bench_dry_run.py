"""Times `python -m launcher ... dry_run=true` for every strategy, as a user runs it (a fresh process each
time: Python start-up, Hydra composition, planning, printing). Target: under 1.5 s on a 2-core machine.

    python scripts/bench_dry_run.py [repeats]
"""
import statistics
import subprocess
import sys
import time

from launcher.strategies import STRATEGIES


def main(repeats: int = 5) -> None:
    print(f"{'strategy':<15} {'backend':<11} median s   max s")
    for strategy, spec in STRATEGIES.items():
        for backend in spec.backends:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "launcher", f"strategy={strategy}", f"backend={backend}",
                                "gpus=8", "nodes=2", "master_addr=10.0.0.1", "dry_run=true"],
                               check=True, capture_output=True)
                times.append(time.perf_counter() - t0)
            print(f"{strategy:<15} {backend:<11} {statistics.median(times):8.3f} {max(times):7.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
