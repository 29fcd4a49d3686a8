"""Worker of the 2-rank streaming test: ``torchrun --nproc_per_node 2 stream_dist_child.py OUT SOURCE``.

Trains a few steps on a streamed jsonl with gloo; each rank saves the token rows it trained on as
``rows_rank{r}.pt`` so the parent can check that the ranks read disjoint documents.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from train_helpers import ByteTokenizer, tiny_config  # noqa: E402

import scratchlm.train.trainer as trainer  # noqa: E402

if __name__ == "__main__":
    out, source = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    rows = []
    real_step = trainer.train_step

    def recording_step(*args, **kwargs):
        rows.extend(x for x, _ in args[3])  # the micro-batches of this rank
        return real_step(*args, **kwargs)

    trainer.train_step = recording_step
    trainer._plots = lambda run_dir: None
    cfg = tiny_config(
        out / "run",
        out / "unused",
        "data.stream=true",
        f"data.source={source}",
        "train.max_steps=4",
        "train.deterministic=true",
    )
    trainer.train_model(cfg, out / "run", ByteTokenizer(), None)
    torch.save(torch.cat(rows), out / f"rows_rank{rank}.pt")
