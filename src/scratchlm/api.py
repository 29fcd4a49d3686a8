"""The public Python API: train a model, load a finished run, generate with it.

import scratchlm
cfg = scratchlm.load_config(overrides=["preset=cpu-tiny", "train.name=demo"])
run_dir = scratchlm.fit(cfg)
lm = scratchlm.load(run_dir)
print(lm.generate("def ", max_new_tokens=40, temperature=0.8))
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Config, load_config, load_run_config
from scratchlm.errors import CheckpointError


def fit(config: Config | str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Train a model end to end (tokenizer, shards, training) and return its run directory.

    Named ``fit`` because ``scratchlm.train`` is the training subpackage.

    ``config`` is a :class:`Config`, a YAML path, or None for the main job's preset (``cpu-small``);
    ``overrides`` are dotted ``section.key=value`` strings applied on top.
    """
    from scratchlm.pipeline import run

    if not isinstance(config, Config):
        preset = "cpu-small" if config is None else None
        config = load_config(config, overrides, preset=preset)
    elif overrides:
        raise ValueError("pass overrides with a YAML path or None, not with a Config object")
    return Path(run(config)["run_dir"])


class LoadedModel:
    """A trained model ready to generate: ``.model``, ``.tokenizer``, ``.config`` and the ``.engine``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: Config,
        checkpoint: Path,
        run_dir: Path | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.checkpoint = checkpoint
        self.run_dir = run_dir  # None for a model not loaded from a run directory
        self._engine = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def engine(self):
        """The generation engine (KV cache, sampling, batching, streaming), built on first use."""
        if self._engine is None:
            from scratchlm.inference.engine import Engine

            self._engine = Engine(self.model, self.tokenizer, device=self.device)
        return self._engine

    def generate(self, prompt: str, **sampling: Any) -> str:
        """The completion of one prompt (sampling options as in ``scratchlm generate --help``)."""
        return self.engine.generate([prompt], **sampling)[0].text

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the completion as text deltas as it is generated (never splits a UTF-8 character)."""
        return self.engine.stream(prompt, **sampling)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"LoadedModel({self.config.model.arch}, {n:,} params, checkpoint={self.checkpoint})"


def load(run_dir: str | Path, which: str = "best", device: str | torch.device | None = None) -> LoadedModel:
    """Load a run directory's model (``best`` by validation, falling back to ``latest``) and tokenizer.

    ``which="averaged"``: the average of the last checkpoints written by ``scratchlm average``.
    """
    from scratchlm.device import resolve_device
    from scratchlm.model import build_model
    from scratchlm.tokenizer import load_tokenizer
    from scratchlm.train.checkpoint import find_checkpoint, load_model_state

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if not (run_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir}/tokenizer.json is missing; the run directory is incomplete")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    if which == "averaged":
        from scratchlm.train.average import AVERAGED
        from scratchlm.train.checkpoint import verify_checkpoint

        ckpt = run_dir / AVERAGED
        if not ckpt.is_dir():
            raise CheckpointError(
                f"{ckpt} does not exist; make it with `scratchlm average {run_dir} --last K`"
            )
        verify_checkpoint(ckpt)
    else:
        ckpt = find_checkpoint(run_dir, which)  # best falls back to latest itself
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(
            f"{run_dir}/tokenizer.json has {tokenizer.vocab_size} tokens but the model knows "
            f"{cfg.model.vocab_size}: it is not the tokenizer this run was trained with; restore that one"
        )
    model = build_model(cfg.model)
    state = load_model_state(ckpt)
    if cfg.train.lora.rank:  # a LoRA checkpoint holds adapters: merged into their base (train/adapters.py)
        from scratchlm.train.adapters import merged_state

        state = merged_state(cfg, run_dir, state, ckpt / "model.safetensors")
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(
                f"{ckpt}/model.safetensors does not match {run_dir}/config.yaml: {name} is "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(expected[name].shape)} by the config; "
                "restore the run's config.yaml"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"{ckpt}/model.safetensors does not match config.yaml "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    dev = resolve_device(str(device) if device is not None else "auto", option="device")
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, cfg, ckpt, run_dir)
