"""The translation studies (configs/ablations/multi30k-{pos,heads,depth}.yaml): their grids, test files and GPU
size resolve, and the pos study runs end to end scaled down to seconds: every point trained, scored on the test
pair by sacreBLEU and chrF and by validation perplexity, in sweep.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.experiments.sweep import file_grid

REPO = Path(__file__).resolve().parents[2]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
STUDIES = {"pos": ("model.pos", ["sinusoidal", "none", "learned"]), "heads": ("model.n_head", [1, 4, 8])}
STUDIES["depth"] = ("model.n_layer", [2, 4, 6])
# the GPU recipe's size (configs/multi30k-de-en.yaml), as docs/experiments.md gives it
GPU_SIZE = [
    "train.device=cuda", "train.dtype=bfloat16", "model.d_model=512", "model.n_head=8", "model.d_ff=2048",
    "model.dropout=0.2", "tokenizer.vocab_size=8000", "data.batch_tokens=12000", "train.batch_size=128",
    "train.max_time=150", "train.warmup_steps=300",
]  # fmt: skip
# what the scaled-down test changes: a tiny model, a few steps (everything else is the study's file)
TINY = [
    "model.d_model=32", "model.d_ff=64", "model.n_layer=1", "tokenizer.vocab_size=320",
    "data.batch_tokens=600", "train.max_time=null", "train.schedule_clock=steps", "train.max_steps=4", "train.warmup_steps=2",
    "train.ckpt_interval=2", "train.keep_last=2", "train.average_last=2", "eval.interval=4",
    "eval.bleu_sentences=4", "eval.batches=2", "eval.sample_tokens=4", "eval.num_samples=1",
]  # fmt: skip


@pytest.mark.parametrize("study", STUDIES)
def test_translation_study_configs_resolve_at_cpu_and_gpu_size(study):
    path = REPO / "configs" / "ablations" / f"multi30k-{study}.yaml"
    key, values = STUDIES[study]
    grid = file_grid(path)
    assert grid["vary"] == {key: values} and grid["jobs"] == 2  # two points at once, one core each
    assert [Path(grid["test"][k]).name for k in ("src", "ref")] == [
        "test_2016_flickr.de",
        "test_2016_flickr.en",
    ]
    for size in ([], GPU_SIZE):
        for value in values:
            cfg = load_config(path, [*size, f"{key}={value}"])
            assert cfg.model.arch == "seq2seq" and cfg.data.src_lang == "de" and cfg.data.tgt_lang == "en"
            assert Path(cfg.data.source[0]).resolve() == (MULTI30K / "train").resolve()
    assert load_config(path, GPU_SIZE).train.device == "cuda"


def _head(src: Path, dst: Path, n: int) -> None:
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k (present in CI)")
def test_pos_study_scaled_down_scores_each_point_on_the_test_set(tmp_path, monkeypatch):
    pytest.importorskip("sacrebleu")
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))  # sweep.jobs: 2 trains in child processes
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 200), ("val", 16), ("test_2016_flickr", 8)):
        for lang in ("de", "en"):
            _head(MULTI30K / f"{split}.{lang}", data / f"{split}.{lang}", n)
    values = yaml.safe_load((REPO / "configs/ablations/multi30k-pos.yaml").read_text())
    values["data"].update(source=[str(data / "train")], val_source=[str(data / "val")])
    values["sweep"]["test"] = {
        "src": str(data / "test_2016_flickr.de"),
        "ref": str(data / "test_2016_flickr.en"),
    }
    config = tmp_path / "multi30k-pos.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "sweeps" / "pos"
    assert main(["sweep", str(config), *TINY, "--out", str(out)]) == 0

    results = {r["point"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(results) == ["pos=sinusoidal", "pos=none", "pos=learned"]
    md = (out / "sweep.md").read_text()
    assert "| test BLEU | test chrF |" in md and "val ppl (all pairs, no LS)" in md
    assert "`test_2016_flickr.de` against `test_2016_flickr.en`" in md
    for name, r in results.items():
        record = [
            m
            for m in map(json.loads, (out / name / "metrics.jsonl").open())
            if m["kind"] == "eval_translation"
        ]
        assert len(record) == 1 and record[0]["which"] == "averaged" and record[0]["sentences"] == 8
        assert r["test_bleu"] == record[0]["bleu"] and 0 <= r["test_chrf"] <= 100
        assert r["val_pairs_ppl"] == pytest.approx(math.exp(record[0]["val_pairs_loss"]))
        assert (out / name / "eval" / "test_test_2016_flickr_beam1.hyp").read_text().count("\n") == 8
    assert all((out / "logs" / f"{name}.log").is_file() for name in results)  # trained two at a time
    # run again: nothing retrained, nothing scored twice
    assert main(["sweep", str(config), *TINY, "--out", str(out)]) == 0
    again = [
        m
        for m in map(json.loads, (out / "pos=none" / "metrics.jsonl").open())
        if m["kind"] == "eval_translation"
    ]
    assert len(again) == 1
