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
(its partial files are removed first). The grid may change between calls (drop a value that failed, add
one); the base (config file, overrides, ``--zip``) may not: another base in the same folder is refused
instead of mixed in, and so is a point folder whose saved config differs from the point's.

Reuse: a point whose resolved config equals that of a finished run of this sweep or of a sibling sweep (the
other folders beside ``out``, e.g. runs/sweeps/*) is not trained again: the table reads that run, and
sweep.md says so. The baseline shared by heads.yaml, depth.yaml and pos.yaml is trained once.
Equal means every field but the run's name and folder (and the vocabulary size and shard folder that a run
derives from its tokenizer and data when the config leaves them unset).

Failures: a point that raises (a NaN loss, a data error, out of memory) is recorded as failed with its
one-line error, in sweep.json and sweep.md, and the sweep goes on to the next point. Running the command
again retries it (from its last checkpoint if it wrote one). ``--max-points`` (default 1000) refuses a grid
too large to be meant, before anything is resolved.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scratchlm.config import Config, load_config, load_run_config, parse_list, to_dict
from scratchlm.errors import ConfigError, ScratchLMError
from scratchlm.experiments.runs import (
    EVAL_COLUMNS,
    EVAL_KEYS,
    TEST_KEYS,
    curves,
    format_value,
    markdown_table,
    summarize_run,
)
from scratchlm.naming import check_run_name

MANIFEST = "sweep.json"
MAX_POINTS = 1000  # a larger grid is refused up front (--max-points raises it)


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
        if not eq or key.count(".") != 1 or not all(key.split(".")) or not text.strip():
            raise ConfigError(
                f"--vary {_show(item)} must look like section.key=v1,v2 (e.g. model.n_head=1,4,8)"
            )
        if key in out:
            raise ConfigError(
                f"--vary {_show(key)} is given twice; give its values once (--vary {_show(key)}=v1,v2,v3)"
            )
        try:
            out[key] = [yaml.safe_load(v) if isinstance(v, str) else v for v in parse_list(key, text)]
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(
                f"--vary {_show(key)}: a value is not valid YAML ({problem}); quote or fix it"
            ) from None
    return out


def _show(text: str) -> str:
    """User text inside a one-line message: as typed, or quoted with escapes when it holds a newline etc."""
    return text if text.isprintable() and text.strip() == text and text else repr(text)


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
    if not isinstance(grid, dict) or set(grid) - {"vary", "seeds", "zip", "test", "jobs"}:
        raise ConfigError(
            f"{path}: sweep: must be a mapping with vary (key: [values]), seeds, zip, test and jobs"
        )
    vary = grid.get("vary") or {}
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        raise ConfigError(f"{path}: sweep.vary must map section.key to a non-empty list of values")
    for key in vary:
        if not isinstance(key, str) or key.count(".") != 1 or not all(key.split(".")):
            raise ConfigError(
                f"{path}: sweep.vary key {key!r} must look like section.key (e.g. model.n_head)"
            )
    seeds = grid.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"{path}: sweep.seeds must be a whole number >= 1, got {seeds!r}")
    if not isinstance(grid.get("zip", False), bool):
        raise ConfigError(f"{path}: sweep.zip must be true or false, got {grid.get('zip')!r}")
    if "jobs" in grid and not _is_count(grid["jobs"]):
        raise ConfigError(f"{path}: sweep.jobs must be a whole number >= 1, got {grid['jobs']!r}")
    if "test" in grid:
        grid = {**grid, "test": _test_spec(grid["test"], path)}
    return grid


def _test_spec(test: Any, path: Path) -> dict[str, Any]:
    """``sweep.test`` -> {"src", "ref" (absolute; relative paths are from the config's folder), "beams"}."""
    usage = f"{path}: sweep.test must be a mapping with src: FILE, ref: FILE (and beams: N >= 1)"
    if not isinstance(test, dict) or set(test) - {"src", "ref", "beams"} or not {"src", "ref"} <= set(test):
        raise ConfigError(usage)
    beams = test.get("beams", 1)
    if not all(isinstance(test[k], str) and test[k] for k in ("src", "ref")) or not _is_count(beams):
        raise ConfigError(usage)
    out = {k: str((path.parent / test[k]).resolve()) for k in ("src", "ref")}
    for key, file in out.items():
        if not Path(file).is_file():
            raise ConfigError(f"{path}: sweep.test.{key} file {file} does not exist")
    return {**out, "beams": beams}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def plan(
    vary: dict[str, list[Any]], *, zipped: bool, seeds: int, base_seed: int, max_points: int = MAX_POINTS
) -> list[Point]:
    """The points of the grid, in order (the first key varies slowest); seeds innermost.

    Raises ConfigError before building anything when the grid has more than ``max_points`` runs.
    """
    if not vary:
        raise ConfigError(
            "nothing to sweep: give --vary section.key=v1,v2 (or a sweep: section in the config)"
        )
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    count = (max(map(len, vary.values())) if zipped else math.prod(map(len, vary.values()))) * seeds
    if count > max_points:
        raise ConfigError(
            f"the sweep has {count:,} runs, more than the limit of {max_points:,}; vary fewer values, "
            f"or raise the limit with --max-points {count}"
        )
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
                raise ConfigError(f"--vary {_show(key)} lists a value twice: {values}")
        combos = list(itertools.product(*vary.values()))
    short = _short_names(keys)
    points = []
    for combo in combos:
        values = dict(zip(keys, combo))
        base = "_".join(f"{short[k]}={_slug(v)}" for k, v in values.items())
        for i in range(seeds):
            name = base + (f"_seed={base_seed + i}" if seeds > 1 else "")
            check_run_name(name, "a sweep point's folder name (made of its values)")
            points.append(Point(name, values, base_seed + i))
    return points


def _short_names(keys: list[str]) -> dict[str, str]:
    """``model.n_head`` -> ``n_head`` unless two keys share the field name (then the full key)."""
    names = [k.split(".")[1] for k in keys]
    return {k: (n if names.count(n) == 1 else k) for k, n in zip(keys, names)}


def _slug(value: Any) -> str:
    text = str(value)
    return "".join(c if c.isalnum() or c in ".-+" else "-" for c in text) or "empty"


def point_overrides(overrides: list[str], point: Point) -> list[str]:
    """Every override a point runs with (the sweep's, then the varied values, seed and name), in order;
    ``train.run_dir=<sweep folder>/<point name>`` is added to these."""
    extra = [f"{k}={_override_value(v)}" for k, v in point.values.items()]
    return [*overrides, *extra, f"train.seed={point.seed}", f"train.name={point.name}"]


def _point_config(config_path, overrides: list[str], point: Point, run_dir: Path) -> Config:
    return load_config(config_path, [*point_overrides(overrides, point), f"train.run_dir={run_dir}"])


# fields a run fills in when the config leaves them unset (value = "unset"): not compared for reuse
_DERIVED = {("model", "vocab_size"): 0, ("data", "data_dir"): None}


def config_key(cfg: Config, like: Config | None = None) -> str:
    """The resolved config as a canonical JSON string, without what names the run (train.name,
    train.run_dir, preset) and without the derived fields that ``like`` (the point's config) leaves unset."""
    values = to_dict(cfg)
    values.pop("preset", None)
    values["train"].pop("name", None)
    values["train"].pop("run_dir", None)
    ref = to_dict(like) if like is not None else values
    for (sec, key), unset in _DERIVED.items():
        if ref[sec].get(key) == unset:
            values[sec].pop(key, None)
    return json.dumps(values, sort_keys=True, default=str)


def find_finished_run(
    out: Path, cfg: Config, exclude: Path, loaded: dict[Path, Config | None] | None = None
) -> Path | None:
    """A finished point (status done, trained in place) of this sweep or a sibling sweep (a folder beside
    ``out`` with a sweep.json) whose resolved config equals ``cfg``; None when there is none.
    ``loaded`` caches the configs read (run directory -> Config, None when unreadable) across calls."""
    loaded = {} if loaded is None else loaded
    want = config_key(cfg, cfg)
    folders = sorted({out, *(out.parent.iterdir() if out.parent.is_dir() else [])})
    for folder in folders:
        manifest = folder / MANIFEST
        if not manifest.is_file():
            continue
        try:
            rows = json.loads(manifest.read_text()).get("points", [])
        except (OSError, ValueError, AttributeError):
            continue
        for row in rows:
            if not isinstance(row, dict) or row.get("status") != "done" or row.get("reused_from"):
                continue
            run_dir = folder / str(row.get("name"))
            if run_dir == exclude or not (run_dir / "config.yaml").is_file():
                continue
            if run_dir not in loaded:
                try:
                    loaded[run_dir] = load_run_config(run_dir)
                except ScratchLMError:
                    loaded[run_dir] = None  # an older or damaged run: not a candidate
            if loaded[run_dir] is not None and config_key(loaded[run_dir], cfg) == want:
                return run_dir
    return None


def _one_line(error: BaseException) -> str:
    """A failure as one line: a user error's message as is, anything else prefixed by its type."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if isinstance(error, ScratchLMError) else f"{type(error).__name__}: {text}"


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
    max_points: int = MAX_POINTS,
    test: dict[str, Any] | None = None,
    jobs: int = 1,
    log=print,
) -> dict[str, Any]:
    """Run (or continue) the sweep in ``out``; returns ``{"out", "points", "table", "interrupted", "failed"}``
    (``failed``: point name -> its one-line error, training or test scoring).

    jobs: points trained at once, each in its own ``scratchlm train`` process with
    ``OMP_NUM_THREADS = cores // jobs`` (its output in ``out/logs/<point>.log``); 1 = one after another, here.
    test: ``{"src", "ref", "beams"}`` (a config's ``sweep.test``): each finished seq2seq point's final model
    is scored on that file pair (:mod:`scratchlm.experiments.heldout`; skipped when already scored).

    Every point's config is resolved before the first run starts (a bad value stops the sweep at once).
    A point that raises while training is recorded as failed and the sweep goes on. A point interrupted by
    SIGINT/SIGTERM stops the sweep with its checkpoint written (``interrupted`` True); calling again with
    the same arguments continues it.
    """
    from scratchlm.pipeline import has_checkpoint, run

    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    base_seed = load_config(config_path, list(overrides)).train.seed
    points = plan(vary, zipped=zipped, seeds=seeds, base_seed=base_seed, max_points=max_points)
    configs = {p.name: _point_config(config_path, overrides, p, out / p.name) for p in points}
    base = {
        "config": str(Path(config_path).resolve()) if config_path else None,
        "overrides": list(overrides),
        "zip": zipped,
    }
    grid = {**base, "vary": {k: [_override_value(v) for v in vs] for k, vs in vary.items()}, "seeds": seeds}
    manifest_path = out / MANIFEST
    status: dict[str, str] = {}
    errors: dict[str, str] = {}
    sources: dict[str, str] = {}  # point -> the finished run it reuses
    if manifest_path.is_file():
        saved = json.loads(manifest_path.read_text())
        if {k: saved.get("grid", {}).get(k) for k in base} != base:
            raise ConfigError(
                f"{out} holds another sweep (its sweep.json has a different config file, overrides or --zip); "
                "give another --name (or --out), or repeat that sweep's config and overrides to continue it"
            )
        for row in saved["points"]:
            status[row["name"]] = row["status"]
            if row.get("error"):
                errors[row["name"]] = row["error"]
            if row.get("reused_from"):
                sources[row["name"]] = row["reused_from"]
    for p in points:  # a folder of this name trained with another config would be mixed into the table
        trained = out / p.name
        if p.name in sources or not ((trained / "config.yaml").is_file() and has_checkpoint(trained)):
            continue
        if config_key(load_run_config(trained), configs[p.name]) != config_key(configs[p.name]):
            raise ConfigError(
                f"{trained} was trained with another config than this point's; give another --name "
                "(or --out), or remove that folder to train the point again"
            )
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        rows = []
        for p in points:
            row = {
                "name": p.name,
                "values": p.values,
                "seed": p.seed,
                "status": status.get(p.name, "pending"),
            }
            row["overrides"] = point_overrides(overrides, p)
            if p.name in sources:
                row["reused_from"] = sources[p.name]
            if status.get(p.name) == "failed":
                row["error"] = errors.get(p.name)
            rows.append(row)
        _write_json(manifest_path, {"grid": grid, "points": rows})

    save()
    failed: dict[str, str] = {}
    test_failed: dict[str, str] = {}
    seen_configs: dict[Path, Config | None] = {}  # finished runs' configs, read once (find_finished_run)

    def score(i: int, p: Point) -> None:
        """Test scores of a finished seq2seq point (sweep.test); a failure is recorded, the sweep goes on."""
        if not test or configs[p.name].model.arch != "seq2seq":
            return
        import torch

        from scratchlm.experiments.heldout import score_test_set
        from scratchlm.tokenizer.pretokenize import available_cores

        if jobs > 1:  # beside the training processes: take one process's share of the cores, not all
            torch.set_num_threads(max(1, available_cores() // jobs))
        try:
            record = score_test_set(
                out / sources.get(p.name, p.name),
                test["src"],
                test["ref"],
                beams=test.get("beams", 1),
                device=configs[p.name].train.device,
            )
        except Exception as e:  # noqa: BLE001 - the point trained; its test scoring failing is recorded
            if not isinstance(e, ScratchLMError):
                traceback.print_exc(file=sys.stderr)
            failed[p.name] = test_failed[p.name] = f"test scoring: {_one_line(e)}"
            log(f"[{i}/{len(points)}] {p.name}: {failed[p.name]}")
            return
        log(f"[{i}/{len(points)}] {p.name}: test BLEU {record['bleu']:.2f} chrF {record['chrf']:.2f}")

    def record_failure(i: int, p: Point, error: str) -> None:
        failed[p.name] = errors[p.name] = error
        status[p.name] = "failed"
        save()
        log(f"[{i}/{len(points)}] {p.name}: failed: {error}")

    def record_done(i: int, p: Point, detail: str) -> None:
        status[p.name] = "done"
        errors.pop(p.name, None)
        save()
        log(f"[{i}/{len(points)}] {p.name}: {detail}")
        score(i, p)

    def needs_training(i: int, p: Point) -> bool:
        """False for a point done already or reused from a finished run (then scored); True otherwise."""
        run_dir = out / p.name
        if status.get(p.name) == "done" and (out / sources.get(p.name, p.name)).is_dir():
            log(f"[{i}/{len(points)}] {p.name}: done already, skipped")
            score(i, p)
            return False
        sources.pop(p.name, None)
        if run_dir.exists() and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir)  # a start without any checkpoint: its partial logs would be appended to
        if not run_dir.exists():
            same = find_finished_run(out, configs[p.name], exclude=run_dir, loaded=seen_configs)
            if same is not None:
                sources[p.name] = os.path.relpath(same, out)
                status[p.name] = "done"
                save()
                log(f"[{i}/{len(points)}] {p.name}: reused {same} (the same resolved config, finished)")
                score(i, p)
                return False
        if jobs == 1:
            record_start(i, p)
        else:
            log(f"[{i}/{len(points)}] {p.name}: queued")
        return True

    def record_start(i: int, p: Point) -> None:
        log(f"[{i}/{len(points)}] {p.name}: {'resuming' if (out / p.name).exists() else 'training'}")
        status[p.name] = "running"
        save()

    def result_of(interrupted: bool) -> dict[str, Any]:
        return {"out": out, "points": points, "table": None, "interrupted": interrupted, "failed": failed}

    if jobs > 1:
        todo = [(i, p) for i, p in enumerate(points, 1) if needs_training(i, p)]
        stopped = _train_in_processes(
            todo, config_path, overrides, out, jobs, record_start, record_done, record_failure, log
        )
        if stopped:
            log("sweep interrupted; run the same command again to continue it")
            return result_of(True)
    for i, p in enumerate(points, 1) if jobs == 1 else []:
        if not needs_training(i, p):
            continue
        try:
            result = run(configs[p.name])
        except Exception as e:  # noqa: BLE001 - any failure of one point is recorded; the sweep goes on
            if not isinstance(e, ScratchLMError):
                traceback.print_exc(file=sys.stderr)  # a bug, not a user error: keep its traceback
            record_failure(i, p, _one_line(e))
            continue
        if result["stopped_reason"] == "interrupted":
            log(f"sweep interrupted during {p.name}; run the same command again to continue it")
            return result_of(True)
        record_done(i, p, result["stop_detail"])
    table = write_sweep_report(
        out,
        points,
        list(vary),
        sources={k: out / v for k, v in sources.items()},
        failed={k: v for k, v in failed.items() if k not in test_failed},
        notes=test_failed,
        overrides={p.name: point_overrides(overrides, p) for p in points},
        config=config_path,
        test=test,
    )
    return {"out": out, "points": points, "table": table, "interrupted": False, "failed": failed}


def _train_in_processes(
    todo, config_path, overrides, out: Path, jobs: int, on_start, on_done, on_failure, log
) -> bool:
    """Train ``todo`` ([(i, point)]) ``jobs`` at a time, each as ``python -m scratchlm train CONFIG <point's
    overrides> train.run_dir=out/<point>`` (which resumes a run directory that has a checkpoint) with
    ``cores // jobs`` threads. Returns True when interrupted (Ctrl-C: every child checkpoints and stops)."""
    import subprocess
    import time

    from scratchlm.tokenizer.pretokenize import available_cores

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, available_cores() // jobs)))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    queue, running = list(todo), []  # running: (i, point, process, log path, log file)
    started = 0
    interrupted = False
    try:
        while queue or running:
            # the first point trains the tokenizer and prepares the data that the others share (the cache):
            # the others start once its run directory holds tokenizer.json (or it has ended)
            first = running[0] if started == 1 and running else None
            warming = first is not None and first[2].poll() is None
            if not (warming and not (out / first[1].name / "tokenizer.json").is_file()):
                limit = 1 if started == 0 else jobs  # fixed before the loop: the first starts alone
                while queue and len(running) < limit:
                    i, p = queue.pop(0)
                    on_start(i, p)
                    args = [*point_overrides(overrides, p), f"train.run_dir={out / p.name}"]
                    config = [str(config_path)] if config_path else []
                    cmd = [sys.executable, "-m", "scratchlm", "train", *config, *args]
                    path = out / "logs" / f"{p.name}.log"
                    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the process ends
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
                    running.append((i, p, proc, path, f))
                    started += 1
                    log(f"[{i}] {p.name}: started ({env['OMP_NUM_THREADS']} threads), log {path}")
            time.sleep(0.5)
            for item in [r for r in running if r[2].poll() is not None]:
                running.remove(item)
                i, p, proc, path, f = item
                f.close()
                stop = _last_stop(out / p.name)
                if proc.returncode == 0 and stop and stop.get("reason") != "interrupted":
                    on_done(i, p, stop.get("detail") or "finished")
                elif stop and stop.get("reason") == "interrupted":
                    interrupted = True
                else:
                    on_failure(i, p, _last_error(path, proc.returncode))
            if interrupted and not running:
                return True
    except KeyboardInterrupt:
        for _, _, proc, _, f in running:  # they got the same SIGINT: let them write their checkpoints
            proc.wait()
            f.close()
        return True
    return interrupted


def _last_stop(run_dir: Path) -> dict[str, Any] | None:
    from scratchlm.train.metrics import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return None
    stops = [r for r in read_metrics(run_dir) if r.get("kind") == "stop"]
    return stops[-1] if stops else None


def _last_error(log_path: Path, returncode: int) -> str:
    """The one-line error of a failed ``scratchlm train`` process: its ``error: ...`` line, else the last
    line it wrote (a traceback's exception), else its exit code."""
    lines = [
        ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"the training process exited with code {returncode}"


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


def write_sweep_report(
    out: Path,
    points: list[Point],
    keys: list[str],
    *,
    sources: dict[str, Path] | None = None,
    failed: dict[str, str] | None = None,
    overrides: dict[str, list[str]] | None = None,
    config: str | Path | None = None,
    notes: dict[str, str] | None = None,
    test: dict[str, Any] | None = None,
) -> str:
    """sweep.md, results.json and plots/ of a finished sweep; returns the table.

    sources: point -> the run directory it reuses (default ``out/<point>``); failed: point -> its one-line
    error (the row says "failed", the list below the table gives the error); overrides: point -> the
    overrides it ran with (listed per point); notes: point -> a problem after training (test scoring);
    test: the sweep.test spec, described above the table.
    """
    from scratchlm.viz.curves import plot_curves

    sources, failed, overrides = sources or {}, failed or {}, overrides or {}
    where = {p.name: Path(sources.get(p.name, out / p.name)) for p in points}
    summaries = {
        p.name: _failed_summary(failed[p.name]) if p.name in failed else summarize_run(where[p.name])
        for p in points
    }
    table = sweep_table(points, summaries, keys)
    _write_json(out / "results.json", [dict(summaries[p.name], point=p.name) for p in points])
    figures = []
    for key in keys:
        values = list(dict.fromkeys(str(p.values[key]) for p in points))
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
        color = {v: palette[i % len(palette)] for i, v in enumerate(values)}
        series, labelled = [], set()
        for p in points:
            if p.name in failed and not (where[p.name] / "metrics.jsonl").is_file():
                continue  # failed before logging anything: no curve
            v = str(p.values[key])
            series.append(
                {
                    "label": f"{key}={v}" if v not in labelled else None,
                    "curves": curves(where[p.name]),
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
        "bits/byte = loss / ln 2 x tokens / UTF-8 bytes of the validation split; "
        "accuracy = next-token top-k accuracy on the same tokens; FLOPs/token = training FLOPs (6N + attention).",
        "",
    ]
    if test:
        search = "greedy" if test.get("beams", 1) == 1 else f"beam {test['beams']}"
        lines += [
            f"Test: sacreBLEU and chrF (sacrebleu defaults, raw cased text) of {search} translations of "
            f"`{Path(test['src']).name}` against `{Path(test['ref']).name}`, by each run's final model "
            "(averaged/ when the run wrote it, else best/); the test set chooses nothing. val ppl (all pairs, "
            "no LS) = exp(loss) of that model on every validation pair without label smoothing (the val loss "
            "and val ppl columns are training's evaluations: eval.batches batches, label smoothing included).",
            "",
        ]
    lines += [table]
    if failed:
        lines += [
            f"{len(failed)} of {len(points)} runs failed (below); run the same command again to retry them.",
            "",
        ]
    for key, path in figures:
        lines += [f"![loss by {key}]({path.relative_to(out)})", ""]
    base = f"`scratchlm train {_display_path(config)}`" if config else "`scratchlm train`"
    lines += [
        f"Runs: each is {base} with the overrides listed (and train.run_dir=<this folder>/<run>); a run "
        "marked *reused* was not trained again: its resolved config equals that of the finished run named, "
        "whose numbers it shows.",
        "",
    ]
    for p in points:
        if p.name in failed:
            what = f"**failed**: {failed[p.name]}"
        else:
            what = summaries[p.name]["stop_detail"] or "unfinished"
            if p.name in sources:
                what = f"*reused* `{os.path.relpath(where[p.name], out)}`; {what}"
        if p.name in (notes or {}):
            what += f"; **{notes[p.name]}**"
        args = " ".join(overrides.get(p.name, []))
        lines.append(f"- `{p.name}`: {what}" + (f"; overrides `{args}`" if args else ""))
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return table


def _failed_summary(error: str) -> dict[str, Any]:
    """The table row's numbers of a failed point: none, and why."""
    keys = ("params", "flops_per_token", "tokens", "wall_time", "best_val_loss", *EVAL_KEYS, *TEST_KEYS)
    return {**dict.fromkeys(keys), "stop_reason": "failed", "stop_detail": f"failed: {error}"}


def _display_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
