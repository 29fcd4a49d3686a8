"""How many CPU threads torch uses for training (``train.threads``).

torch runs each CPU operator on an OpenMP team of ``torch.get_num_threads()`` threads (one per core by
default) that meet at a barrier after every operator; libgomp's threads *spin* while they wait. A small
model does hundreds of short operators per step, so when another process holds one of the cores, every
barrier waits for a thread that is not running. Measured on a 2-core machine shared with other jobs (load
average 12-14), a step of nanoGPT's CPU recipe (4 layers x 128, batch 12 x 64, AdamW):

    1 thread: 150-280 ms        2 threads: 500-5,100 ms (median ~1,800 ms)

(``benchmarks/results/nanogpt_recipe.md`` has the whole runs). On an idle machine the default (one thread
per core) is the faster one, so ``train.threads=0`` (auto) keeps it unless the 1-minute load average shows
the cores busy: then it uses the cores left free, at least 1::

    threads = clamp(round(cores - load_avg_1m), 1, torch default)

The decision is taken once, at the start of the run, and printed. ``OMP_NUM_THREADS`` set in the
environment (``torchrun`` sets it to 1 for several processes per machine) is respected as it is.
A positive ``train.threads`` is used as given. Threads change speed only: a step's result does not
depend on them beyond float summation order.
"""

from __future__ import annotations

import os

import torch


def auto_threads(default: int, cores: int, load_avg: float) -> int:
    """Threads for a machine with ``cores`` cores at 1-minute load average ``load_avg`` (torch's default
    ``default``): all of them when the cores are free, the free ones (at least 1) when they are not."""
    return max(1, min(default, round(cores - load_avg)))


def set_cpu_threads(requested: int, device: torch.device) -> str | None:
    """Apply ``train.threads`` for a run on ``device``; returns a line saying what was chosen and why
    (None when nothing was changed: a GPU run, or ``OMP_NUM_THREADS`` set with ``requested == 0``)."""
    if device.type != "cpu":
        return None
    if requested > 0:
        torch.set_num_threads(requested)
        return f"threads: {requested} (train.threads)"
    if os.environ.get("OMP_NUM_THREADS"):
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
