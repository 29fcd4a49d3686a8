"""The one atomic writer (scratchlm/fileio.py): a full disk is one line naming the file, no temporary file is
left behind and the previous file is intact; checkpoints, HF and GGUF exports and config.yaml go through it.

A full disk is simulated by making the write (or the fsync, where a real file system reports ENOSPC late)
raise ``OSError(errno.ENOSPC)``; mounting a small tmpfs is not possible here.
"""

from __future__ import annotations

import errno
import os

import pytest

from scratchlm import fileio
from scratchlm.cli import main
from scratchlm.config import load_config, save_config
from scratchlm.errors import CheckpointError, DataError, FileWriteError
from scratchlm.model import build_model
from scratchlm.train import checkpoint as ckpt


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tiny(vocab_size: int = 300):
    cfg = load_config(
        overrides=[
            "preset=cpu-tiny",
            f"model.vocab_size={vocab_size}",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
        ]
    )
    return cfg, build_model(cfg.model).eval()


def _one_line(message: str) -> None:
    assert "\n" not in message.strip()


def test_write_text_is_atomic_and_reports_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    fileio.write_text(path, "old: 1\n")
    assert path.read_text() == "old: 1\n"
    monkeypatch.setattr(fileio.os, "fsync", _enospc)
    with pytest.raises(FileWriteError) as e:
        fileio.write_text(path, "new: 2\n")
    msg = str(e.value)
    _one_line(msg)
    assert str(path) in msg and "No space left on device" in msg and "free some disk space" in msg
    assert path.read_text() == "old: 1\n"  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary left


def test_a_bug_inside_the_block_is_not_reported_as_a_write_failure(tmp_path):
    with pytest.raises(ZeroDivisionError), fileio.atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("half")
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def test_read_utf8_names_the_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        fileio.read_utf8(p)


def test_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    _, model = _tiny()
    first = ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1}, keep_last=3)
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises when its write fails (audit: "basic_ios")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(tmp_path, 2, model, {}, {"step": 2}, keep_last=3)
    msg = str(e.value)
    _one_line(msg)
    assert "step_00000002/model.safetensors" in msg and "No space left on device" in msg
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step_00000001"]

    def torch_save_full(*args, **kwargs):  # what torch.save's zip writer raises on a full disk
        raise RuntimeError("[enforce fail] PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.undo()
    monkeypatch.setattr(ckpt.torch, "save", torch_save_full)
    with pytest.raises(CheckpointError, match="step_00000002/optimizer.pt: RuntimeError"):
        ckpt.save_checkpoint(tmp_path, 2, model, {}, {"step": 2}, keep_last=3)
    assert ckpt.latest_checkpoint(tmp_path) == first

    monkeypatch.undo()  # now the disk fills while LATEST is replaced: the new step exists, LATEST is old
    monkeypatch.setattr(fileio, "fsync_file", _enospc)  # the atomic writer's fsync (LATEST), not the step's
    with pytest.raises(CheckpointError, match="LATEST: No space left on device"):
        ckpt.save_checkpoint(tmp_path, 3, model, {}, {"step": 3}, keep_last=3)
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step_00000001\n"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_hf_export_on_a_full_disk_leaves_no_directory(tmp_path, monkeypatch):
    from scratchlm.model import hf

    _, model = _tiny()
    monkeypatch.setattr(hf, "save_file", _enospc)
    out = tmp_path / "hf"
    with pytest.raises(FileWriteError, match=f"could not write {out}/model.safetensors: No space left"):
        hf.export_hf(model, out)
    assert not out.exists()


def test_gguf_export_on_a_full_disk_names_the_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from scratchlm.model.gguf import export_gguf
    from scratchlm.tokenizer import train_bpe_from_iterator

    tok = train_bpe_from_iterator(["hello world " * 50], 270, progress=False, num_workers=1)
    _, model = _tiny(tok.vocab_size)
    monkeypatch.setattr(fileio.os, "fsync", _enospc)
    out = tmp_path / "x.gguf"
    with pytest.raises(FileWriteError, match=f"could not write {out}: No space left on device"):
        export_gguf(model, tok, out, dtype="f32")
    assert list(tmp_path.iterdir()) == []


def test_export_cli_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from scratchlm.model import hf
    from scratchlm.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["hello world, the quick brown fox"])
    cfg, model = _tiny(tok.vocab_size)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    ckpt.save_checkpoint(run, 1, model, {}, {"step": 1}, keep_last=1)
    monkeypatch.setattr(hf, "save_file", _enospc)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and err.count("\n") == 1 and "No space left" in err
    assert not (tmp_path / "hf").exists()


def test_every_project_write_goes_through_the_one_writer():
    """No module writes a final file by hand (write_text, savefig, os.replace of a .tmp): fileio does it.

    The writers that stream into files of their own (shards' .bin being packed, metrics.jsonl appended,
    the checkpoint directory renamed as a whole, sweep's files: another helper's) are the exceptions listed.
    """
    import re
    from pathlib import Path

    import scratchlm

    allowed = {
        "fileio.py",  # the writer itself
        "checkpoint.py",  # files inside the temporary checkpoint directory, renamed as a whole
        "average.py",  # the same, for averaged checkpoints
        "shards.py",  # shard .bin/.idx streamed under partial names, renamed when complete
        "sweep.py",  # (the sweep is being rewritten elsewhere)
        "flash_tiles.py",  # a benchmark table written by a maintainer script
        "generate.py",  # --out: temp + os.replace, OSError reported in place
    }
    pattern = re.compile(
        r"(?<!fileio)\.write_(text|bytes)\(|\.savefig\((?!tmp)|os\.replace\(|\.replace\(run_dir"
    )
    offenders = []
    for path in Path(scratchlm.__file__).parent.rglob("*.py"):
        if path.name in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, f"write these through scratchlm.fileio (write_text / atomic_path): {offenders}"


def test_save_config_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    cfg, _ = _tiny()
    save_config(cfg, tmp_path / "config.yaml")
    before = (tmp_path / "config.yaml").read_bytes()
    monkeypatch.setattr(fileio.os, "fsync", _enospc)
    with pytest.raises(FileWriteError):
        save_config(load_config(overrides=["preset=cpu-tiny", "train.lr=1e-2"]), tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_bytes() == before
