"""benchmarks/nanogpt_recipe.py at a tiny scale: both peers run as commands and the result files hold
the ratios, the per-run figures, the machine and the load average."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "nanogpt_recipe.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("nanogpt_recipe", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nanogpt_recipe_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # seconds, even on a busy machine (see train/threads.py)
    lines = [
        f"{name}: {verb} the {thing}, good {name.lower()}."
        for name in ("ROMEO", "JULIET", "NURSE")
        for verb in ("speak", "hold", "mark")
        for thing in ("night", "sword", "moon", "letter")
    ]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines * 20) + "\n")
    out = tmp_path / "results"
    bench = load_bench()
    argv = ["--iters", "2", "--rounds", "1", "--eval-interval", "1", "--eval-iters", "1"]
    assert bench.main([*argv, "--data", str(text), "--out", str(out)]) == 0

    result = json.loads((out / "nanogpt_recipe.json").read_text())
    assert result["iters"] == 2 and result["rounds"] == 1
    assert {"cpu", "cores", "torch"} <= result["machine"].keys()
    assert result["load_avg_min"] <= result["load_avg_max"] and isinstance(
        result["measured_under_load"], bool
    )
    runs = {r["peer"]: r for r in result["runs"]}
    assert runs.keys() == {"nanogpt", "scratchlm"}
    assert runs["nanogpt"]["steps"] == 3  # nanoGPT's loop runs iterations 0..max_iters
    assert runs["scratchlm"]["steps"] == 2
    for r in runs.values():
        assert r["tokens"] == r["steps"] * 12 * 64
        assert 0 < r["wall_to_ckpt_s"] <= r["wall_to_exit_s"] + 1e-6
        assert 0 < r["step_time_s"] < r["wall_to_exit_s"]
        assert 3.0 < r["val_loss_full"] < 5.0  # ~ln(vocab) after 2-3 steps from a N(0, 0.02) init
        assert r["val_loss_last_eval"] is not None
    s = result["summary"]
    a, b = runs["nanogpt"], runs["scratchlm"]
    assert s["wall_ratio"] == pytest.approx(a["wall_to_ckpt_s"] / b["wall_to_ckpt_s"])
    want_step = (b["tokens"] / b["step_time_s"]) / (a["tokens"] / a["step_time_s"])
    assert s["step_ratio"] == pytest.approx(want_step)
    md = (out / "nanogpt_recipe.md").read_text()
    assert "Wall to wall" in md and "load average" in md.lower() and md.count("| 0 |") == 2


def test_profile_step_splits_the_whole_step(tmp_path):
    """--profile-step: the rows (matrix products, attention, GELU, LayerNorm, AdamW, the rest) add up to the
    profiled total, none is negative, and the recipe's matrix products and attention kernel are found."""
    rows = load_bench().profile_step(tmp_path / "profile.md", steps=2, timed=2, warmup=1)
    assert len(rows) == 6 and all(ms >= 0 for ms in rows.values())
    assert rows["matrix products (mm, addmm, bmm)"] > 0 and rows["attention (SDPA, forward + backward)"] > 0
    text = (tmp_path / "profile.md").read_text()
    total = float(text.split("| **profiled total** | **")[1].split("**")[0])
    assert total == pytest.approx(sum(rows.values()), abs=0.1)
    assert "--profile-step" in text and "GFLOP/s" in text
