"""End to end: tokenizer -> shards -> training -> run directory -> sample, through the CLI and the API."""

from __future__ import annotations

import json
import shutil

import pytest

import scratchlm
from scratchlm.cli import main
from scratchlm.corpus import builtin_corpus


@pytest.fixture
def small_corpus(tmp_path, monkeypatch):
    """30 stdlib files as a local source, and a private cache dir."""
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(builtin_corpus().train.paths[:30]):
        shutil.copy(p, src / f"{i:02d}_{p.name}")
    return src


def _overrides(tmp_path, src, name):
    return [
        "preset=cpu-tiny",
        f"data.source={src}",
        f"train.run_dir={tmp_path / name}",
        "train.max_steps=12",
        "eval.interval=6",
        "eval.sample_prompt=def ",
    ]


def test_cli_end_to_end(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "cli-run"
    assert main(["train", *_overrides(tmp_path, small_corpus, "cli-run")]) == 0
    out = capsys.readouterr().out
    assert "--- sample ---" in out and "final validation loss" in out
    # one summary line, not the ~150 lines of the resolved config (that is --dry-run's and --verbose's)
    assert "# resolved config" not in out and out.count("\ntraining: preset cpu-tiny | parameters ") == 1
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints/LATEST"):
        assert (run_dir / name).exists(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)

    assert main(["sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_api_end_to_end(tmp_path, small_corpus):
    cfg = scratchlm.load_config(overrides=_overrides(tmp_path, small_corpus, "api-run"))
    run_dir = scratchlm.fit(cfg)
    assert run_dir == tmp_path / "api-run"
    lm = scratchlm.load(run_dir)
    assert lm.config.model.vocab_size == lm.tokenizer.vocab_size
    text = lm.generate("def ", max_new_tokens=10, temperature=0.0)
    assert isinstance(text, str)
    assert "".join(lm.stream("def ", max_new_tokens=10, temperature=0.0)) == text
    # a second run with the same sources reuses the cached tokenizer and shards: no cache file is rewritten
    cache = tmp_path / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert any(p.name == "tokenizer.json" for p in before) and any(p.suffix == ".bin" for p in before)
    cfg2 = scratchlm.load_config(overrides=_overrides(tmp_path, small_corpus, "api-run2"))
    assert scratchlm.fit(cfg2) == tmp_path / "api-run2"
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before
    assert (tmp_path / "api-run" / "tokenizer.json").read_text() == (
        tmp_path / "api-run2" / "tokenizer.json"
    ).read_text()


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--dry-run", "preset=cpu-tiny"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "param" in out.lower()
    assert list(tmp_path.iterdir()) == []


def test_help_of_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for command in (
        "train",
        "sample",
        "generate",
        "chat",
        "serve",
        "eval",
        "explain",
        "tokenizer",
        "data",
        "corpus",
        "export",
        "plot",
    ):
        assert command in top
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        shown = {"sample": "generate"}.get(command, command)  # `sample` is an alias of `generate`
        assert capsys.readouterr().out.startswith("usage: scratchlm " + shown)


def test_readme_command_table_matches_the_cli(capsys):
    """Every ``--flag`` the README's command table names for a subcommand is an option of that subcommand."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `scratchlm ")]
    assert len(rows) >= 10
    for row in rows:
        # the subcommand words: `scratchlm tokenizer train --input ...` -> ["tokenizer", "train"]
        command = re.match(r"\| `scratchlm ((?:[a-z]+ ?)+)", row).group(1).split()
        flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", row))
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        help_text = capsys.readouterr().out
        missing = sorted(f for f in flags if f not in help_text)
        assert not missing, f"README names {missing} for `scratchlm {' '.join(command)}`"


def test_cli_warnings_are_one_line(capsys, monkeypatch):
    import argparse
    import warnings

    import scratchlm.cli as cli

    def fallback(args):
        warnings.warn(
            "checkpoint step_00000010 is corrupt; falling back to the previous checkpoint", stacklevel=2
        )
        return 0

    class Parser:
        def parse_known_args(self, argv):
            return argparse.Namespace(func=fallback), []

    monkeypatch.setattr(cli, "build_parser", Parser)
    assert cli.main([]) == 0
    err = capsys.readouterr().err
    assert err == "warning: checkpoint step_00000010 is corrupt; falling back to the previous checkpoint\n"


def test_failed_resume_leaves_the_run_as_it_was(tmp_path, small_corpus, capsys, monkeypatch):
    """Overrides of a resume that never trained a step are not saved into the run's config.yaml (they were,
    and a bad one then broke every later resume); a model change is refused with a message that says so."""
    from scratchlm.errors import TrainingError
    from scratchlm.train import trainer

    run_dir = tmp_path / "run"
    assert main(["train", *_overrides(tmp_path, small_corpus, "run"), "eval.sample_tokens=0"]) == 0
    saved = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()

    assert main(["train", "--resume", str(run_dir), "model.d_model=64"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: model.d_model cannot change in a run being resumed") and err.count("\n") == 1
    )

    def fails(*args, **kwargs):
        raise TrainingError("the resumed run failed before its first checkpoint")

    monkeypatch.setattr(trainer, "train_model", fails)
    assert main(["train", "--resume", str(run_dir), "train.max_steps=20", "train.lr=1e-2"]) == 2
    assert "failed before its first checkpoint" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == saved


def test_unusable_paths_and_non_utf8_files_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """OSError and UnicodeDecodeError from a path the user gave: `error: ...`, exit 2, no temporary files
    (they were tracebacks, and `tokenizer train --out DIR` left a .tmp file beside DIR)."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("hello world, the quick brown fox\n" * 20)
    (tmp_path / "taken").mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"train:\n  lr: 0.001 # caf\xe9\n")
    cases = [
        (["tokenizer", "train", "--input", str(text), "--kind", "char", "--out", "taken"], "is a directory"),
        (
            ["tokenizer", "train", "--input", str(text), "--kind", "char", "--out", "text.txt/x.json"],
            "text.txt",
        ),
        (["train", str(bad_yaml), "--dry-run"], "not UTF-8"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "taken", "text.txt"]
    assert not any((tmp_path / "taken").iterdir())


def test_mismatched_tokenizer_config_or_shards_are_refused(tmp_path, small_corpus, capsys):
    """A run whose tokenizer.json or config.yaml no longer fits its checkpoint, and shards made with another
    tokenizer, are one-line errors (they were a 50-line traceback, garbage text, an IndexError, and a loss
    computed on the wrong ids)."""
    from scratchlm.tokenizer import CharTokenizer

    run_dir = tmp_path / "run"
    assert main(["train", *_overrides(tmp_path, small_corpus, "run"), "eval.sample_tokens=0"]) == 0
    assert main(["eval", str(run_dir), "--batches", "1"]) == 0
    capsys.readouterr()

    text = tmp_path / "other.txt"
    text.write_text("".join(chr(c) for c in range(32, 127)) * 40)
    other = tmp_path / "char.json"
    CharTokenizer.train([text.read_text()]).save(other)
    shards = tmp_path / "other-shards"
    assert main(["data", "prepare", "--tokenizer", str(other), str(text), "--out", str(shards)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data-dir", str(shards), "--batches", "1"]) == 2
    assert "made with another tokenizer" in capsys.readouterr().err

    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("d_model: 32", "d_model: 64"))
    assert "d_model: 64" in (run_dir / "config.yaml").read_text()
    assert main(["generate", str(run_dir), "--prompt", "def", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "restore the run's config.yaml" in err and err.count("\n") == 1
    (run_dir / "config.yaml").write_text(config)

    big = [chr(c) for c in range(0x4E00, 0x4E00 + 5000)]
    CharTokenizer(big).save(run_dir / "tokenizer.json")
    assert main(["generate", str(run_dir), "--prompt", "\u4e00", "--max-new-tokens", "2"]) == 2
    assert "not the tokenizer this run was trained with" in capsys.readouterr().err
