"""How many CPU threads torch uses for training (``train.threads``).

torch runs each CPU operator on an OpenMP team of ``torch.get_num_threads()`` threads (one per core by
default) that meet at a barrier after every operator; libgomp's threads *spin* while they wait. A small
model does hundreds of short operators per step, so when another process holds one of the cores, every
barrier waits for a thread that is not running. Measured on a 2-core machine shared with other jobs (load
average 12-14), a step of nanoGPT's CPU recipe (4 layers x 128, batch 12 x 64, AdamW):

    1 thread: 150-280 ms        2 threads: 500-5,100 ms (median ~1,800 ms)

(``benchmarks/results/nanogpt_recipe.md`` has the whole runs). The default, ``train.threads=0``, keeps
torch's own count (one per core, or ``OMP_NUM_THREADS``), so a run's numbers never depend on what else the
machine was doing: thread counts change the order of float sums, and a run resumed under another load, or
a sweep point trained beside another, must compute what an uninterrupted run computes. On a machine shared
with other jobs, ``train.threads=-1`` (auto) takes the cores the 1-minute load average leaves free, at
least 1, once at the start of the run, and prints the choice::

    threads = clamp(round(cores - load_avg_1m), 1, torch default)

``OMP_NUM_THREADS`` set in the environment (``torchrun`` sets it to 1 for several processes per machine) is
respected by auto. A positive ``train.threads`` is used as given.
"""

from __future__ import annotations

import os

import torch


def auto_threads(default: int, cores: int, load_avg: float) -> int:
    """Threads for a machine with ``cores`` cores at 1-minute load average ``load_avg`` (torch's default
    ``default``): all of them when the cores are free, the free ones (at least 1) when they are not."""
    return max(1, min(default, round(cores - load_avg)))


def set_cpu_threads(requested: int, device: torch.device) -> str | None:
    """Apply ``train.threads`` for a run on ``device`` (N > 0: N threads; 0: torch's count; -1: auto by the
    load average); returns a line saying what was chosen and why, None when nothing was changed (a GPU run,
    ``requested == 0``, or auto with ``OMP_NUM_THREADS`` set)."""
    if device.type != "cpu":
        return None
    if requested > 0:
        torch.set_num_threads(requested)
        return f"threads: {requested} (train.threads)"
    if requested == 0 or os.environ.get("OMP_NUM_THREADS"):  # torch's own count
        return None
    default, cores = torch.get_num_threads(), os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform (Windows): keep torch's default
        return None
    threads = auto_threads(default, cores, load)
    if threads == default:
        return None
    torch.set_num_threads(threads)
    return (
        f"threads: {threads} of {default} (load average {load:.1f} on {cores} cores: spinning OpenMP "
        "threads would wait for busy cores; train.threads=N to choose)"
    )
