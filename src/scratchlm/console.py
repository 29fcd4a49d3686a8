"""What the console shows: progress bars only for a person at a terminal, plain lines otherwise.

A tqdm bar redraws itself with carriage returns; written to a file (``scratchlm train > log 2>&1``, a job
scheduler, CI) every redraw stays in it and a line printed meanwhile lands inside the bar. So bars are
drawn only when both stdout and stderr are terminals (``is_terminal``); otherwise training logs one plain
line per ``train.log_interval`` steps (train/metrics.py) and the tokenizer and shard stages say one line
each. ``scratchlm train --quiet`` sends stdout to ``os.devnull`` for the run, which is not a terminal
either: no bars, no lines, only warnings and errors (stderr) and the final result.
"""

from __future__ import annotations

import sys


def is_terminal() -> bool:
    """Whether stdout and stderr are both terminals (a person watching: progress bars are drawn)."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))
