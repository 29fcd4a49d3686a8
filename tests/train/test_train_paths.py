"""The trainer's other paths: the encoder-decoder through the same loop, bf16 autocast, TensorBoard, compile."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import ByteTokenizer, make_data, tiny_config

import scratchlm.train.trainer as trainer
from scratchlm.model import build_model
from scratchlm.train.checkpoint import find_checkpoint, load_model_state
from scratchlm.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"]


def _val_losses(run_dir) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if r.get("kind") == "eval"]


@pytest.fixture(scope="module")
def multi30k_tsv(shared_data, tmp_path_factory):
    """300 German-English caption pairs of Multi30k as a TSV, and a small BPE tokenizer trained on them."""
    from scratchlm.tokenizer import train_bpe_from_iterator

    de = (shared_data / "multi30k/train.de").read_text(encoding="utf-8").splitlines()[:300]
    en = (shared_data / "multi30k/train.en").read_text(encoding="utf-8").splitlines()[:300]
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in zip(de, en)), encoding="utf-8")
    tok = train_bpe_from_iterator(
        de + en, 400, special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"], num_workers=1, progress=False
    )
    return path, tok


def test_seq2seq_trains_through_the_same_loop(tmp_path, data_dir, multi30k_tsv):
    path, tok = multi30k_tsv
    run_dir = tmp_path / "s2s"
    cfg = tiny_config(
        run_dir,
        data_dir,
        "model.arch=seq2seq",
        f"model.vocab_size={tok.vocab_size}",
        "model.pos=sinusoidal",
        "model.norm_position=post",
        "model.mlp=relu",
        "model.label_smoothing=0.1",
        f"data.source={path}",
        "data.val_fraction=0.2",
        "train.max_steps=30",
        "train.lr=3e-3",
        "eval.interval=15",
        "eval.sample_interval=15",  # greedy translations at both evaluations
    )
    summary = trainer.train_model(cfg, run_dir, tok, None)
    assert summary["step"] == 30 and summary["stopped_reason"] == "max_steps"
    losses = _losses(run_dir)
    assert losses[-1] < losses[0] - 0.5  # it learns (ln 400 ~ 6.0 at the start)
    val = _val_losses(run_dir)
    assert len(val) == 2 and all(math.isfinite(v) for v in val) and val[-1] < val[0]
    samples = (run_dir / "samples.txt").read_text(encoding="utf-8")
    assert "step 15" in samples and "step 30" in samples
    assert set(load_model_state(find_checkpoint(run_dir))) == set(build_model(cfg.model).state_dict())


def test_bf16_autocast_on_cpu_trains(tmp_path, data_dir):
    run_dir = tmp_path / "bf16"
    cfg = tiny_config(run_dir, data_dir, "train.dtype=bfloat16", "train.max_steps=20", "train.lr=3e-3")
    trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
    losses = _losses(run_dir)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5
    # weights stay float32 under autocast
    assert all(t.dtype == torch.float32 for t in load_model_state(find_checkpoint(run_dir)).values())


def test_tensorboard_event_files(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    trainer.train_model(
        tiny_config(run_dir, data_dir, "train.tensorboard=true"), run_dir, ByteTokenizer(), data_dir
    )
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any("loss" in t for t in tags)
    loss_tag = next(t for t in tags if t.endswith("loss"))
    assert [e.step for e in acc.Scalars(loss_tag)][:2] == [1, 2]


@pytest.mark.slow
def test_compiled_training_saves_plain_names_and_matches_eager(tmp_path, data_dir):
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    trainer.train_model(
        tiny_config(eager_dir, data_dir, "train.max_steps=4"), eager_dir, ByteTokenizer(), data_dir
    )
    trainer.train_model(
        tiny_config(compiled_dir, data_dir, "train.max_steps=4", "train.compile=true"),
        compiled_dir,
        ByteTokenizer(),
        data_dir,
    )
    eager = load_model_state(find_checkpoint(eager_dir))
    compiled = load_model_state(find_checkpoint(compiled_dir))
    assert not any("_orig_mod" in k for k in compiled) and set(compiled) == set(eager)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-4, rtol=1e-3)


def test_compile_mode_reaches_torch_compile_and_cuda_graph_modes_mark_each_step(
    tmp_path, data_dir, monkeypatch
):
    """``train.compile_mode`` is handed to torch.compile; the CUDA-graph modes mark a graph step per
    micro-batch (on CUDA only: here the flag must stay off). torch.compile is replaced by a recorder, so the
    test checks the wiring, not Inductor (the slow test above trains through the real compiler)."""
    from scratchlm.config import load_config
    from scratchlm.errors import ConfigError
    from scratchlm.train import step as step_module

    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or m)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir, data_dir, "train.max_steps=2", "train.compile=true", "train.compile_mode=reduce-overhead"
    )
    trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
    assert modes == ["reduce-overhead"] and marks == []  # CPU: no CUDA graphs to mark

    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    batches = [(x[:, :-1], x[:, 1:])] * 3
    step_module.train_step(
        model,
        model,
        [opt],
        batches,
        grad_clip=1.0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        cuda_graphs=True,
    )
    assert len(marks) == 3  # one graph step per micro-batch
    with pytest.raises(ConfigError, match="train.compile_mode=max-autotune needs train.compile=true"):
        load_config(None, ["preset=cpu-tiny", "train.compile_mode=max-autotune"])
