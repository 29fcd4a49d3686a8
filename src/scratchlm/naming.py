"""Names of runs and sweeps: the one check that a name stays a single folder under its parent.

``train.name`` becomes ``runs/<name>`` and ``scratchlm sweep --name`` becomes ``runs/sweeps/<name>``; a name
that is empty, ``.``/``..``, holds a path separator, a NUL or another control character, or is longer than a
file name may be, would write somewhere else or fail deep inside the file system. Both are checked here, by
:func:`check_run_name`, so the rule cannot drift between the two. (An explicit location is a different
thing: ``train.run_dir`` and ``sweep --out`` take any path.)
"""

from __future__ import annotations

from scratchlm.errors import ConfigError

MAX_NAME_BYTES = 255  # the longest file name of Linux, macOS and Windows file systems (in bytes, UTF-8)


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one folder's name (a phrase), or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name.strip():
        return "is empty"
    if name in (".", "..") or any(c in name for c in "/\\"):
        return "is a path, not a name (it would be written outside its parent folder)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if len(name.encode("utf-8", errors="replace")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes (a file name's limit)"
    return None


def check_run_name(name: object, what: str = "run") -> str:
    """Return ``name`` when it names one folder; else raise ConfigError naming ``what`` and the fix.

    ``what`` is how the user gave the name, e.g. ``"train.name"`` or ``"sweep --name"``.
    """
    problem = name_problem(name)
    if problem:
        raise ConfigError(
            f"{what}={name!r} {problem}; give a plain name such as 'my-run' "
            "(letters, digits, '-', '_', '.'; use train.run_dir or sweep --out for a path)"
        )
    return name  # type: ignore[return-value]
