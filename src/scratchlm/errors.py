"""Errors a user can cause.

Everything a user can get wrong (a config key, a path, a corrupt file, a bad request) is raised as a
:class:`ScratchLMError` subclass with one sentence that says what is wrong, where, and how to fix it.
The CLI prints ``error: <message>`` and exits with code 2; library callers can catch the base class.
Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class ScratchLMError(Exception):
    """Base class of user-facing errors: the message is one line, printed as-is by the CLI."""


class ConfigError(ScratchLMError):
    """A config file, preset or override is invalid (unknown key, wrong type, bad value)."""


class DataError(ScratchLMError):
    """A data source, shard directory or parallel corpus is missing, empty or inconsistent."""


class TokenizerError(ScratchLMError):
    """A tokenizer file is corrupt, or tokenizer training was given unusable input."""


class CheckpointError(ScratchLMError):
    """A run directory or checkpoint is missing, truncated or corrupt."""


class GenerationError(ScratchLMError):
    """A generation request cannot be served (prompt too long for the context, bad sampling option)."""


class TrainingError(ScratchLMError):
    """Training cannot go on (a NaN/Inf loss): the message names the step and the last good checkpoint."""


class ChatFormatError(ScratchLMError):
    """A chat conversation is malformed (unknown role, non-string content, not a list of messages)."""


class FileWriteError(ScratchLMError):
    """A file could not be written (disk full, quota, read-only): the message names the file and the cause."""
