"""Sweeps, comparisons and reports on tiny char-level runs (seconds each, deterministic on CPU)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.config import load_config, load_run_config
from scratchlm.errors import ConfigError
from scratchlm.experiments.compare import compare_runs
from scratchlm.experiments.report import write_report
from scratchlm.experiments.runs import summarize_run
from scratchlm.experiments.sweep import Point, parse_vary, plan, sweep_table
from scratchlm.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

TINY = """\
preset: cpu-tiny
tokenizer:
  kind: char
data:
  source: [text.txt]
model:
  n_layer: 1
  d_model: 16
  context_length: 16
train:
  max_steps: 8
  ckpt_interval: 2
  log_interval: 2
  device: cpu
  dtype: float32
  deterministic: true
eval:
  interval: 4
  batches: 2
  sample_tokens: 4
sweep:
  vary:
    model.n_head: [1, 2]
    model.pos: [learned, none]
"""
POINTS = ["n_head=1_pos=learned", "n_head=1_pos=none", "n_head=2_pos=learned", "n_head=2_pos=none"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A folder with text.txt and tiny.yaml (a 2x2 grid), a private cache, and the grid swept once without
    interruption into ``straight/`` (run from another directory: the config's relative data path must
    resolve against the config's own folder)."""
    root = tmp_path_factory.mktemp("experiments")
    folder = root / "study"
    folder.mkdir()
    text = ("To be, or not to be, that is the question:\n" * 40) + "Whether 'tis nobler in the mind\n" * 40
    (folder / "text.txt").write_text(text)
    (folder / "tiny.yaml").write_text(TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCRATCHLM_CACHE", str(root / "cache"))
        mp.chdir(root)
        assert main(["sweep", str(folder / "tiny.yaml"), "--out", str(root / "straight")]) == 0
        yield folder


def _table_without_time(out: Path) -> str:
    """The sweep table with the wall-time column blanked (the only number that differs between runs)."""
    summaries = {}
    for name in POINTS:
        s = summarize_run(out / name)
        s["wall_time"] = None
        summaries[name] = s
    vary = {"model.n_head": [1, 2], "model.pos": ["learned", "none"]}
    return sweep_table(plan(vary, zipped=False, seeds=1, base_seed=1337), summaries, list(vary))


# a child process and seven more tiny runs (~20 s on an idle 2-core machine): in the default suite, as the
# issue's done-when asks
def test_sweep_killed_midway_resumes_and_matches_an_uninterrupted_sweep(study, tmp_path, monkeypatch):
    config = str(study / "tiny.yaml")
    straight = study.parent / "straight"
    monkeypatch.setenv("SCRATCHLM_CACHE", str(study.parent / "cache"))

    killed = tmp_path / "killed"
    child = [sys.executable, str(Path(__file__).parent / "sweep_child.py"), POINTS[1], "4"]
    proc = subprocess.run(
        [*child, "sweep", config, "--out", str(killed)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    manifest = json.loads((killed / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["done", "running", "pending", "pending"]
    first = {p: p.stat().st_mtime_ns for p in (killed / POINTS[0]).rglob("*") if p.is_file()}
    assert max(r["step"] for r in read_metrics(killed / POINTS[1])) >= 4  # half finished, checkpoint at 4

    assert main(["sweep", config, "--out", str(killed)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (killed / POINTS[0]).rglob("*") if p.is_file()} == first
    assert [p["status"] for p in json.loads((killed / "sweep.json").read_text())["points"]] == ["done"] * 4
    resumed = read_metrics(killed / POINTS[1])
    assert [r["step"] for r in resumed if r["kind"] == "eval"] == [4, 8]  # each evaluation once
    assert _table_without_time(killed) == _table_without_time(straight)
    for name in POINTS:  # exact resume: the same final numbers, bit for bit
        a, b = summarize_run(killed / name), summarize_run(straight / name)
        assert {k: v for k, v in a.items() if k not in ("wall_time", "run_dir")} == {
            k: v for k, v in b.items() if k not in ("wall_time", "run_dir")
        }
    md = (killed / "sweep.md").read_text()
    assert (
        "![loss by model.n_head](plots/loss_by_n_head.png)" in md
        and (killed / "plots/loss_by_pos.png").is_file()
    )

    # another base (config or overrides) in the same folder is refused, not mixed in
    assert main(["sweep", config, "train.max_steps=6", "--out", str(killed)]) == 2
    # a smaller grid (a value dropped, e.g. one that failed) is accepted: nothing retrained
    assert main(["sweep", config, "--out", str(killed), "--vary", "model.n_head=1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (killed / POINTS[0]).rglob("*") if p.is_file()} == first
    rows = [line for line in (killed / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[:2] for r in rows[1:]] == [["| 1", "learned"], ["| 1", "none"]]  # n_head=1 only


def test_sweep_and_compare_tables_equal_each_runs_evaluation(study, tmp_path):
    out = study.parent / "straight"
    results = json.loads((out / "results.json").read_text())
    assert [r["point"] for r in results] == POINTS
    runs = [out / name for name in POINTS]
    table = (out / "sweep.md").read_text()
    for r, run in zip(results, runs):
        last = [m for m in read_metrics(run) if m["kind"] == "eval"][-1]
        for key in ("val_loss", "val_ppl", "val_bpb", "val_acc_top1", "val_acc_top5"):
            assert r[key] == last[key], key
        # bits per byte of a char-level run: loss / ln 2 * tokens / bytes of the validation split
        meta = json.loads((Path(load_run_config(run).data.data_dir) / "meta.json").read_text())
        val = meta["splits"]["val"]
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * val["tokens"] / val["bytes"])
        n_head, pos = r["point"].removeprefix("n_head=").split("_pos=")
        row = next(line for line in table.splitlines() if line.startswith(f"| {n_head} | {pos} |"))
        assert f"| {last['val_loss']:.4f} |" in row and f"| {last['val_acc_top1']:.2%} |" in row
    cmp = compare_runs(runs, tmp_path / "cmp")
    for r in results:
        row = next(line for line in cmp["table"].splitlines() if line.startswith(f"| {r['point']} "))
        assert f"| {r['val_loss']:.4f} |" in row and f"| {r['val_acc_top1']:.2%} |" in row
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"compare.md", "loss.png", "perplexity.png"}


def test_sweep_table_mean_and_spread_over_seeds():
    import statistics

    points = [Point(f"p{i}", {"model.pos": "rope"}, 1337 + i) for i in range(3)]
    losses = [2.0, 2.5, 3.5]
    summaries = {
        p.name: {
            "params": 10,
            "flops_per_token": 60,
            "tokens": 100,
            "wall_time": 1.0,
            "val_loss": v,
            "stop_reason": "max_steps",
        }
        for p, v in zip(points, losses)
    }
    row = sweep_table(points, summaries, ["model.pos"]).splitlines()[2]
    assert row.startswith("| rope | 3 | 10 | 60 | 100 | 1 ± 0 |")  # size and tokens: no spread to show
    assert f"| {statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f} |" in row  # 2.6667 ± 0.7638


def test_compare_shows_bleu_and_chrf_when_logged(tmp_path):
    """A seq2seq run's metrics.jsonl (hand-written here) carries val_bleu / val_chrf: they get columns."""
    from scratchlm.config import load_config, save_config

    run = tmp_path / "mt"
    run.mkdir()
    save_config(
        load_config(overrides=["preset=cpu-tiny", "model.arch=seq2seq", "model.vocab_size=300"]),
        run / "config.yaml",
    )
    records = [
        {
            "kind": "train",
            "step": 10,
            "loss": 5.0,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens": 640,
            "tokens_per_s": 9.0,
            "time": 2.0,
        },
        {"kind": "eval", "step": 10, "val_loss": 4.5, "val_ppl": 90.0, "val_bleu": 12.34, "val_chrf": 40.5},
        {"kind": "stop", "step": 10, "reason": "max_steps", "detail": "reached train.max_steps=10"},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = compare_runs([run], tmp_path / "cmp")["table"]
    header, _, row = table.splitlines()[:3]
    assert "| BLEU | chrF |" in header and "| 12.34 | 40.50 |" in row
    points = [Point("a", {"model.pos": "x"}, 1)]
    assert "| 12.34 | 40.50 |" in sweep_table(points, {"a": summarize_run(run)}, ["model.pos"])


def test_report_has_every_section(study, tmp_path):
    run = study.parent / "straight" / "n_head=2_pos=none"
    path = write_report(run, tmp_path / "report")
    text = path.read_text()
    for section in (
        "Why the run stopped",
        "Config",
        "Model",
        "Data",
        "Curves",
        "Evaluation",
        "Speed",
        "Samples",
        "Environment",
    ):
        assert f"## {section}" in text, section
    assert "reached train.max_steps=8" in text
    assert "| `model.n_layer` | `1` | `2` |" in text  # differs from the cpu-tiny preset
    assert "| `model.pos` | `none` | `learned` |" in text
    assert "prefill tokens/s" in text and text.count("```") == 6  # three samples at fixed seeds
    for png in ("loss.png", "perplexity.png", "lr.png", "throughput.png"):
        assert (path.parent / png).is_file() and f"]({png})" in text
    assert "train: " in text and "tokens in 1 documents" in text


def test_sweep_grid_and_vary_parsing():
    assert parse_vary(["model.n_head=1,4,8"]) == {"model.n_head": [1, 4, 8]}
    assert parse_vary(["model.pos=[learned, none]"]) == {"model.pos": ["learned", "none"]}
    points = plan({"a.x": [1, 2], "b.y": ["p", "q"]}, zipped=True, seeds=2, base_seed=5)
    assert [(p.name, p.seed) for p in points] == [
        ("x=1_y=p_seed=5", 5),
        ("x=1_y=p_seed=6", 6),
        ("x=2_y=q_seed=5", 5),
        ("x=2_y=q_seed=6", 6),
    ]
    assert len(plan({"a.x": [1, 2], "b.y": ["p", "q", "r"]}, zipped=False, seeds=1, base_seed=0)) == 6
    with pytest.raises(ConfigError, match="same number of values"):
        plan({"a.x": [1, 2], "b.y": ["p"]}, zipped=True, seeds=1, base_seed=0)
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan({}, zipped=False, seeds=1, base_seed=0)
    # --zip pairs values, so one key may repeat a value as long as the points differ
    zipped = plan({"a.x": ["adamw", "muon", "muon"], "b.y": [1, 1, 2]}, zipped=True, seeds=1, base_seed=0)
    assert [p.name for p in zipped] == ["x=adamw_y=1", "x=muon_y=1", "x=muon_y=2"]
    with pytest.raises(ConfigError, match=r"--zip gives the point \{'a.x': 'muon', 'b.y': 1\} twice"):
        plan({"a.x": ["adamw", "muon", "muon"], "b.y": [1, 1, 1]}, zipped=True, seeds=1, base_seed=0)
    with pytest.raises(ConfigError, match="--vary a.x lists a value twice"):
        plan({"a.x": [1, 1], "b.y": [2]}, zipped=False, seeds=1, base_seed=0)
    with pytest.raises(ConfigError, match="section.key=v1,v2"):
        parse_vary(["n_head=1,2"])


def test_sweep_bad_point_is_refused_before_any_run(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(study.parent / "cache"))
    assert (
        main(
            ["sweep", str(study / "tiny.yaml"), "--out", str(tmp_path / "bad"), "--vary", "model.n_head=1,3"]
        )
        == 2
    )
    assert "model.d_model=16 must be divisible by model.n_head=3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_ablation_configs_load_with_their_grids():
    from scratchlm.config import load_config
    from scratchlm.experiments.sweep import file_grid

    for name, key in (
        ("heads", "model.n_head"),
        ("depth", "model.n_layer"),
        ("pos", "model.pos"),
        ("optimizer", "train.optimizer"),
    ):
        path = REPO / "configs" / "ablations" / f"{name}.yaml"
        cfg = load_config(path)
        assert (
            Path(cfg.data.source[0]).resolve() == (REPO.parent / "shared/data/tinyshakespeare.txt").resolve()
        )
        assert key in file_grid(path)["vary"]


def test_sweep_reuses_a_finished_run_with_the_same_config_from_a_sibling_sweep(study, monkeypatch):
    """pos.yaml, heads.yaml and depth.yaml share their baseline point: it is trained once."""
    monkeypatch.setenv("SCRATCHLM_CACHE", str(study.parent / "cache"))
    monkeypatch.chdir(study.parent)
    out = study.parent / "sibling"  # beside straight/, as runs/sweeps/heads beside runs/sweeps/pos
    args = ["sweep", str(study / "tiny.yaml"), "--out", str(out), "--vary", "model.n_head=2,4"]
    assert main([*args, "--vary", "model.pos=none"]) == 0
    manifest = {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert manifest["n_head=2_pos=none"]["reused_from"] == "../straight/n_head=2_pos=none"
    assert not (out / "n_head=2_pos=none").exists()  # not retrained
    assert (out / "n_head=4_pos=none" / "metrics.jsonl").is_file()  # a new config: trained
    results = {r["point"]: r for r in json.loads((out / "results.json").read_text())}
    theirs = summarize_run(study.parent / "straight" / "n_head=2_pos=none")
    assert results["n_head=2_pos=none"]["val_loss"] == theirs["val_loss"]
    md = (out / "sweep.md").read_text()
    assert "- `n_head=2_pos=none`: *reused* `../straight/n_head=2_pos=none`" in md
    # every override each point ran with is listed
    assert "overrides `model.n_head=4 model.pos=none train.seed=1337 train.name=n_head=4_pos=none`" in md


def test_a_failing_point_is_recorded_and_the_sweep_goes_on_then_retried(study, tmp_path, monkeypatch, capsys):
    import scratchlm.pipeline as pipeline
    from scratchlm.errors import TrainingError

    monkeypatch.setenv("SCRATCHLM_CACHE", str(study.parent / "cache"))
    real_run = pipeline.run

    def run_or_fail(cfg, *a, **kw):  # the first point diverges (as a NaN loss does), the others train
        if cfg.train.name == "n_head=1_pos=learned":
            raise TrainingError("loss is nan at step 3; lower train.lr")
        return real_run(cfg, *a, **kw)

    monkeypatch.setattr(pipeline, "run", run_or_fail)
    out = tmp_path / "s"
    args = ["sweep", str(study / "tiny.yaml"), "--out", str(out), "--vary", "model.n_head=1,2"]
    assert main([*args, "--vary", "model.pos=learned"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "Traceback" not in err
    manifest = json.loads((out / "sweep.json").read_text())["points"]
    assert [(p["status"], p.get("error")) for p in manifest] == [
        ("failed", "loss is nan at step 3; lower train.lr"),
        ("done", None),
    ]
    md = (out / "sweep.md").read_text()
    assert "- `n_head=1_pos=learned`: **failed**: loss is nan at step 3; lower train.lr" in md
    assert "| 1 | learned | 1 | - |" in md and md.count("| failed |") == 1

    # re-running retries the failed point (the finished one is kept)
    monkeypatch.setattr(pipeline, "run", real_run)
    assert main([*args, "--vary", "model.pos=learned"]) == 0
    assert [p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["done"] * 2
    assert "failed" not in (out / "sweep.md").read_text()


def test_sweep_refuses_bad_specs_in_one_line_before_any_run(study, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(study.parent / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(study / "tiny.yaml")
    cases = [
        (["--vary", "model.n_head=1,2", "--vary", "model.n_head=2"], "--vary model.n_head is given twice"),
        (
            [
                "--vary",
                "train.lr=" + ",".join(f"{i + 1}e-4" for i in range(1500)),
                "--vary",
                "train.min_lr=" + ",".join(f"{i + 1}e-6" for i in range(1500)),
            ],
            "the sweep has 9,000,000 runs, more than the limit of 1,000; vary fewer values, "
            "or raise the limit with --max-points 9000000",
        ),
        (["--name", "../../x"], "sweep --name='../../x' is a path, not a name"),
        (["--name", ""], "sweep --name='' is empty"),
    ]
    for extra, message in cases:
        assert main(["sweep", config, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing written anywhere
    # the limit can be raised: a grid of 4 refused at --max-points 3
    assert main(["sweep", config, "--max-points", "3", "--out", str(tmp_path / "x")]) == 2
    assert "raise the limit with --max-points 4" in capsys.readouterr().err
    # train.name goes through the same check
    with pytest.raises(ConfigError, match=r"train.name='a/b' is a path, not a name"):
        load_config(None, ["train.name=a/b"])


def test_sweep_jobs_trains_points_in_parallel_processes_with_the_same_results(study, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))  # a cold cache: the first point fills it
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))  # the children import this checkout
    out = tmp_path / "jobs"
    args = ["sweep", str(study / "tiny.yaml"), "--out", str(out), "--vary", "model.pos=none", "--jobs", "2"]
    assert main(args) == 0
    names = ["n_head=1_pos=none", "n_head=2_pos=none"]
    assert [p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["done", "done"]
    for name in names:  # the same numbers as the in-process sweep (one thread per process here)
        a, b = summarize_run(out / name), summarize_run(study.parent / "straight" / name)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5) and a["tokens"] == b["tokens"]
        assert "stopped: reached train.max_steps=8" in (out / "logs" / f"{name}.log").read_text()
    first, second = ((out / "logs" / f"{name}.log").read_text() for name in names)
    assert "tokenizer: training" in first and "tokenizer: training" not in second  # the second waited for it
    assert "prepared " in first and "is up to date" in second  # the same for the shards
    assert main(args) == 0  # again: nothing to do


def test_a_failed_training_process_gives_its_one_line_error(tmp_path):
    from scratchlm.experiments.sweep import _last_error

    log = tmp_path / "p.log"
    log.write_text("# resolved config\nmodel:\n  n_layer: 1\nerror: loss is nan at step 3; lower train.lr\n")
    assert _last_error(log, 2) == "loss is nan at step 3; lower train.lr"
    log.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: out of memory\n")
    assert _last_error(log, 1) == "RuntimeError: out of memory"
    log.write_text("")
    assert _last_error(log, -9) == "the training process exited with code -9"
