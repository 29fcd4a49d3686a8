"""Every documented command runs: the ```bash commands and ```python snippets of README.md and docs/*.md.

Each page's blocks run in document order, as written, in a fresh working directory laid out like a clone
(``configs/``, ``benchmarks/``, ``.venv`` and ``../shared`` linked in; ``runs/`` starts empty), with one
tokenizer/shard cache (``SCRATCHLM_CACHE``) shared by the whole session. A command that fails (exit code
!= 0, or a snippet that raises) fails the page's test with the command, its line and its output. So a
changed flag or default that breaks a documented command fails here.

Markers, written in the block as a shell/Python comment so a reader sees them:

- ``test: + ARGS`` (in the comment of a command, or on a comment line of its own just above it): the test
  appends ARGS to that command, to scale a long run down. ``@tiny`` in ARGS stands for :data:`TINY` (a
  1-layer, 32-wide model, a 320-token vocabulary, 2 steps).
- ``needs: WHAT`` (a comment line of its own: the whole block; in a command's comment: that command): the
  block or command needs a GPU, several GPUs, the network or a program ScratchLM does not install; it is
  skipped, with that reason, where WHAT is missing (``gpu`` when CUDA is absent; ``network``, ``torchrun
  with N GPUs``, ``hub download`` and ``ollama`` / ``llama.cpp`` always here). Nothing else is skipped.
- ``test: background`` (in a command's comment): a server; it is started in the background on a free port
  (``--port P`` appended, ``:8000`` in the page's later snippets replaced by ``:P``), the next command runs
  once the port answers, and the server is stopped when the page ends.

``scratchlm ...`` commands without shell syntax run in this process (``scratchlm.cli.main``, the console
script's entry point) to save the 2-4 s of imports per command; everything else runs in ``bash`` with
``.venv/bin`` first on PATH and ``python`` snippets run with ``exec`` in the page's directory.
``make demo`` runs its Makefile recipe (the set-up prerequisites are what this suite runs in); ``make test``
is checked with ``make -n`` and a documented ``pytest PATH`` command is checked to name existing test paths and
declared markers (running the suite inside itself would never end; the suite runs those tests anyway).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCRATCHLM_SHARED_DATA", REPO.parent / "shared" / "data"))

PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))

# `@tiny`: the scale-down appended to training commands marked `test: + @tiny`. Seconds per run on 2 cores.
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "model.d_ff=64",
    "model.context_length=64",
    "tokenizer.vocab_size=320",
    "train.batch_size=2",
    "train.max_steps=2",
    "eval.batches=1",
    "eval.sample_tokens=8",
]

_MARK_TEST = re.compile(r"test:\s*\+\s*(.*?)\s*(\(.*\))?\s*$")  # a (remark) may follow
_MARK_NEEDS = re.compile(r"needs:\s*(.*?)\s*$")
_MARK_BACKGROUND = re.compile(r"test:\s*background\b")
_SHELL_SYNTAX = set("|&;<>()`$")
_RUNS_MADE: dict[tuple, dict[str, Path]] = {}  # (argv, runs/ before) -> the run directories it made


@dataclass
class Command:
    """One documented command (a bash line, continuation lines joined) or one Python snippet (a block)."""

    page: str
    line: int  # 1-based line in the page where it starts
    kind: str  # "bash" | "python"
    text: str  # as written (bash: without the trailing comment)
    extra: list[str] = field(default_factory=list)  # arguments the test appends (`test: + ...`)
    needs: str | None = None  # why it cannot run everywhere (`needs: ...`)
    background: bool = False  # a server started in the background (`test: background`)

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the comment starts at the first unquoted ``#`` after a blank."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def _expand(args: str) -> list[str]:
    out: list[str] = []
    for a in shlex.split(args):
        out += TINY if a == "@tiny" else [a]
    return out


def _blocks(page: str) -> list[tuple[str, int, list[str]]]:
    """The fenced ```bash / ```python blocks of a page: (language, first line number, lines)."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate((REPO / page).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip() or "-", n + 1, []
            else:
                if lang in ("bash", "python"):
                    blocks.append((lang, start, body))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def extract(page: str) -> list[Command]:
    """Every command and snippet of a page, in document order, with its markers."""
    commands: list[Command] = []
    for lang, start, body in _blocks(page):
        block_needs = next(
            (m.group(1) for ln in body if (m := re.match(r"\s*#\s*needs:\s*(.*?)\s*$", ln))), None
        )
        if lang == "python":
            commands.append(Command(page, start, "python", "\n".join(body), needs=block_needs))
            continue
        pending: list[str] = []  # `# test: + ...` lines waiting for their command
        i = 0
        while i < len(body):
            n, raw = start + i, body[i]
            i += 1
            if not raw.strip():
                continue
            while raw.rstrip().endswith("\\") and i < len(body):  # continuation lines (a comment ends a line)
                raw, i = raw.rstrip()[:-1].rstrip() + " " + body[i].strip(), i + 1
            code, comment = _split_comment(raw)
            if not code:  # a comment line of its own
                if m := _MARK_TEST.search(comment):
                    pending.append(m.group(1))
                continue
            comments = [comment]
            if m := re.search(r"<<-?\s*'?(\w+)'?", code):  # a here-document: up to its terminator
                end = m.group(1)
                lines = [code]
                while i < len(body) and body[i].strip() != end:
                    lines.append(body[i])
                    i += 1
                lines.append(end)
                i += 1
                code = "\n".join(lines)
            cmd = Command(page, n, "bash", code, needs=block_needs)
            for a in pending:
                cmd.extra += _expand(a)
            pending = []
            for c in comments:
                if m := _MARK_TEST.search(c):
                    cmd.extra += _expand(m.group(1))
                if m := _MARK_NEEDS.search(c):
                    cmd.needs = m.group(1)
                if _MARK_BACKGROUND.search(c):
                    cmd.background = True
            commands.append(cmd)
    return commands


