"""ScratchLM: train your own language model from scratch.

The public API is a handful of names::

    scratchlm.load_config(path=None, overrides=None, preset=None) -> Config
    scratchlm.train(config) -> run_dir
    scratchlm.load(run_dir) -> LoadedModel (.model, .tokenizer, .config, .generate(), .stream())
"""

from scratchlm.api import LoadedModel, load, train
from scratchlm.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "LoadedModel", "load", "load_config", "train", "__version__"]
