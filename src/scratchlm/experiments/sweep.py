"""Sweeps: a grid of runs from one config, each in its own run directory, resumable, with a table.

    scratchlm sweep configs/ablations/heads.yaml                       # the grid in the file's sweep:
    scratchlm sweep CONFIG --vary model.n_head=1,4,8 --vary model.pos=learned,none --seeds 2

The grid is the product of the varied values (``--zip``: the i-th values of every key together), times
``--seeds N`` seeds (``train.seed``, ``train.seed + 1``, ...). A config file may hold its own grid::

    sweep:
      vary:
        model.n_head: [1, 4, 8]
      seeds: 1

(``--vary`` on the command line adds keys or replaces the file's values of a key.) Layout::

    runs/sweeps/<name>/
      sweep.json          the manifest: config, overrides, grid, and each point's status
      <point>/            a run directory (config.yaml, metrics.jsonl, checkpoints/, ...) per point
      sweep.md            the table (mean ± std over seeds) and the plots
      results.json        the per-run numbers behind the table
      plots/*.png         validation/training curves overlaid, one figure per varied key

Resuming: run the same command again. Finished points are not redone; a point that was killed resumes from
its last checkpoint (exactly, as ``scratchlm train`` does); a point with no checkpoint yet starts over
(its partial files are removed first). The manifest is checked against the command, so a different grid
in the same folder is refused instead of mixed in.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scratchlm.config import Config, load_config, parse_list
from scratchlm.errors import ConfigError
from scratchlm.experiments.runs import (
    EVAL_COLUMNS,
    curves,
    format_value,
    markdown_table,
    summarize_run,
)

MANIFEST = "sweep.json"


@dataclass
class Point:
    """One run of the grid: its name, the overrides that make it, and its seed."""

    name: str
    values: dict[str, Any]  # varied key -> value (the YAML-parsed scalar)
    seed: int


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """``["model.n_head=1,4,8"]`` (or ``model.n_head=[1, 4, 8]``) -> ``{"model.n_head": [1, 4, 8]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or key.count(".") != 1 or not text.strip():
            raise ConfigError(f"--vary '{item}' must look like section.key=v1,v2 (e.g. model.n_head=1,4,8)")
        out[key] = [yaml.safe_load(v) if isinstance(v, str) else v for v in parse_list(key, text)]
    return out


def file_grid(config_path: str | Path | None) -> dict[str, Any]:
    """The ``sweep:`` mapping of a config file (``vary``, ``seeds``, ``zip``), or {}."""
    if config_path is None:
        return {}
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' not found (give a YAML file, e.g. configs/ablations/heads.yaml)"
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    grid = (values.get("sweep") or {}) if isinstance(values, dict) else {}
    if not isinstance(grid, dict) or set(grid) - {"vary", "seeds", "zip"}:
        raise ConfigError(f"{path}: sweep: must be a mapping with vary (key: [values]), seeds and zip")
    vary = grid.get("vary") or {}
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        raise ConfigError(f"{path}: sweep.vary must map section.key to a non-empty list of values")
    return grid


def plan(vary: dict[str, list[Any]], *, zipped: bool, seeds: int, base_seed: int) -> list[Point]:
    """The points of the grid, in order (the first key varies slowest); seeds innermost."""
    if not vary:
        raise ConfigError(
            "nothing to sweep: give --vary section.key=v1,v2 (or a sweep: section in the config)"
        )
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    keys = list(vary)
    if zipped:
        lengths = {k: len(v) for k, v in vary.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"--zip needs the same number of values for every key, got {lengths}")
        combos = list(zip(*vary.values()))
        # a key may repeat a value (optimizer=adamw,muon,muon with d_model=192,192,128): the points may not
        twice = [c for i, c in enumerate(combos) if c in combos[:i]]
        if twice:
            raise ConfigError(f"--zip gives the point {dict(zip(keys, twice[0]))} twice; drop one of them")
    else:
        for key, values in vary.items():
            if len(set(map(str, values))) != len(values):
                raise ConfigError(f"--vary {key} lists a value twice: {values}")
        combos = list(itertools.product(*vary.values()))
    short = _short_names(keys)
    points = []
    for combo in combos:
        values = dict(zip(keys, combo))
        base = "_".join(f"{short[k]}={_slug(v)}" for k, v in values.items())
        for i in range(seeds):
            name = base + (f"_seed={base_seed + i}" if seeds > 1 else "")
            points.append(Point(name, values, base_seed + i))
    return points


def _short_names(keys: list[str]) -> dict[str, str]:
    """``model.n_head`` -> ``n_head`` unless two keys share the field name (then the full key)."""
    names = [k.split(".")[1] for k in keys]
    return {k: (n if names.count(n) == 1 else k) for k, n in zip(keys, names)}


def _slug(value: Any) -> str:
    text = str(value)
    return "".join(c if c.isalnum() or c in ".-+" else "-" for c in text) or "empty"


def _point_config(config_path, overrides: list[str], point: Point, run_dir: Path) -> Config:
    extra = [f"{k}={_override_value(v)}" for k, v in point.values.items()]
    extra += [f"train.seed={point.seed}", f"train.run_dir={run_dir}", f"train.name={point.name}"]
    return load_config(config_path, list(overrides) + extra)


def _override_value(value: Any) -> str:
    if isinstance(value, list):
        return json.dumps(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_sweep(
    config_path: str | Path | None,
    overrides: list[str],
    vary: dict[str, list[Any]],
    *,
    out: str | Path,
    zipped: bool = False,
    seeds: int = 1,
    log=print,
) -> dict[str, Any]:
    """Run (or continue) the sweep in ``out``; returns ``{"out", "points", "table", "interrupted"}``.

    Every point's config is resolved before the first run starts (a bad value stops the sweep at once).
    A point interrupted by SIGINT/SIGTERM stops the sweep with its checkpoint written (``interrupted``
    True); calling again with the same arguments continues it.
    """
    from scratchlm.pipeline import has_checkpoint, run

    out = Path(out)
    base_seed = load_config(config_path, list(overrides)).train.seed
    points = plan(vary, zipped=zipped, seeds=seeds, base_seed=base_seed)
    configs = {p.name: _point_config(config_path, overrides, p, out / p.name) for p in points}
    grid = {
        "config": str(Path(config_path).resolve()) if config_path else None,
        "overrides": list(overrides),
        "vary": {k: [_override_value(v) for v in vs] for k, vs in vary.items()},
        "zip": zipped,
        "seeds": seeds,
    }
    manifest_path = out / MANIFEST
    status: dict[str, str] = {}
    if manifest_path.is_file():
        saved = json.loads(manifest_path.read_text())
        if saved.get("grid") != grid:
            raise ConfigError(
                f"{out} holds another sweep (its sweep.json has a different config, overrides or grid); "
                "give another --name (or --out), or repeat that sweep's exact command to continue it"
            )
        status = {p["name"]: p["status"] for p in saved["points"]}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        rows = [
            {"name": p.name, "values": p.values, "seed": p.seed, "status": status.get(p.name, "pending")}
            for p in points
        ]
        _write_json(manifest_path, {"grid": grid, "points": rows})

    save()
    for i, p in enumerate(points, 1):
        run_dir = out / p.name
        if status.get(p.name) == "done":
            log(f"[{i}/{len(points)}] {p.name}: done already, skipped")
            continue
        if run_dir.exists() and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir)  # a start without any checkpoint: its partial logs would be appended to
        log(f"[{i}/{len(points)}] {p.name}: {'resuming' if run_dir.exists() else 'training'}")
        status[p.name] = "running"
        save()
        result = run(configs[p.name])
        if result["stopped_reason"] == "interrupted":
            log(f"sweep interrupted during {p.name}; run the same command again to continue it")
            return {"out": out, "points": points, "table": None, "interrupted": True}
        status[p.name] = "done"
        save()
        log(f"[{i}/{len(points)}] {p.name}: {result['stop_detail']}")
    table = write_sweep_report(out, points, list(vary))
    return {"out": out, "points": points, "table": table, "interrupted": False}


def aggregate(summaries: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation or None for one seed) of ``key`` over runs that have it."""
    values = [s[key] for s in summaries if s.get(key) is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(summaries: list[dict[str, Any]], key: str, fmt: str, spread: bool = True) -> str:
    """``mean ± std`` over the seeds (``spread=False``: the mean alone, for what seeds cannot change)."""
    mean, std = aggregate(summaries, key)
    text = format_value(mean, fmt)
    return text if std is None or not spread else f"{text} ± {fmt.format(std)}"


def sweep_table(points: list[Point], summaries: dict[str, dict[str, Any]], keys: list[str]) -> str:
    """The markdown table: one row per grid point (its seeds averaged, ± the standard deviation)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    values_of: dict[str, dict[str, Any]] = {}
    for p in points:
        gid = json.dumps(p.values, sort_keys=True, default=str)
        groups.setdefault(gid, []).append(summaries[p.name])
        values_of[gid] = p.values
    present = [c for c in EVAL_COLUMNS if any(s.get(c[0]) is not None for s in summaries.values())]
    headers = [*keys, "seeds", "params", "FLOPs/token", "tokens", "wall time (s)"] + [c[1] for c in present]
    headers.append("stopped")
    rows = []
    for gid, runs in groups.items():
        row = [str(values_of[gid][k]) for k in keys]
        row += [str(len(runs)), _cell(runs, "params", "{:,.0f}", False)]
        row += [_cell(runs, "flops_per_token", "{:.3g}", False), _cell(runs, "tokens", "{:,.0f}", False)]
        row.append(_cell(runs, "wall_time", "{:.0f}"))
        row += [_cell(runs, key, fmt) for key, _, fmt in present]
        row.append(", ".join(sorted({str(r["stop_reason"]) for r in runs})))
        rows.append(row)
    return markdown_table(headers, rows)


def write_sweep_report(out: Path, points: list[Point], keys: list[str]) -> str:
    """sweep.md, results.json and plots/ of a finished sweep; returns the table."""
    from scratchlm.viz.curves import plot_curves

    summaries = {p.name: summarize_run(out / p.name) for p in points}
    table = sweep_table(points, summaries, keys)
    _write_json(out / "results.json", [dict(summaries[p.name], point=p.name) for p in points])
    figures = []
    for key in keys:
        values = list(dict.fromkeys(str(p.values[key]) for p in points))
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
        color = {v: palette[i % len(palette)] for i, v in enumerate(values)}
        series, labelled = [], set()
        for p in points:
            v = str(p.values[key])
            series.append(
                {
                    "label": f"{key}={v}" if v not in labelled else None,
                    "curves": curves(out / p.name),
                    "color": color[v],
                }
            )
            labelled.add(v)
        path = plot_curves(
            series,
            out / "plots" / f"loss_by_{key.split('.')[1]}.png",
            title=f"sweep {out.name}: loss by {key} ({len(points)} runs)",
            xs=("step", "time"),
            legend_title=key,
        )
        figures.append((key, path))
    lines = [
        f"# Sweep {out.name}",
        "",
        f"{len(points)} runs; varied: {', '.join(keys)}. Mean ± standard deviation over seeds where there are "
        "several. Loss in nats per token (validation split, last evaluation); perplexity = exp(loss); "
        "accuracy = next-token top-k accuracy on the same tokens; FLOPs/token = training FLOPs (6N + attention).",
        "",
        table,
    ]
    for key, path in figures:
        lines += [f"![loss by {key}]({path.relative_to(out)})", ""]
    lines += ["Runs (each a run directory here):", ""]
    lines += [f"- `{p.name}`: {summaries[p.name]['stop_detail'] or 'unfinished'}" for p in points]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return table
