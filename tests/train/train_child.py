"""Child process of the exact-resume tests: ``python train_child.py RUN_DIR DATA_DIR [overrides...]``.

Trains with the tiny test config, slowed by a short sleep per step (so the parent can signal it mid-run),
and prints the result dict as JSON on the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import ByteTokenizer, tiny_config  # noqa: E402

import scratchlm.train.trainer as trainer  # noqa: E402

_step = trainer.train_step


def slow_step(*args, **kwargs):
    time.sleep(0.03)  # does not touch any state of the run
    return _step(*args, **kwargs)


if __name__ == "__main__":
    run_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    trainer.train_step = slow_step
    trainer._plots = lambda run_dir: None  # matplotlib is slow to import; plots are tested elsewhere
    cfg = tiny_config(run_dir, data_dir, *sys.argv[3:])
    result = trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
    print(json.dumps(result))
