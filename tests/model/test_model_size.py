"""Model sizes from any config are checked before allocation (model/size.py): a run's config.yaml with
`d_model: 100000000` (generate: allocator traceback), an HF config.json with `n_embd=1e9` (finetune:
storage-overflow traceback) or one that is a JSON list (AttributeError) are one line each."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import load_config, save_config, to_dict
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.model import build_model
from scratchlm.model.hf import hf_model_config
from scratchlm.model.size import check_model_fits
from scratchlm.tokenizer import CharTokenizer
from scratchlm.train.checkpoint import save_checkpoint

TEXT = "hello world, the quick brown fox jumps over the lazy dog\n" * 5
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context_length=16"]


@pytest.fixture
def run_dir(tmp_path):
    tok = CharTokenizer.train([TEXT])
    cfg = load_config(overrides=["preset=cpu-tiny", f"model.vocab_size={tok.vocab_size}", *TINY])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, 1, build_model(cfg.model), {}, {"step": 1}, keep_last=1)
    return run


def _set_model(run, **values):
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())
    data["model"].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _one_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("command", ["generate", "eval", "export", "explain"])
def test_a_huge_run_config_is_refused_before_allocation(run_dir, tmp_path, capsys, command):
    _set_model(run_dir, d_model=100_000_000, n_head=2)
    argv = {
        "generate": ["generate", str(run_dir), "--prompt", "hello", "--max-new-tokens", "2"],
        "eval": ["eval", str(run_dir)],
        "export": ["export", str(run_dir), "--out", str(tmp_path / "hf")],
        "explain": ["explain", str(run_dir), "--untrained", "--out", str(tmp_path / "x")],
    }[command]
    assert main(argv) == 2
    _one_line(capsys, f"{run_dir}/config.yaml", "far too large")
    assert not (tmp_path / "hf").exists()


def test_a_model_larger_than_memory_is_refused_with_its_size(run_dir, capsys, monkeypatch):
    from scratchlm.train import dryrun

    monkeypatch.setattr(dryrun, "device_memory", lambda device: 50_000)  # 50 kB of "RAM"
    assert main(["generate", str(run_dir), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    _one_line(capsys, "parameters", "GiB of weights, more than the", "cpu memory")


def test_check_model_fits_counts_parameters_exactly():
    cfg = load_config(overrides=["preset=cpu-tiny", "model.vocab_size=100", *TINY]).model
    assert check_model_fits(cfg, "x") == sum(p.numel() for p in build_model(cfg).parameters())


def _hf_dir(tmp_path, config) -> str:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    CharTokenizer.train([TEXT]).save(d / "tokenizer.json")
    return str(d)


GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 2}


@pytest.mark.parametrize(
    "config, fragment",
    [
        ([GPT2], "holds a JSON list"),
        ("gpt2", "holds a JSON str"),
        ({**GPT2, "n_embd": 10**9}, "far too large"),
        ({**GPT2, "n_embd": 1e9}, "far too large"),
        ({**GPT2, "n_embd": 1e300}, "d_model=about 10"),  # (found by the fuzz test: an OverflowError)
        ({**GPT2, "n_embd": "wide"}, "model.d_model must be an integer"),
        ({**GPT2, "n_head": 3}, "n_head"),
        ({"model_type": "llama", "vocab_size": 64}, "the setting 'hidden_size' is missing"),
        ({**GPT2, "activation_function": ["gelu"]}, "wrong type"),
        (
            {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 0},
            "wrong type or value",  # (found by tests/fuzz/test_fuzz_inputs.py: a ZeroDivisionError)
        ),
    ],
)
def test_bad_hf_configs_are_one_line(tmp_path, capsys, config, fragment):
    path = _hf_dir(tmp_path, config)
    with pytest.raises((CheckpointError, ConfigError), match=fragment):
        hf_model_config(path)
    argv = ["finetune", path, str(tmp_path / "hf" / "tokenizer.json"), f"train.run_dir={tmp_path / 'ft'}"]
    assert main(argv) == 2
    _one_line(capsys, "config.json")
    assert not (tmp_path / "ft").exists()


def test_a_good_hf_config_still_loads(tmp_path):
    cfg = hf_model_config(_hf_dir(tmp_path, GPT2))
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.pos) == (32, 1, 64, "learned")
    assert to_dict(load_config(overrides=["preset=cpu-tiny"]))  # (the config module is intact)
    assert torch.get_default_device().type == "cpu"  # the meta build leaves no default device behind
