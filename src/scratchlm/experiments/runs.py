"""What a finished (or interrupted) run directory says about itself, as one flat dict per run.

Every number comes from the run's own files, so a sweep or comparison table equals the run's evaluation:

- ``config.yaml``: the resolved config; parameters and FLOPs per token from the model built on the ``meta``
  device (shapes only, no memory);
- ``metrics.jsonl``: the last ``eval`` record gives the final validation loss, perplexity, bits per byte,
  top-1/top-5 accuracy (and BLEU/chrF of seq2seq runs when logged); the best validation loss is the minimum
  over evaluations; tokens, steps and training wall time come from the last record that has them; the last
  ``stop`` record says why the run ended (none: still running, or killed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Config, load_run_config
from scratchlm.errors import ConfigError
from scratchlm.train.metrics import read_metrics

# (key in the summary, column title, format) of the evaluation columns, in table order
EVAL_COLUMNS: list[tuple[str, str, str]] = [
    ("val_loss", "final val loss", "{:.4f}"),
    ("best_val_loss", "best val loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("val_bpb", "val bits/byte", "{:.3f}"),
    ("val_acc_top1", "acc top-1", "{:.2%}"),
    ("val_acc_top5", "acc top-5", "{:.2%}"),
    ("val_bleu", "BLEU", "{:.2f}"),
    ("val_chrf", "chrF", "{:.2f}"),
]
EVAL_KEYS = ("val_loss", "val_ppl", "val_bpb", "val_acc_top1", "val_acc_top5", "val_bleu", "val_chrf")


def model_size(cfg: Config) -> tuple[int, int, int]:
    """(parameters, non-embedding parameters, training FLOPs per token) of the config's model.

    Non-embedding excludes every embedding table, tied to the output head or not (``param_counts``).
    """
    from scratchlm.model import build_model, param_counts

    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = param_counts(model)
    return counts["total"], counts["non_embedding"], int(model.flops_per_token())


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One run as a flat dict: ``name``, ``run_dir``, ``params``, ``non_embedding_params``,
    ``flops_per_token``, ``steps``, ``tokens``, ``wall_time`` (s), the :data:`EVAL_KEYS` of the last
    evaluation (None when absent), ``best_val_loss``, ``stop_reason`` and ``stop_detail`` (None: unfinished).

    Raises ConfigError when ``run_dir`` is not a run directory.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"{run_dir}/metrics.jsonl is missing or empty: the run has not logged anything yet")
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    stops = [r for r in records if r.get("kind") == "stop"]
    timed = [r for r in records if r.get("kind") in ("train", "eval") and r.get("tokens") is not None]
    params, body, flops = model_size(cfg)
    last = evals[-1] if evals else {}
    out: dict[str, Any] = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "params": params,
        "non_embedding_params": body,
        "flops_per_token": flops,
        "steps": max(r.get("step", 0) for r in records),
        "tokens": max((r["tokens"] for r in timed), default=None),
        "wall_time": max((r["time"] for r in timed if r.get("time") is not None), default=None),
    }
    out.update({k: last.get(k) for k in EVAL_KEYS})
    out["best_val_loss"] = min((r["val_loss"] for r in evals), default=None)
    out["stop_reason"] = stops[-1]["reason"] if stops else None
    out["stop_detail"] = stops[-1]["detail"] if stops else None
    return out


def curves(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "eval": [...]}`` records of a run; eval records get ``tokens`` and ``time``
    interpolated from the training records when they were logged without them (older runs)."""
    import numpy as np

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [dict(r) for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    for key in ("tokens", "time"):
        xs = [r["step"] for r in train if r.get(key) is not None]
        ys = [r[key] for r in train if r.get(key) is not None]
        for r in evals:
            if r.get(key) is None and xs:
                r[key] = float(np.interp(r["step"], xs, ys))
    return {"train": train, "eval": evals}


def format_value(value: Any, fmt: str) -> str:
    """A table cell: ``fmt`` applied, ``-`` for a missing value."""
    return "-" if value is None else fmt.format(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (numbers right-aligned when every cell of a column parses as one)."""

    def numeric(col: int) -> bool:
        cells = [r[col] for r in rows if r[col] != "-"]
        return bool(cells) and all(_is_number(c) for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].replace(",", "").rstrip("%")
    try:
        float(head)
    except ValueError:
        return False
    return True
