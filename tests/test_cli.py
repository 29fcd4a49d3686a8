"""The command line as a whole: overrides anywhere, help with defaults, a light start-up, a readable console."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from scratchlm.cli import build_parser, main


def _dry_run_stub(monkeypatch):
    """Replace the dry run's measured steps (seconds of training) by a line naming the model's depth."""
    import scratchlm.train.dryrun as dryrun

    monkeypatch.setattr(dryrun, "dry_run", lambda cfg: f"DRY n_layer={cfg.model.n_layer}")


def test_overrides_after_flags_train(monkeypatch, capsys):
    """`train X --dry-run a.b=c` said "unrecognized arguments": argparse takes a nargs='*' positional once,
    before the first flag."""
    _dry_run_stub(monkeypatch)
    assert main(["train", "preset=cpu-tiny", "--dry-run", "model.n_layer=3"]) == 0
    out = capsys.readouterr().out
    assert "DRY n_layer=3" in out and "preset: cpu-tiny" in out
    # a config file after the flag too, and every override in command-line order (the last one wins)
    assert main(["train", "--dry-run", "preset=cpu-tiny", "model.n_layer=2", "model.n_layer=5"]) == 0
    assert "DRY n_layer=5" in capsys.readouterr().out


def test_overrides_after_flags_finetune(monkeypatch):
    import scratchlm.cli.train as cli_train

    seen = {}
    monkeypatch.setattr(cli_train, "run_train", lambda ns: seen.setdefault("ns", ns) and 0)
    assert main(["finetune", "SRC", "DATA.txt", "--dry-run", "train.max_steps=7", "train.lr=1e-5"]) == 0
    ns = seen["ns"]
    assert ns.dry_run and ns.args[-2:] == ["train.max_steps=7", "train.lr=1e-5"]
    assert "train.init_from=SRC" in ns.args and "data.source=DATA.txt" in ns.args


def test_free_arguments_after_flags_for_sweep_and_data_prepare():
    from scratchlm.cli import parse_args

    parser = build_parser()
    args = parse_args(parser, ["sweep", "base.yaml", "--seeds", "2", "train.max_steps=3", "--zip"])
    assert args.args == ["base.yaml", "train.max_steps=3"] and args.seeds == 2 and args.zip
    args = parse_args(parser, ["data", "prepare", "--tokenizer", "t.json", "a.txt", "--out", "d", "b.txt"])
    assert args.source == ["a.txt", "b.txt"] and args.out == "d"


def test_an_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "preset=cpu-tiny", "--dry-rub", "model.n_layer=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: scratchlm train: unrecognized arguments: --dry-rub") and err.count("\n") == 1
    )
    with pytest.raises(SystemExit):  # a command without a free list takes no stray positionals
        main(["eval", "RUN", "extra"])
    assert capsys.readouterr().err.startswith("error: scratchlm eval: unrecognized arguments: extra")


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_help_shows_every_default():
    """Every option with a default other than None/False says it in --help (it did not: --max-new-tokens)."""
    parser = build_parser()
    missing = []
    for name, sub in _subparsers(parser):
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            help_text = " ".join(sub._get_formatter()._expand_help(action).split()) if action.help else ""
            if "default" not in help_text or help_text not in text:
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    generate = " ".join(dict(_subparsers(parser))["generate"].format_help().split())
    assert "tokens to generate per completion (default: 128)" in generate
    assert "nucleus: smallest set with mass >= p (1 = off) (default: 1.0)" in generate


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["generate", "--help"], ["eval", "--help"]]
)
def test_help_does_not_import_torch(argv):
    """`scratchlm --help` answers in a fraction of a second: nothing heavy is imported for it (it took 2-4 s
    on this machine; benchmarks/cli_startup.py measures it). Only `train --help`, which lists every config
    option, reads the config module (and yaml)."""
    heavy = ["torch", "numpy", "tokenizers", "tqdm"] + (
        [] if "train" in argv else ["yaml", "scratchlm.config"]
    )
    code = (
        "import sys\nfrom scratchlm.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: scratchlm") and "LOADED []" in proc.stderr


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        body = "\n".join(f"    x{j} = {i} * {j} + len('{'ab' * j}')" for j in range(40))
        (src / f"m{i}.py").write_text(f"def f{i}():\n{body}\n    return x1\n", encoding="utf-8")
    return [
        "preset=cpu-tiny",
        f"data.source={src}",
        "train.max_steps=4",
        "train.log_interval=2",
        "eval.interval=4",
        "eval.sample_tokens=4",
    ]


def test_train_console_summary_verbose_and_quiet(tmp_path, tiny_corpus, capsys):
    """Output to a file (capsys): one summary line instead of the resolved config, plain log lines (no
    carriage returns), the config with --verbose, and with --quiet only the result."""
    assert main(["train", *tiny_corpus, f"train.run_dir={tmp_path / 'a'}"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "# resolved config" not in out
    (summary,) = [line for line in out.splitlines() if line.startswith("training: ")]
    assert (
        summary.startswith("training: preset cpu-tiny | parameters ") and "tied to the output head" in summary
    )
    assert "128 tokens/step x 4 steps = 512 tokens" in summary and f"run dir {tmp_path / 'a'}" in summary
    assert "step 2/4: loss " in out and "step 4: " in out and "--- sample ---" in out

    assert main(["train", *tiny_corpus, f"train.run_dir={tmp_path / 'b'}", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# resolved config (preset cpu-tiny)") and "training: preset" in out

    assert main(["train", *tiny_corpus, f"train.run_dir={tmp_path / 'c'}", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines()[0] == f"run directory: {tmp_path / 'c'}"
    assert "step 2/4" not in out and "training: " not in out and "--- sample ---" not in out
    assert "final validation loss" in out and (tmp_path / "c" / "checkpoints" / "LATEST").is_file()
