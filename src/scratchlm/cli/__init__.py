"""The ``scratchlm`` command line: subcommands that map to library calls.

Argument parsing lives only in this package. Each module here adds its subcommands with
``add_parser(subparsers)`` and sets ``func`` to a function taking the parsed ``argparse.Namespace``.
A :class:`~scratchlm.errors.ScratchLMError` (something the user can fix) is printed as one line,
``error: ...``, with exit code 2; argparse usage errors exit with 2 as well. Warnings (a fallback to an
older checkpoint, a slower path taken) are printed as one line too, ``warning: ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from scratchlm import __version__
from scratchlm.errors import ScratchLMError

# subcommand modules, in the order `scratchlm --help` lists them
_MODULES = [
    "train",
    "finetune",
    "generate",
    "translate",
    "tokenizer",
    "data",
    "eval",
    "export",
    "plot",
    "experiments",
    "explain",
    "serve",
]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, ``(default: 0.8)``, unless the help already says it.

    Like ``argparse.ArgumentDefaultsHelpFormatter``, without its noise: no ``(default: None)`` for an
    option that is off unless given (its help says what it does then), no ``(default: False)`` for a flag.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        return text + " (default: %(default)s)"


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description and epilog kept as written (the train options list)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``error: ...``, exit code 2 (no usage block).

    Subparsers are made of the same class (argparse uses ``type(parser)``), so every subcommand says
    ``error: scratchlm tokenizer decode: argument ID: invalid int value: 'x' (see ... --help)``.
    """

    def __init__(self, *args, epilog_factory=None, **kwargs):
        # epilog_factory: a function making the epilog when the help is shown (`scratchlm train --help`
        # lists every config option: building that list imports the config module, so only then)
        self._epilog_factory = epilog_factory
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        if kwargs["formatter_class"] is argparse.RawDescriptionHelpFormatter:
            kwargs["formatter_class"] = RawDescriptionDefaultsHelpFormatter
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        if self._epilog_factory is not None:
            self.epilog, self._epilog_factory = self._epilog_factory(), None
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="scratchlm",
        description="Train your own language model from scratch: tokenizer, data, model, training, generation.",
    )
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _MODULES:
        try:
            module = importlib.import_module(f"scratchlm.cli.{name}")
        except ModuleNotFoundError as e:  # a subcommand module still being written
            if e.name != f"scratchlm.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


_said: set[str] = set()  # warnings printed by this command


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warning: message`` on stderr, instead of Python's two lines with a file name and a source line;
    each message once per command, however many callers meet it (a fallback seen by resume and trainer).

    (A ``"once"`` filter would not do: libraries imported later, torch among them, insert filters above it.)
    """
    if str(message) in _said:
        return
    _said.add(str(message))
    tqdm = sys.modules.get("tqdm")
    if file is None and tqdm is not None:  # a progress bar may be drawn: write above it, never inside it
        tqdm.tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        print(f"warning: {message}", file=file or sys.stderr)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, letting positionals of a subcommand come after its flags.

    argparse matches a ``nargs="*"`` positional once, before the first flag, so
    ``scratchlm train preset=cpu-tiny --dry-run model.n_layer=3`` would leave ``model.n_layer=3``
    unrecognised. A subcommand that takes a free list (overrides, sources) names it with
    ``set_defaults(intermixed="DEST")``; leftover non-flag arguments are appended to that list in order.
    (``parse_intermixed_args`` would do this but does not support subparsers.)
    """
    args, extra = parser.parse_known_args(argv)
    dest = getattr(args, "intermixed", None)
    if extra and dest is not None and not any(a.startswith("-") for a in extra):
        getattr(args, dest).extend(extra)
    elif extra:
        _chosen(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command given (``scratchlm data prepare``), for its error message."""
    for action in parser._actions:
        if (
            isinstance(action, argparse._SubParsersAction)
            and getattr(args, action.dest, None) in action.choices
        ):
            return _chosen(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scratchlm`` console script; returns the exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        with warnings.catch_warnings():
            _said.clear()
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except ScratchLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given that cannot be read or written (missing, a directory, no space...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path and try again", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:  # the codec names neither file nor fix: say both as well as we can
        print(f"error: an input file is not UTF-8 text ({e}); convert it to UTF-8", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
