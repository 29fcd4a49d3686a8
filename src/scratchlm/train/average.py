"""Checkpoint averaging: the mean of the weights of a run's last K checkpoints.

    scratchlm average runs/de-en --last 5            # -> runs/de-en/averaged/
    scratchlm translate runs/de-en --which averaged --src-file test.de

For every tensor ``w = (1/K) * sum_k w_k`` over checkpoints ``k = 1..K`` (Vaswani et al. 2017, section 6.1:
"we used a single model obtained by averaging the last 5 checkpoints"). The average of points along the
end of a run sits nearer the middle of the basin the optimiser is bouncing around in, and usually
translates better than any one of them, for free. The mean is accumulated in float64 and stored in the
checkpoints' dtype; tensors stored once for tied weights stay stored once.

Output: ``DIR/model.safetensors`` and ``DIR/state.json`` (the same layout as a checkpoint, so it is verified
and loaded like one; ``averaged_from`` names the checkpoints). Written into a temporary directory and
renamed, so a crash never leaves a half-written average.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scratchlm.errors import CheckpointError
from scratchlm.train import checkpoint as ckpt

AVERAGED = "averaged"


def last_checkpoints(run_dir: str | Path, k: int, allow_fewer: bool = False) -> list[Path]:
    """The newest ``k`` complete checkpoints of ``run_dir`` (oldest first); CheckpointError if fewer
    (unless ``allow_fewer`` and there is at least one: a run that ended before writing k of them)."""
    if k < 1:
        raise CheckpointError(f"--last must be >= 1, got {k}")
    root = Path(run_dir) / ckpt.CHECKPOINTS
    found = []
    for cand in sorted(root.glob("step_*"), key=lambda p: p.name, reverse=True):
        try:
            ckpt.verify_checkpoint(cand)
        except CheckpointError:
            continue
        found.append(cand)
        if len(found) == k:
            return found[::-1]
    if allow_fewer and found:
        return found[::-1]
    raise CheckpointError(
        f"{run_dir} has {len(found)} complete checkpoint(s), fewer than the {k} to average; average fewer "
        "(--last N) or keep more while training (train.keep_last, train.ckpt_interval)"
    )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = path / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"checkpoint file {file} cannot be read ({e})") from None


def average_checkpoints(paths: list[Path], out: str | Path) -> Path:
    """Write the mean of the checkpoints ``paths`` to ``out`` (module docstring); returns ``out``.

    CheckpointError when they do not hold the same tensor names and shapes (checkpoints of other models).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total, metadata = _read(paths[0])
    total = {n: t.to(torch.float64) if t.is_floating_point() else t for n, t in total.items()}
    for path in paths[1:]:
        weights, _ = _read(path)
        if weights.keys() != total.keys():
            raise CheckpointError(
                f"{path} holds other tensors than {paths[0]}; average one run's checkpoints"
            )
        for name, t in weights.items():
            if t.shape != total[name].shape:
                raise CheckpointError(
                    f"{path}: {name} is {tuple(t.shape)}, {tuple(total[name].shape)} in {paths[0]}; "
                    "average one run's checkpoints"
                )
            if t.is_floating_point():
                total[name] += t.to(torch.float64)
    dtypes = {n: t.dtype for n, t in _read(paths[0])[0].items()}
    mean = {n: (t / len(paths)).to(dtypes[n]) if t.is_floating_point() else t for n, t in total.items()}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(mean, str(tmp / "model.safetensors"), metadata=metadata or None)
    weights_file = tmp / "model.safetensors"
    state = {
        "step": ckpt.read_state(paths[-1])["step"],
        "averaged_from": [str(p) for p in paths],
        "files": {
            "model.safetensors": {"bytes": weights_file.stat().st_size, "sha256": ckpt._sha256(weights_file)}
        },
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if out.exists():
        if not (out / "state.json").is_file() or "averaged_from" not in ckpt.read_state(out):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{out} exists and is not an averaged checkpoint; choose another --out")
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def average_run(
    run_dir: str | Path, k: int, out: str | Path | None = None, allow_fewer: bool = False
) -> tuple[Path, int]:
    """Average the last ``k`` checkpoints of ``run_dir`` into ``out`` (default ``run_dir/averaged``).

    Returns (the output directory, how many checkpoints were averaged: fewer than k only with allow_fewer).
    """
    paths = last_checkpoints(run_dir, k, allow_fewer)
    return average_checkpoints(paths, out or Path(run_dir) / AVERAGED), len(paths)
