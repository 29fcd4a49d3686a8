"""Open a Hugging Face dataset for streaming, failing fast and in one line when the Hub is out of reach.

``datasets.load_dataset(NAME, streaming=True)`` retries an unreachable Hub for ~25 s before it gives up (it
is instant only with ``HF_HUB_OFFLINE=1``). :func:`open_streaming` asks first, with one short request
through ``huggingface_hub`` (``dataset_info`` with a 1 s timeout), and decides:

* the Hub answers: stream from it (``load_dataset(..., streaming=True)``);
* the Hub does not answer (or ``HF_HUB_OFFLINE=1``) and the dataset was downloaded before: stream the local
  snapshot in the Hugging Face cache (``$HF_HUB_CACHE/datasets--OWNER--NAME/snapshots/REV``);
* neither: a :class:`DataError` in about a second that says so and how to point at local files.

Builders (``json``, ``parquet``, ``text``, ``csv``) with ``data_files`` never touch the network, so they are
opened directly: that is how the streaming path is tested offline ("remote-like" local files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scratchlm.errors import DataError

PROBE_TIMEOUT_S = 1.0  # one request; a dropped packet costs this long, a refused connection ~1 ms
LOCAL_BUILDERS = {"json", "parquet", "text", "csv", "arrow"}
LOCAL_HINT = "point data.source at local files instead (*.jsonl, *.jsonl.gz, *.parquet, text files or globs)"


def offline_env() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set to a true value."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def cached_snapshot(name: str, revision: str | None = None) -> Path | None:
    """The local snapshot directory of hub dataset ``name`` in the HF cache, or None when never downloaded."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(os.environ.get("HF_HUB_CACHE", constants.HF_HUB_CACHE))
    repo = repo / repo_folder_name(repo_id=name, repo_type="dataset")
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() and any(snap.iterdir()) else None


def probe_hub(name: str, revision: str | None = None) -> str | None:
    """None when the Hub answers for dataset ``name``; else why not (one line). DataError if it does not exist.

    One ``dataset_info`` request with a :data:`PROBE_TIMEOUT_S` timeout; ``HF_ENDPOINT`` is honoured.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        HfApi(endpoint=endpoint).dataset_info(name, revision=revision, timeout=PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise DataError(
            f"HF dataset '{name}' does not exist on the Hub (or is private: log in with `hf auth login`); "
            f"check the name, or {LOCAL_HINT}"
        ) from None
    except RevisionNotFoundError:
        raise DataError(f"HF dataset '{name}' has no revision '{revision}'; check the revision") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):  # gated datasets: the data requests will say what to do
            return None
        return f"the Hub answered {status or type(e).__name__}"
    except Exception as e:  # connection refused, DNS failure, timeout: httpx/requests raise many types
        return f"cannot reach the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def open_streaming(
    name: str,
    split: str = "train",
    config: str | None = None,
    data_files: list[str] | None = None,
    revision: str | None = None,
) -> Any:
    """A ``datasets.IterableDataset`` for hub dataset or builder ``name`` (see the module docstring).

    Raises DataError (one line) when datasets is missing, the Hub is unreachable with no cached copy, or the
    dataset/split/config does not open.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("hf: sources need the datasets library: pip install 'scratchlm[hf]'") from None
    target, where = name, f"HF dataset '{name}'"
    if not (name in LOCAL_BUILDERS or Path(name).exists()):
        why = "HF_HUB_OFFLINE is set" if offline_env() else probe_hub(name, revision)
        if why is not None:
            snap = cached_snapshot(name, revision)
            if snap is None:
                raise DataError(
                    f"{where} is unavailable: {why}, and it is not in the local cache; {LOCAL_HINT}"
                )
            print(f"note: {why}; streaming the cached copy of '{name}' in {snap}")
            target, revision = str(snap), None
    try:
        return datasets.load_dataset(
            target, config, split=split, streaming=True, data_files=data_files, revision=revision
        )
    except Exception as e:  # bad split or config, unreadable files: datasets raises many types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot open {where} split '{split}': {first}") from None
