"""Training curves of several runs on one figure (sweeps and comparisons), as PNG (needs matplotlib).

Each panel shows one x axis (optimizer steps, tokens seen, or training wall time in seconds); each run is a
thin line for its training loss (as logged every ``train.log_interval`` steps) and a line with markers for
its validation loss (every ``eval.interval`` steps), in the run's colour. ``metric="perplexity"`` plots
``exp(loss)`` on a log scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scratchlm import fileio
from scratchlm.viz.plots import _pyplot

X_LABELS = {"step": "optimizer step", "tokens": "tokens seen", "time": "training wall time (s)"}


def plot_curves(
    series: list[dict[str, Any]],
    out: str | Path,
    *,
    title: str,
    metric: str = "loss",
    xs: tuple[str, ...] = ("step", "tokens", "time"),
    legend_title: str | None = None,
) -> Path:
    """Write one PNG with a panel per x axis in ``xs``.

    series: ``[{"label": str, "curves": {"train": [...], "eval": [...]}, "color": optional}]``, curves as
    returned by :func:`scratchlm.experiments.runs.curves`. Records without the x key are skipped.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(xs), figsize=(5.2 * len(xs), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    f = (lambda v: math.exp(min(v, 50.0))) if metric == "perplexity" else (lambda v: v)
    for ax, x in zip(axes[0], xs):
        for i, s in enumerate(series):
            color = s.get("color") or colors[i % len(colors)]
            train = [
                r
                for r in s["curves"]["train"]
                if r.get(x) is not None and r.get("loss") is not None and math.isfinite(r["loss"])
            ]
            evals = [r for r in s["curves"]["eval"] if r.get(x) is not None]
            ax.plot([r[x] for r in train], [f(r["loss"]) for r in train], color=color, lw=0.8, alpha=0.45)
            ax.plot(
                [r[x] for r in evals],
                [f(r["val_loss"]) for r in evals],
                "o-",
                color=color,
                ms=3,
                label=s["label"],
            )
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel("perplexity exp(loss) (log scale)" if metric == "perplexity" else "loss (nats/token)")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title=legend_title, fontsize=8)
    fig.suptitle(f"{title}\n(thin: training, markers: validation)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix[1:] or "png")
    plt.close(fig)
    return out
