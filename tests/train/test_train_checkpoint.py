"""Checkpoints: round trip, tied weights, RNG, keep-last-K, corrupt/truncated fallback, failed saves."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scratchlm.config import ModelConfig, TrainConfig
from scratchlm.errors import CheckpointError
from scratchlm.model import build_model
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.optim import build_optimizers, load_optimizer_state, optimizer_state


def setup(seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16))
    opts = build_optimizers(model, TrainConfig(lr=1e-2, warmup_steps=0))
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    opts[0].step()
    return model, opts


def save(run_dir, step, model, opts, keep_last=3, **state):
    return ckpt.save_checkpoint(
        run_dir,
        step,
        model,
        {"optimizers": optimizer_state(opts)},
        {"tokens": step * 10, **state},
        keep_last=keep_last,
    )


def test_round_trip_with_tied_weights(tmp_path):
    model, opts = setup()
    d = save(tmp_path, 5, model, opts)
    assert d == tmp_path / "checkpoints" / "step_00000005"
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_00000005"
    assert ckpt.find_checkpoint(tmp_path) == d
    fresh, fresh_opts = setup(seed=1)
    fresh.load_state_dict(ckpt.load_model_state(d))  # strict: the tied lm_head name is restored
    assert fresh.lm_head.weight is fresh.wte.weight
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    load_optimizer_state(fresh_opts, ckpt.load_optimizer_file(d)["optimizers"])
    sa, sb = opts[0].state_dict(), fresh_opts[0].state_dict()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"])
    assert ckpt.read_state(d)["tokens"] == 50


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ckpt.capture_rng()
    import json

    state = json.loads(json.dumps(state))  # must survive JSON
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_and_best(tmp_path):
    model, opts = setup()
    for step in (1, 2, 3, 4):
        d = save(tmp_path, step, model, opts, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["LATEST", "step_00000003", "step_00000004"]
    ckpt.save_best(tmp_path, d)
    assert ckpt.find_checkpoint(tmp_path, "best") == tmp_path / "best"
    assert ckpt.read_state(tmp_path / "best")["step"] == 4
    # best survives pruning of its source
    for step in (5, 6):
        save(tmp_path, step, model, opts, keep_last=2)
    assert not d.exists()
    ckpt.verify_checkpoint(tmp_path / "best")


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "state.json"])
def test_truncated_file_falls_back_to_previous(tmp_path, victim):
    model, opts = setup()
    save(tmp_path, 1, model, opts)
    newest = save(tmp_path, 2, model, opts)
    path = newest / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=victim):
        found = ckpt.find_checkpoint(tmp_path)
    assert found.name == "step_00000001"


def test_bit_flip_is_detected(tmp_path):
    model, opts = setup()
    save(tmp_path, 1, model, opts)
    newest = save(tmp_path, 2, model, opts)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        assert ckpt.find_checkpoint(tmp_path).name == "step_00000001"


@pytest.mark.parametrize("content", ["", "step_000", "garbage\x00"])
def test_truncated_latest_falls_back(tmp_path, content):
    model, opts = setup()
    save(tmp_path, 1, model, opts)
    save(tmp_path, 2, model, opts)
    (tmp_path / "checkpoints" / "LATEST").write_text(content)
    with pytest.warns(UserWarning, match="LATEST"):
        assert ckpt.find_checkpoint(tmp_path).name == "step_00000002"


def test_all_corrupt_raises_never_restarts(tmp_path):
    model, opts = setup()
    d = save(tmp_path, 1, model, opts)
    (d / "state.json").write_text("{")
    d2 = save(tmp_path, 2, model, opts)
    (d2 / "model.safetensors").write_bytes(b"x")
    # one error naming both files, and no "falling back" warnings before it (there is nothing to fall to)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for which in ("latest", "best"):
            with pytest.raises(CheckpointError, match="no complete checkpoint") as e:
                ckpt.find_checkpoint(tmp_path, which)
            assert "state.json" in str(e.value) and "model.safetensors" in str(e.value)
            assert "\n" not in str(e.value) and "delete" not in str(e.value)
    assert (d / "state.json").read_text() == "{"  # left as it was
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.find_checkpoint(tmp_path / "nothing")


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    model, opts = setup()
    good = save(tmp_path, 1, model, opts)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def disk_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\x00" * 100)  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="intact"):
        save(tmp_path, 2, model, opts)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000001"]
    assert (root / "LATEST").read_text().strip() == "step_00000001"
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert ckpt.find_checkpoint(tmp_path) == good


def test_a_file_fsync_failure_fails_the_save_and_a_directory_einval_does_not(tmp_path, monkeypatch):
    """ENOSPC reported late, at fsync, means the bytes may not be on disk: the new checkpoint must not
    replace the previous one. A directory that cannot be fsync-ed (EINVAL on some file systems) is fine."""
    import errno
    import os
    import stat

    model, opts = setup()
    good = save(tmp_path, 1, model, opts)
    real_fsync = os.fsync

    def late_enospc(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", late_enospc)
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        save(tmp_path, 2, model, opts)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000001"]
    assert ckpt.find_checkpoint(tmp_path) == good

    def dirs_cannot_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", dirs_cannot_fsync)
    assert save(tmp_path, 2, model, opts) == root / "step_00000002"


def test_failed_best_update_leaves_previous_best_intact(tmp_path, monkeypatch):
    model, opts = setup()
    first = save(tmp_path, 1, model, opts)
    best = ckpt.save_best(tmp_path, first)
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    second = save(tmp_path, 2, model, opts)

    def disk_full(src, dst, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "link", disk_full)  # no hard links here, and no room for a copy either
    monkeypatch.setattr(ckpt.shutil, "copy2", disk_full)
    with pytest.raises(CheckpointError, match="previous best checkpoint is intact"):
        ckpt.save_best(tmp_path, second)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    assert not (tmp_path / ".best.tmp").exists()


def test_resave_same_step_replaces(tmp_path):
    model, opts = setup()
    save(tmp_path, 3, model, opts, tokens_marker=1)
    d = save(tmp_path, 3, model, opts, tokens_marker=2)
    assert ckpt.read_state(d)["tokens_marker"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_save_weights_writes_what_save_model_writes(tmp_path):
    """A state dict (e.g. gathered from FSDP shards) is stored byte for byte like safetensors' save_model."""
    from safetensors.torch import save_model

    model, _ = setup()
    save_model(model, str(tmp_path / "a.safetensors"))
    ckpt.save_weights(model.state_dict(), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    untied = {k: v.clone() for k, v in model.state_dict().items()}  # copies: nothing shares storage
    ckpt.save_weights(untied, tmp_path / "c.safetensors")
    assert set(load_file(str(tmp_path / "c.safetensors"))) == set(untied)


class _Payload:
    """Unpickling this would create a file: the proof that a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_objects_in_optimizer_file_are_refused_unrun(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, d / "optimizer.pt")
    with pytest.raises(CheckpointError, match="holds pickled objects, not tensors") as e:
        ckpt.load_optimizer_file(d)
    assert "\n" not in str(e.value) and not marker.exists()
