"""Config: precedence, errors that name the key, round trip through a run's config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.config import (
    PRESETS,
    Config,
    field_docs,
    from_dict,
    load_config,
    load_run_config,
    save_config,
    to_dict,
)
from scratchlm.errors import ConfigError


def test_defaults_are_valid_and_every_field_is_documented():
    cfg = load_config()
    assert isinstance(cfg, Config)
    rows = field_docs()
    assert len(rows) > 60
    assert all(doc for _, _, _, doc in rows), [k for k, _, _, d in rows if not d]


def test_precedence_defaults_preset_yaml_cli(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("preset: cpu-tiny\nmodel:\n  n_layer: 3\n  d_model: 48\ntrain:\n  lr: 0.005\n")
    cfg = load_config(path, ["model.n_layer=5", "train.max_time=12"])
    assert cfg.preset == "cpu-tiny"
    assert cfg.model.n_head == PRESETS["cpu-tiny"]["model"]["n_head"]  # preset over default
    assert cfg.model.d_model == 48  # YAML over preset
    assert cfg.model.n_layer == 5  # CLI over YAML
    assert cfg.train.lr == 0.005 and cfg.train.max_time == 12.0
    assert cfg.model.norm_eps == Config().model.norm_eps  # untouched default
    # a preset on the command line wins over the YAML's preset
    assert load_config(path, ["preset=cpu-small"]).preset == "cpu-small"


def test_cli_values_are_typed():
    cfg = load_config(
        overrides=[
            "model.bias=false",
            "model.n_kv_head=2",
            "train.lr=3e-4",
            "model.d_ff=None",
            "tokenizer.special_tokens=<|a|>,<|b|>",
        ]
    )
    assert cfg.model.bias is False and cfg.model.n_kv_head == 2 and cfg.train.lr == 3e-4
    assert cfg.model.d_ff is None and cfg.tokenizer.special_tokens == ["<|a|>", "<|b|>"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.n_layerr=4", "model.n_layer"),
        ("modle.n_layer=4", "model.n_layer"),
        ("train.warmup=10", "train.warmup_steps"),
    ],
)
def test_unknown_key_names_the_closest(override, expected):
    with pytest.raises(ConfigError, match=f"did you mean '{expected}'"):
        load_config(overrides=[override])


def test_a_bad_choice_lists_the_choices_once_and_guesses_a_typo():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.attention=bogus"])
    assert str(e.value).count("sdpa_cudnn") == 1 and "did you mean" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'sdpa_cudnn'"):
        load_config(overrides=["model.attention=sdpa_cudn"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layer=four", "model.n_layer must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("model.bias=maybe", "model.bias must be true or false"),
        ("model.norm=batchnorm", "model.norm='batchnorm' is not one of"),
        ("model.n_head=5", "divisible by model.n_head"),
        ("model.n_kv_head=3", "must divide model.n_head"),
        ("train.batch_size=0", "train.batch_size must be positive"),
        ("train.tokens_per_step=100", "multiple of batch_size"),
        ("nosection", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # non-finite floats used to pass every range check and train to nan (or crash in the optimizer)
        ("train.lr=nan", "train.lr must be a finite number, got nan"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),
        ("train.min_lr=nan", "train.min_lr must be a finite number"),
        ("train.muon_lr=inf", "train.muon_lr must be a finite number"),
        ("train.weight_decay=nan", "train.weight_decay must be a finite number"),
        ("train.grad_clip=inf", "train.grad_clip must be a finite number"),
        ("train.max_time=inf", "train.max_time must be a finite number"),
        ("model.dropout=nan", "model.dropout must be a finite number"),
        ("eval.temperature=-inf", "eval.temperature must be a finite number, got -inf"),
        # out of range: a traceback deep in training, or silently wrong
        ("train.lr=0", r"train.lr must be > 0, got 0.0"),
        ("train.min_lr=-1", r"train.min_lr must be in \[0, train.lr=0.001\], got -1.0"),
        ("train.min_lr=0.01", r"train.min_lr must be in \[0, train.lr=0.001\], got 0.01"),
        ("train.muon_lr=0", r"train.muon_lr must be > 0, got 0.0"),
        ("train.muon_momentum=1", r"train.muon_momentum must be in \[0, 1\), got 1.0"),
        ("train.beta1=1.5", r"train.beta1 must be in \[0, 1\), got 1.5"),
        ("train.beta2=-0.5", r"train.beta2 must be in \[0, 1\), got -0.5"),
        ("train.eps=-1", r"train.eps must be > 0, got -1.0"),
        ("train.weight_decay=-0.1", r"train.weight_decay must be >= 0, got -0.1"),
        ("train.grad_clip=-1", r"train.grad_clip must be >= 0 \(0 = off\), got -1.0"),
        ("train.warmup_steps=-1", r"train.warmup_steps must be >= 0, got -1"),
        ("train.keep_last=0", r"train.keep_last must be >= 1, got 0"),
        ("train.max_nan_skips=-1", r"train.max_nan_skips must be >= 0, got -1"),
        ("train.early_stopping_patience=0", r"train.early_stopping_patience must be >= 1 or None"),
        ("model.init_std=-1", r"model.init_std must be > 0, got -1.0"),
        ("model.multiple_of=0", r"model.multiple_of must be >= 1, got 0"),
        ("model.norm_eps=0", r"model.norm_eps must be > 0, got 0.0"),
        ("model.norm_eps=-1e-5", r"model.norm_eps must be > 0, got -1e-05"),
        ("model.rope_theta=0", r"model.rope_theta must be > 0, got 0.0"),
        ("model.d_ff=0", r"model.d_ff must be >= 1 or None \(default width\), got 0"),
        ("model.n_encoder_layer=0", r"model.n_encoder_layer must be >= 1 or None, got 0"),
        ("model.n_kv_head=0", r"model.n_kv_head must be >= 1 or None \(= n_head\), got 0"),
        ("model.vocab_size=-1", r"model.vocab_size must be >= 0 \(0 = from the tokenizer\), got -1"),
        ("data.max_pair_len=0", r"data.max_pair_len must be positive, got 0"),
        ("eval.temperature=-1", r"eval.temperature must be >= 0 \(0 = greedy\), got -1.0"),
        ("eval.top_k=0", r"eval.top_k must be >= 1 or None \(off\), got 0"),
        ("eval.sample_tokens=-1", r"eval.sample_tokens must be >= 0, got -1"),
        ("eval.num_samples=-1", r"eval.num_samples must be >= 0 \(0 = off\), got -1"),
    ],
)
def test_out_of_range_values_name_the_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=[override])
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize(
    "override",
    [
        "train.grad_clip=0",
        "train.weight_decay=0",
        "train.min_lr=0",
        "train.min_lr=1e-3",
        "train.beta1=0",
        "train.warmup_steps=0",
        "model.d_ff=None",
        "model.d_ff=1",
        "eval.temperature=0",
        "eval.top_k=None",
        "eval.sample_tokens=0",
        "eval.num_samples=0",
        "train.early_stopping_patience=None",
    ],
)
def test_range_edges_that_mean_off_or_default_are_valid(override):
    load_config(overrides=[override])


def test_cli_non_finite_lr_exits_2(capsys):
    assert main(["train", "train.lr=nan", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: train.lr must be a finite number, got nan"


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  n_layers: 2\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: unknown key 'model.n_layers'.*model.n_layer"):
        load_config(wrong)
    with pytest.raises(ConfigError, match="unknown preset 'cpu-smal'.*cpu-small"):
        load_config(overrides=["preset=cpu-smal"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["preset=llama-gqa-tiny", "train.name=x", "data.source=a.txt,b.txt"])
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_run_config(tmp_path / "run")
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg


def test_every_preset_is_valid():
    for name in PRESETS:
        assert load_config(preset=name).preset == name


def test_cli_unknown_key_exits_2(capsys):
    assert main(["train", "model.n_layerr=4", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.n_layer" in err and len(err.splitlines()) == 1


def test_cli_wrong_type_and_missing_file_exit_2(capsys, tmp_path):
    assert main(["train", "train.lr=fast", "--dry-run"]) == 2
    assert "train.lr must be a number" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key, _, _, doc in field_docs():
        assert key in out and doc in out


def test_every_config_file_loads():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


def test_list_override_in_bracket_form_is_parsed_not_mangled():
    cfg = load_config(overrides=["tokenizer.special_tokens=['<|endoftext|>', '<|bos|>']"])
    assert cfg.tokenizer.special_tokens == ["<|endoftext|>", "<|bos|>"]
    assert load_config(overrides=["data.source=[a.txt, b.txt]"]).data.source == ["a.txt", "b.txt"]
    assert load_config(overrides=["data.source=a.txt, b.txt"]).data.source == ["a.txt", "b.txt"]
    assert load_config(overrides=["data.source=[]"]).data.source == []
    with pytest.raises(ConfigError, match=r"data.source='\[a.txt' is not a valid list"):
        load_config(overrides=["data.source=[a.txt"])


def test_train_help_shows_the_list_and_path_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "\"tokenizer.special_tokens=['<|endoftext|>', '<|bos|>']\"" in out
    assert "relative paths in a CONFIG.yaml are relative to that file's folder" in out


def test_config_file_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs" / "sub"
    folder.mkdir(parents=True)
    path = folder / "c.yaml"
    path.write_text(
        "data:\n  source: [../../data/a.txt, /abs/b.txt, hf:roneneldan/TinyStories, builtin]\n"
        "  val_source: ../../data/v.txt\n  data_dir: shards\ntokenizer:\n  path: ../tok.json\n"
        "train:\n  run_dir: runs/x\n"
    )
    monkeypatch.chdir(tmp_path / "configs")  # anywhere but the file's folder
    cfg = load_config(path.relative_to(tmp_path / "configs"))
    assert cfg.data.source == [
        str(tmp_path / "data/a.txt"),
        "/abs/b.txt",
        "hf:roneneldan/TinyStories",
        "builtin",
    ]
    assert cfg.data.val_source == [str(tmp_path / "data/v.txt")]
    assert cfg.data.data_dir == str(folder / "shards")
    assert cfg.tokenizer.path == str(tmp_path / "configs/tok.json")
    assert cfg.train.run_dir == "runs/x"  # an output: relative to the current directory, like runs/<name>
    # command-line overrides stay relative to the current directory
    cfg = load_config(path.relative_to(tmp_path / "configs"), ["data.source=here.txt"])
    assert cfg.data.source == ["here.txt"]


def test_shipped_configs_find_the_shared_data_from_any_directory(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    cfg = load_config(repo / "configs" / "shakespeare-char.yaml")
    assert (
        Path(cfg.data.source[0]).resolve()
        == (repo.parent / "shared" / "data" / "tinyshakespeare.txt").resolve()
    )


def test_dry_run_checks_sources_and_sizes_the_real_vocabulary(tmp_path, capsys):
    assert main(["train", "preset=cpu-tiny", f"data.source={tmp_path / 'missing.txt'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data source") and "missing.txt' not found" in err
    text = tmp_path / "abc.txt"
    text.write_text("abcabc\nba ca\n" * 10)  # 5 characters + <|endoftext|>
    assert main(["train", "preset=cpu-tiny", "tokenizer.kind=char", f"data.source={text}", "--dry-run"]) == 0
    assert "vocab 6 (char tokenizer" in capsys.readouterr().out
