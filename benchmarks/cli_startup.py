"""Start-up time of the command line: `scratchlm --help` and `scratchlm COMMAND --help`.

    python benchmarks/cli_startup.py                          # this checkout's src/
    python benchmarks/cli_startup.py --src OTHER/src --rounds 9  # another checkout (before/after)

Each command runs ``--rounds`` times in a fresh interpreter (``python -m scratchlm ...`` with PYTHONPATH set
to ``--src``), alternating the commands round by round; the table gives the median wall time and the median
CPU time (user + system of the child). On a shared machine the wall time swings with the load, the CPU time
much less: compare both against ``python -c pass`` measured in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [
    ["-c", "pass"],
    ["-m", "scratchlm", "--help"],
    ["-m", "scratchlm", "train", "--help"],
    ["-m", "scratchlm", "generate", "--help"],
    ["-m", "scratchlm", "eval", "--help"],
]


def time_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run of ``python argv``."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--src", default=str(Path(__file__).resolve().parents[1] / "src"), help="the src/ to time"
    )
    ap.add_argument("--rounds", type=int, default=7, help="runs per command")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": args.src}
    times: dict[str, list[tuple[float, float]]] = {" ".join(c): [] for c in COMMANDS}
    for _ in range(args.rounds):
        for c in COMMANDS:
            times[" ".join(c)].append(time_once(c, env))
    print(f"src: {args.src}, {args.rounds} rounds, {os.cpu_count()} CPUs")
    print("| command | median wall (s) | median CPU (s) |")
    print("|---|---:|---:|")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| `python {name}` | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
