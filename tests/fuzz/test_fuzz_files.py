"""Generated damage to run and shard files: every file truncated, bit-flipped, overwritten or extended.

Property: whatever the damage, loading a run (config, tokenizer, checkpoint), finding its latest
checkpoint, reading its metrics, resuming its config, reading a shard directory and drawing batches from
it either works (with valid ids, or a fallback to an intact checkpoint) or raises one ScratchLMError line.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from fuzz_helpers import DAMAGE, damage, two_speeds
from hypothesis import strategies as st

from scratchlm.api import load
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.data.loader import TokenLoader
from scratchlm.data.shards import read_meta
from scratchlm.errors import ScratchLMError
from scratchlm.model import build_model
from scratchlm.pipeline import resume_config
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import CHECKPOINTS, latest_checkpoint, save_checkpoint
from scratchlm.train.metrics import read_metrics, truncate_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_data  # noqa: E402

RUN_FILES = [
    "config.yaml",
    "tokenizer.json",
    "metrics.jsonl",
    "checkpoints/LATEST",
    *(
        f"checkpoints/step_0000000{s}/{f}"
        for s in (1, 2)
        for f in ("model.safetensors", "optimizer.pt", "state.json")
    ),
]
SHARD_FILES = ["meta.json", "train_000000.bin", "train_000000.idx", "val_000000.bin", "val_000000.idx"]


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    """config.yaml, tokenizer.json, metrics.jsonl and two checkpoints, as the trainer writes them."""
    d = tmp_path_factory.mktemp("run")
    tok = train_bpe_from_iterator(["hello world, the cat sat on the mat"] * 4, vocab_size=270, progress=False)
    cfg = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=16)
    )
    save_config(cfg, d / "config.yaml")
    tok.save(d / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        save_checkpoint(
            d, step, model, {"optimizers": [opt.state_dict()], "scaler": {}}, {"step": step}, keep_last=5
        )
    (d / "metrics.jsonl").write_text(
        "".join(f'{{"kind": "train", "step": {s}, "loss": 1.0}}\n' for s in (1, 2))
    )
    assert all((d / f).is_file() for f in RUN_FILES)
    return d


@pytest.fixture(scope="module")
def pristine_shards(tmp_path_factory) -> Path:
    d = make_data(tmp_path_factory.mktemp("data"), chars=6_000)
    assert all((d / f).is_file() for f in SHARD_FILES)
    return d


def _damaged_copy(src: Path, name: str, how: str, ints: list[int]) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="scratchlm-fuzz-"))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    path = dst / name
    path.write_bytes(damage(path.read_bytes(), how, ints))
    return dst


def check_run_file(pristine_run, name, dmg):
    run = _damaged_copy(pristine_run, name, *dmg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallbacks warn; what matters is what they return
            for step in (
                lambda: load(run, device="cpu"),
                lambda: load(run, which="best", device="cpu"),
                lambda: resume_config(run, ["train.max_steps=3"]),
            ):
                try:
                    step()
                except ScratchLMError as e:
                    assert "\n" not in str(e)
            try:
                found = latest_checkpoint(run)
                assert (
                    found is not None and found.parent == run / CHECKPOINTS and found.name.startswith("step_")
                )
            except ScratchLMError:
                pass
        records = read_metrics(run)
        assert all(isinstance(r, dict) and type(r["step"]) is int for r in records)
        truncate_metrics(run, 1)
    finally:
        shutil.rmtree(run, ignore_errors=True)


test_run_file, test_run_file_long = two_speeds(
    fast=30, slow=2000, name=st.sampled_from(RUN_FILES), dmg=DAMAGE
)(check_run_file)


def check_shard_file(pristine_shards, name, dmg, mode, doc_aligned):
    shards = _damaged_copy(pristine_shards, name, *dmg)
    try:
        try:
            meta = read_meta(shards)
            loader = TokenLoader(shards, "train", 2, 16, mode=mode, doc_aligned=doc_aligned, vocab_size=257)
            for _ in range(4):
                x, y = loader.next_batch()
                assert int(x.max()) < meta["tokenizer"]["vocab_size"] and int(y.min()) >= 0
        except ScratchLMError as e:
            assert "\n" not in str(e)
    finally:
        shutil.rmtree(shards, ignore_errors=True)


test_shard_file, test_shard_file_long = two_speeds(
    fast=40,
    slow=2000,
    name=st.sampled_from(SHARD_FILES),
    dmg=DAMAGE,
    mode=st.sampled_from(["random", "sequential"]),
    doc_aligned=st.booleans(),
)(check_shard_file)
