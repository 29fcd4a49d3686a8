"""Worker of the multi-process tests: ``torchrun --nproc_per_node 2 dist_child.py OUT DATA_DIR``.

Every scenario runs the real trainer in one process group, on CPU with gloo (one launch: starting the
processes costs more than the tiny runs):

- ``parity/<name>``: a few steps of a strategy; each rank saves the rows it trained on (``rows_rank{r}.pt``)
  so that the parent can build the one-process reference from exactly those rows.
- ``resume/<strategy>/reference``: an uninterrupted run; ``resume/<strategy>/run``: the same run, stopped by a
  SIGTERM sent to rank 1 only (rank 0 must stop after the same step), then resumed in the same processes.
- ``seq2seq``: the encoder-decoder under DDP (PairLoader batches of different padded lengths per rank).

Each run writes its summary (``result``, ``stopped``, ``resumed``) as ``{tag}_rank{r}.json`` beside it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from train_helpers import ByteTokenizer, corpus_text, tiny_config  # noqa: E402

import scratchlm.train.trainer as trainer  # noqa: E402
from scratchlm.train import distributed as dist  # noqa: E402

# 2 micro-batches of 4 x 32 per rank and step (tokens_per_step counts both ranks), clipping active
PARITY = [
    "data.loader=sequential",
    "train.deterministic=true",
    "train.max_steps=3",
    "train.tokens_per_step=512",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.grad_clip=0.5",
    "train.log_interval=1",
    "eval.interval=3",
    "eval.batches=3",  # uneven over 2 ranks: rank 1 runs a second, uncounted forward
]
PARITY_RUNS = {
    "ddp": ["train.parallel=ddp"],
    "zero1": ["train.parallel=zero1"],
    "fsdp": ["train.parallel=fsdp"],
    "fsdp-muon": ["train.parallel=fsdp", "train.optimizer=muon"],
}
RESUME = [
    "data.loader=sequential",
    "train.deterministic=true",
    "model.dropout=0.1",  # dropout draws from each rank's own RNG: resume must restore every rank's
    "train.max_steps=10",
    "train.tokens_per_step=512",
    "train.ckpt_interval=4",
    "train.log_interval=1",
    "eval.interval=5",
    "train.keep_last=5",
]
STOP_AFTER = 6  # rank 1 gets SIGTERM during step 6 (not a checkpoint step)
SEQ2SEQ = [
    "model.arch=seq2seq",
    "model.vocab_size=259",
    "model.pos=sinusoidal",
    "data.val_fraction=0.2",
    "train.max_steps=4",
    "train.tokens_per_step=512",
    "train.log_interval=1",
    "eval.interval=4",
    "eval.batches=3",
    "train.parallel=ddp",
]


class PairTokenizer(ByteTokenizer):
    """Bytes plus the three specials a seq2seq run needs."""

    vocab_size = 259
    special_tokens = {"<|endoftext|>": 256, "<|bos|>": 257, "<|pad|>": 258}


def write_pairs(path: Path) -> Path:
    """A .tsv of (line, reversed line) pairs from the test corpus: lengths vary, so padding does too."""
    lines = [line.strip()[:24] for line in corpus_text(30_000).splitlines() if line.strip()][:400]
    path.write_text("".join(f"{a}\t{a[::-1]}\n" for a in lines), encoding="utf-8")
    return path


def train(run_dir: Path, data_dir: Path, overrides: list[str], tag: str = "result", tokenizer=None) -> None:
    """train_model in the existing group; its summary goes to ``run_dir/../{tag}_rank{RANK}.json``."""
    cfg = tiny_config(run_dir, data_dir, *overrides)
    seq2seq = cfg.model.arch == "seq2seq"
    result = trainer.train_model(cfg, run_dir, tokenizer or ByteTokenizer(), None if seq2seq else data_dir)
    rank = int(os.environ["RANK"])
    (run_dir.parent / f"{tag}_rank{rank}.json").write_text(json.dumps(result))


def recording(real_step, rows: list[torch.Tensor]):
    """train_step that first appends the (k, B, T) inputs of this rank's micro-batches to ``rows``."""

    def step(forward_model, model, optimizers, batches, **kw):
        rows.append(torch.stack([x for x, _ in batches]))
        return real_step(forward_model, model, optimizers, batches, **kw)

    return step


def signalling(real_step, rank: int):
    """train_step that, on rank 1 only, sends itself SIGTERM during step STOP_AFTER."""
    calls = {"n": 0}

    def step(*args, **kw):
        calls["n"] += 1
        result = real_step(*args, **kw)
        if calls["n"] == STOP_AFTER and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    return step


def main(out: Path, data_dir: Path) -> None:
    rank = int(os.environ["RANK"])
    real_step = trainer.train_step
    trainer._plots = lambda run_dir: None  # matplotlib is slow to import; plots are tested elsewhere
    with dist.process_group("cpu"):  # one group for every run: train_model joins it instead of its own
        for name, extra in PARITY_RUNS.items():
            rows: list[torch.Tensor] = []
            trainer.train_step = recording(real_step, rows)
            train(out / "parity" / name / "run", data_dir, PARITY + extra)
            torch.save(torch.stack(rows), out / "parity" / name / f"rows_rank{rank}.pt")

        for strategy in ("ddp", "zero1", "fsdp"):
            root, overrides = out / "resume" / strategy, [*RESUME, f"train.parallel={strategy}"]
            trainer.train_step = real_step
            train(root / "reference" / "run", data_dir, overrides)
            trainer.train_step = signalling(real_step, rank)
            train(root / "run" / "run", data_dir, overrides, tag="stopped")
            trainer.train_step = real_step
            train(root / "run" / "run", data_dir, overrides, tag="resumed")

        pairs = write_pairs(out / "pairs.tsv") if rank == 0 else out / "pairs.tsv"
        dist.barrier()
        seq2seq = [*SEQ2SEQ, f"data.source={pairs}"]
        train(out / "seq2seq" / "run", data_dir, seq2seq, tokenizer=PairTokenizer())
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
