"""ScratchLM: train your own language model from scratch.

The public API is a handful of names::

    scratchlm.load_config(path=None, overrides=None, preset=None) -> Config
    scratchlm.fit(config) -> run_dir   (fit, since scratchlm.train is the training package)
    scratchlm.load(run_dir) -> LoadedModel (.model, .tokenizer, .config, .generate(), .stream())

They are imported on first use, so ``import scratchlm`` (and every worker process that imports a submodule)
stays light: torch is loaded only by the parts that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "LoadedModel", "load", "fit", "load_config", "__version__"]

_LAZY = {"Config": "config", "load_config": "config", "LoadedModel": "api", "load": "api", "fit": "api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"scratchlm.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'scratchlm' has no attribute {name!r}")
