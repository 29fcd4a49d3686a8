"""ScratchLM: train your own language model from scratch."""

__version__ = "0.1.0"
