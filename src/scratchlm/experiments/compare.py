"""``scratchlm compare RUN...``: runs side by side, as overlaid curves and one table of their evaluations.

Writes to ``--out`` (default ``runs/compare``): ``compare.md`` (the table, and the figures), ``loss.png``
and ``perplexity.png``, each with three panels (against optimizer steps, tokens seen and training wall
time), so runs of different batch sizes or speeds compare fairly on the axis that matters to the question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scratchlm.errors import ConfigError
from scratchlm.experiments.runs import EVAL_COLUMNS, curves, format_value, markdown_table, summarize_run


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, run_dirs)]


def compare_table(summaries: list[dict[str, Any]], labels: list[str]) -> str:
    """The markdown table: one row per run (size, tokens, time, every evaluation column present)."""
    present = [c for c in EVAL_COLUMNS if any(s.get(c[0]) is not None for s in summaries)]
    headers = ["run", "params", "FLOPs/token", "steps", "tokens", "wall time (s)"] + [c[1] for c in present]
    headers.append("stopped")
    rows = []
    for label, s in zip(labels, summaries):
        row = [label, f"{s['params']:,}", f"{s['flops_per_token']:.3g}", f"{s['steps']:,}"]
        row += [format_value(s["tokens"], "{:,}"), format_value(s["wall_time"], "{:.0f}")]
        row += [format_value(s.get(key), fmt) for key, _, fmt in present]
        row.append(s["stop_detail"] or "unfinished")
        rows.append(row)
    return markdown_table(headers, rows)


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Write compare.md, loss.png and perplexity.png into ``out``; returns ``{"table", "figures"}``."""
    from scratchlm.viz.curves import plot_curves

    if len(run_dirs) < 1:
        raise ConfigError("compare needs at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    summaries = [summarize_run(d) for d in dirs]
    labels = run_labels(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series = [{"label": label, "curves": curves(d)} for label, d in zip(labels, dirs)]
    title = f"{len(dirs)} runs: " + ", ".join(labels)
    figures = [
        plot_curves(series, out / "loss.png", title=title, metric="loss"),
        plot_curves(series, out / "perplexity.png", title=title, metric="perplexity"),
    ]
    table = compare_table(summaries, labels)
    lines = [
        "# Comparison",
        "",
        "Final evaluation of each run (validation split; loss in nats per token, perplexity = exp(loss), "
        "accuracy = next-token top-k accuracy).",
        "",
        table,
        "![loss](loss.png)",
        "",
        "![perplexity](perplexity.png)",
        "",
        "Runs: " + ", ".join(f"`{d}`" for d in dirs),
    ]
    from scratchlm import fileio

    fileio.write_text(out / "compare.md", "\n".join(lines) + "\n")
    return {"table": table, "figures": figures}
