"""Child process of the sweep-resume test: ``python sweep_child.py KILL_POINT KILL_STEP scratchlm-sweep-args...``.

Runs ``scratchlm sweep`` and SIGKILLs itself right after the point named KILL_POINT has written its
checkpoint of step KILL_STEP: a sweep killed midway, with one point half finished, at a known place.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # this checkout's scratchlm

import scratchlm.train.checkpoint as ckpt  # noqa: E402
from scratchlm.cli import main  # noqa: E402

_save = ckpt.save_checkpoint


def save_then_die(run_dir, step, *args, **kwargs):
    path = _save(run_dir, step, *args, **kwargs)
    if Path(run_dir).name == KILL_POINT and step == KILL_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


if __name__ == "__main__":
    KILL_POINT, KILL_STEP = sys.argv[1], int(sys.argv[2])
    ckpt.save_checkpoint = save_then_die
    sys.exit(main(sys.argv[3:]))