def _missing(needs: str) -> str | None:
    """Why a `needs:` marker cannot be met here (None when it can)."""
    if needs.strip().lower() == "gpu":
        import torch

        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    return f"needs {needs}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def doc_cache(tmp_path_factory) -> Path:
    """One SCRATCHLM_CACHE for every page: each tokenizer is trained and each corpus encoded once."""
    return tmp_path_factory.mktemp("scratchlm_cache")


class Page:
    """A clone-like working directory in which one page's commands run in order."""

    def __init__(self, root: Path, cache: Path):
        self.cwd = root / "repo"
        self.cwd.mkdir(parents=True)
        for name in ("configs", "benchmarks", "tests", ".venv", "Makefile", "pyproject.toml", "src"):
            (self.cwd / name).symlink_to(REPO / name)
        if not (root / "shared").exists():
            (root / "shared").symlink_to(SHARED_DATA.parent)
        self.env = dict(
            os.environ,
            SCRATCHLM_CACHE=str(cache),
            # one thread per command: the tiny models here gain nothing from more, and on a loaded 2-core
            # machine two threads per process ran a training step ~10x slower than one (spinning workers)
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        )
        self.cache = cache
        self.port: int | None = None
        self.servers: list[subprocess.Popen] = []
        self.log: list[str] = []

    def close(self) -> None:
        for p in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    # --- running -------------------------------------------------------------------------------
    def run(self, cmd: Command) -> None:
        if cmd.kind == "python":
            text = self._ports(cmd.text)
            self._exec(text, cmd)
            return
        text = self._ports(cmd.text)
        if cmd.background:
            self._background(text, cmd)
            return
        argv = self._argv(text)
        if argv is not None and argv[0] == "make":
            self._make(argv, cmd)
        elif argv is not None and argv[0] in ("pytest", ".venv/bin/pytest"):
            self._pytest(argv[1:] + cmd.extra, cmd)
        elif argv is not None and argv[0] in ("scratchlm", ".venv/bin/scratchlm"):
            self._cli(argv[1:] + cmd.extra, cmd)
        else:
            extra = " " + shlex.join(cmd.extra) if cmd.extra else ""
            self._bash(text + extra, cmd)

    def _ports(self, text: str) -> str:
        if self.port is None:
            return text
        return re.sub(r"(127\.0\.0\.1|localhost):8000\b", rf"\g<1>:{self.port}", text)

    @staticmethod
    def _argv(text: str) -> list[str] | None:
        """The words of a plain command (no pipes, redirections, variables, env prefixes); else None."""
        lex = shlex.shlex(text, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words = list(lex)
        if not words or any(set(w) <= _SHELL_SYNTAX for w in words) or "$" in text or "=" in words[0]:
            return None
        return words

    def _fail(self, cmd: Command, how: str, output: str) -> None:
        pytest.fail(f"{cmd.where()}: {how}\n  {cmd.text}\n  (+ {shlex.join(cmd.extra)})\n{output[-4000:]}")

    def _cli(self, argv: list[str], cmd: Command) -> None:
        """``scratchlm ARGV`` in this process. A training command that an earlier page ran with the same
        arguments on the same runs/ gets that page's run directories copied instead (the runs are
        deterministic: same config, same seed), so pages share one tiny run per distinct command."""
        runs = self.cwd / "runs"
        key = None
        if argv and argv[0] in ("train", "finetune", "sweep") and "--dry-run" not in argv:
            key = (tuple(argv), tuple(sorted(p.name for p in runs.iterdir())) if runs.is_dir() else ())
            if key in _RUNS_MADE:
                for name, src in _RUNS_MADE[key].items():
                    shutil.copytree(src, runs / name, symlinks=True)
                self.log.append(f"   0.0 s  {cmd.where()}  scratchlm {shlex.join(argv)}  (runs copied)")
                return
            before = set(runs.iterdir()) if runs.is_dir() else set()
        self._cli_run(argv, cmd)
        if key is not None and runs.is_dir():
            store = self.cache / "runs" / str(len(_RUNS_MADE))
            made = {}
            for p in sorted(set(runs.iterdir()) - before):
                shutil.copytree(p, store / p.name, symlinks=True)
                made[p.name] = store / p.name
            _RUNS_MADE[key] = made

    def _cli_run(self, argv: list[str], cmd: Command) -> None:
        from scratchlm.cli import main

        out, err = io.StringIO(), io.StringIO()
        old_stdin, old_cwd = sys.stdin, os.getcwd()
        t0 = time.perf_counter()
        try:
            os.chdir(self.cwd)
            sys.stdin = io.StringIO("")
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse: usage errors and --help
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        finally:
            sys.stdin = old_stdin
            os.chdir(old_cwd)
        self.log.append(f"{time.perf_counter() - t0:6.1f} s  {cmd.where()}  scratchlm {shlex.join(argv)}")
        if rc != 0:
            self._fail(cmd, f"exit code {rc}", out.getvalue() + err.getvalue())

    def _bash(self, script: str, cmd: Command, timeout: float = 600) -> str:
        t0 = time.perf_counter()
        r = subprocess.run(
            ["bash", "-c", "set -eo pipefail\n" + script],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.log.append(f"{time.perf_counter() - t0:6.1f} s  {cmd.where()}  {script[:100]!r}")
        if r.returncode != 0:
            self._fail(cmd, f"exit code {r.returncode}", r.stdout + r.stderr)
        return r.stdout

    def _exec(self, code: str, cmd: Command) -> None:
        out = io.StringIO()
        old_cwd = os.getcwd()
        t0 = time.perf_counter()
        try:
            os.chdir(self.cwd)
            with contextlib.redirect_stdout(out):
                exec(compile(code, cmd.where(), "exec"), {"__name__": "__doc_snippet__"})
        except Exception as e:  # noqa: BLE001 - reported with the snippet
            self._fail(cmd, f"{type(e).__name__}: {e}", out.getvalue())
        finally:
            os.chdir(old_cwd)
        self.log.append(f"{time.perf_counter() - t0:6.1f} s  {cmd.where()}  python snippet")

    def _make(self, argv: list[str], cmd: Command) -> None:
        # -o: the set-up targets count as done (this suite runs in the environment they build)
        # --no-print-directory: under `make test` (CI) this make is nested and would print "Entering directory"
        make = f"make -n --no-print-directory -o .venv/.core -o .venv/.dev {argv[1]}"
        recipe = self._bash(make, cmd).strip().splitlines()
        if argv[1] == "test":  # the suite running itself: check the recipe resolves, do not recurse
            assert recipe[0].startswith(".venv/bin/ruff check") and ".venv/bin/pytest" in recipe[-1], recipe
            return
        for line in recipe:
            argv2 = self._argv(line)
            assert argv2 is not None and argv2[0].endswith("scratchlm"), f"make {argv[1]} runs {line!r}"
            self._cli(argv2[1:] + cmd.extra, cmd)

    def _pytest(self, args: list[str], cmd: Command) -> None:
        """A documented test command would run part of this suite inside it: check that it names existing
        test paths and declared markers (the suite itself runs those tests)."""
        pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # markers = ["slow: ...", ...]
        markers = set(re.findall(r'^\s*"(\w+):', pyproject.split("markers = [", 1)[1].split("]", 1)[0], re.M))
        for i, a in enumerate(args):
            if i and args[i - 1] == "-m":
                names = set(re.findall(r"\w+", a)) - {"not", "and", "or"}
                assert names <= markers, f"{cmd.where()}: unknown marker in -m {a!r} (declared: {markers})"
            elif not a.startswith("-"):
                assert (REPO / a.split("::")[0]).exists(), f"{cmd.where()}: no test path {a}"
        self.log.append(f"   0.0 s  {cmd.where()}  pytest {shlex.join(args)}  (paths and markers checked)")

    def _background(self, text: str, cmd: Command) -> None:
        port = _free_port()
        if self.port is None:  # the page's snippets talk to its first server
            self.port = port
        proc = subprocess.Popen(
            ["bash", "-c", f"{text} {shlex.join(cmd.extra + ['--port', str(port)])}"],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: close() stops bash and the server
        )
        self.servers.append(proc)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._fail(cmd, f"server exited with {proc.returncode}", proc.stdout.read())
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.2)
        self._fail(cmd, "server did not listen within 180 s", "")


def run_page(page: str, root: Path, cache: Path, commands: list[Command]) -> list[str]:
    """Run ``commands`` of ``page`` in order in a fresh directory under ``root``; returns the timing log."""
    import torch

    p = Page(root, cache)
    skipped = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see Page: tiny models gain nothing from more threads
    try:
        for cmd in commands:
            if cmd.needs and (why := _missing(cmd.needs)):
                skipped.append(f"{cmd.where()}: {why}")
                continue
            p.run(cmd)
    finally:
        torch.set_num_threads(threads)
        p.close()
        print("\n".join(p.log + [f"skipped {s}" for s in skipped]))
    return skipped


def _is_quick_tour(page: str, cmd: Command, quick_tour_end: int) -> bool:
    return page == "README.md" and cmd.line <= quick_tour_end


def _readme_quick_tour_end() -> int:
    """The last line of the README's quick tour block (the blocks up to it are `make demo` + the tour)."""
    text = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = text.index("## Quick tour")
    return next(n for n in range(start + 3, len(text)) if text[n].startswith("```")) + 1


@pytest.mark.parametrize("page", PAGES)
def test_documented_commands_run(page, tmp_path, doc_cache, shared_data):
    """Every command and snippet of the page, in order (the README's first two blocks: see the next test)."""
    end = _readme_quick_tour_end()
    commands = [c for c in extract(page) if not _is_quick_tour(page, c, end)]
    run_page(page, tmp_path, doc_cache, commands)


def test_make_demo_then_quick_tour(tmp_path, doc_cache, shared_data):
    """A fresh clone: `make demo` (its Makefile recipe, scaled down), then the README's quick tour line by line."""
    end = _readme_quick_tour_end()
    commands = [c for c in extract("README.md") if c.line <= end]
    texts = [c.text for c in commands]
    assert texts[0] == "make demo" and texts[1] == "make test", texts
    assert any(t.startswith(".venv/bin/scratchlm sample runs/default") for t in texts), texts
    run_page("README.md", tmp_path, doc_cache, commands)


# --- the extractor itself ----------------------------------------------------------------------


def test_extract_markers_continuations_and_heredocs(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "scratchlm train configs/x.yaml   # a long run; test: + train.max_steps=2 model.n_layer=1\n"
        "# test: + @tiny\n"
        "scratchlm train a=1 \\\n"
        "    b=2   # continued\n"
        "python - <<'EOF'\nprint('# not a comment')\nEOF\n"
        "torchrun -m scratchlm train   # needs: torchrun with 8 GPUs\n"
        "scratchlm serve runs/demo   # test: background\n"
        "```\n\n```\nscratchlm not-a-bash-block\n```\n\n"
        "```python\n# needs: network\nimport x\n```\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    cmds = extract("page.md")
    assert [c.text for c in cmds[:2]] == ["scratchlm train configs/x.yaml", "scratchlm train a=1 b=2"]
    assert cmds[0].extra == ["train.max_steps=2", "model.n_layer=1"] and cmds[0].line == 2
    assert cmds[1].extra == TINY and cmds[1].line == 4
    assert cmds[2].text == "python - <<'EOF'\nprint('# not a comment')\nEOF" and not cmds[2].extra
    assert cmds[3].needs == "torchrun with 8 GPUs" and cmds[4].background
    assert cmds[5].kind == "python" and cmds[5].needs == "network" and len(cmds) == 6
    assert Page._argv("scratchlm generate runs/d --stop '\\n\\n'") == [
        "scratchlm",
        "generate",
        "runs/d",
        "--stop",
        "\\n\\n",
    ]
    assert Page._argv("printf 'x' | scratchlm chat runs/demo") is None
    assert Page._argv("OMP_NUM_THREADS=1 scratchlm train") is None


def test_commands_live_in_tested_blocks():
    """A command shown in an untagged block would escape this test: runnable commands go in ```bash blocks;
    a transcript (command and its output) starts its command lines with ``$ ``."""
    bad = []
    pattern = re.compile(r"^\s*(\.venv/bin/)?(scratchlm|python|torchrun|make|pytest) ")
    for page in PAGES:
        lang = None
        for n, line in enumerate((REPO / page).read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                lang = (line[3:].strip() or "-") if lang is None else None
            elif lang is not None and lang not in ("bash", "python") and pattern.match(line):
                bad.append(f"{page}:{n}: {line.strip()}")
    assert not bad, (
        "commands outside ```bash blocks (tag the block bash, or prefix transcripts with '$ '):\n"
        + "\n".join(bad)
    )


def test_readme_spells_out_tiny():
    """The README says what `@tiny` appends; it must say what the test does."""
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert "`@tiny` stands for `" + " ".join(TINY) + "`" in text


def test_a_broken_documented_command_fails_its_page(tmp_path, doc_cache, monkeypatch):
    """The runner reports a documented command that exits non-zero (a renamed key, a typo in a flag), with
    its page and line; a snippet that raises too."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "```bash\nscratchlm presets\nscratchlm train model.n_layerr=2\n```\n\n```python\nraise ValueError('x')\n```\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    cmds = extract("docs/page.md")
    monkeypatch.setattr(sys.modules[__name__], "REPO", Path(__file__).resolve().parents[1])
    with pytest.raises(
        pytest.fail.Exception, match=r"docs/page.md:3: exit code 2[\s\S]*did you mean 'model.n_layer'"
    ):
        run_page("docs/page.md", tmp_path / "a", doc_cache, cmds)
    with pytest.raises(pytest.fail.Exception, match=r"docs/page.md:7: ValueError: x"):
        run_page("docs/page.md", tmp_path / "b", doc_cache, cmds[2:])
