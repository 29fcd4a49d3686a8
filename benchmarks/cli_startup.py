"""Start-up time of the command line: `scratchlm --help` and `scratchlm COMMAND --help`.

    python benchmarks/cli_startup.py                                  # this checkout's src/
    python benchmarks/cli_startup.py --src BEFORE/src --src src --rounds 9   # before/after, alternated

Each command runs ``--rounds`` times in a fresh interpreter (``python -m scratchlm ...`` with PYTHONPATH set
to each ``--src``), alternating sources and commands round by round; the table gives the median wall time and
the median CPU time (user + system of the child). On a shared machine the wall time swings with the load, the CPU time
much less: compare both against ``python -c pass`` measured in the same rounds.

Measured (``--src /work/main/src --src src --rounds 9``, the shared 2-core machine at a load average of ~12,
2026-12-07), median wall / CPU seconds, before -> after the lazy imports (issue 26):

    python -c pass                        0.069 / 0.010    0.080 / 0.010
    python -m scratchlm --help            0.720 / 0.130 -> 0.501 / 0.080
    python -m scratchlm train --help      0.664 / 0.130 -> 0.592 / 0.110
    python -m scratchlm generate --help   0.696 / 0.130 -> 0.368 / 0.080
    python -m scratchlm eval --help       0.697 / 0.130 -> 0.388 / 0.080

What changed: no subcommand module imports the config module (yaml, typing's annotation evaluation) to build
its parser, the train options list is built only when ``train --help`` shows it, and the config's field types
are evaluated once per section instead of once per field (``get_type_hints`` compiled every annotation 101
times: 1 s of ``train --help``). Nothing imports torch, numpy or tqdm for a help (tests/test_cli.py).
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
    ap.add_argument("--src", action="append", help="a src/ to time, repeatable (default: this checkout's)")
    ap.add_argument("--rounds", type=int, default=7, help="runs per command")
    args = ap.parse_args()
    srcs = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {
        (src, " ".join(c)): [] for src in srcs for c in COMMANDS
    }
    for _ in range(args.rounds):
        for src in srcs:
            env = {**os.environ, "PYTHONPATH": src}
            for c in COMMANDS:
                times[(src, " ".join(c))].append(time_once(c, env))
    print(f"{args.rounds} rounds, {os.cpu_count()} CPUs")
    print("| src | command | median wall (s) | median CPU (s) |")
    print("|---|---|---:|---:|")
    for (src, name), runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {src} | `python {name}` | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
