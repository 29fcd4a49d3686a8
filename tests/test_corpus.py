"""The built-in corpus: the stdlib source, no tests, deterministic split by file."""

from __future__ import annotations

from scratchlm.cli import main
from scratchlm.corpus import EXCLUDED_DIRS, builtin_corpus, stdlib_root


def test_builtin_corpus_is_deterministic():
    a, b = builtin_corpus(0.1), builtin_corpus(0.1)
    assert a.train.paths == b.train.paths and a.val.paths == b.val.paths
    assert a.fingerprint == b.fingerprint
    assert not set(a.train.paths) & set(a.val.paths)


def test_builtin_corpus_excludes_tests_and_site_packages():
    corpus = builtin_corpus(0.1)
    root = stdlib_root()
    files = corpus.train.paths + corpus.val.paths
    assert len(files) > 300
    for p in files:
        rel = p.relative_to(root)
        assert p.suffix == ".py" and not p.name.startswith("test_")
        assert not set(rel.parts[:-1]) & EXCLUDED_DIRS
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= names
    assert 0.05 < len(corpus.val.paths) / len(files) < 0.15


def test_split_is_by_file_and_stable_under_fraction():
    small, large = builtin_corpus(0.05), builtin_corpus(0.2)
    # hash split: raising the fraction only moves files into validation
    assert set(small.val.paths) <= set(large.val.paths)


def test_documents_are_the_files():
    corpus = builtin_corpus(0.1)
    first = next(corpus.val.documents())
    assert first == corpus.val.paths[0].read_bytes().decode("utf-8", errors="replace")


def test_corpus_info_cli(capsys):
    assert main(["corpus", "info"]) == 0
    out = capsys.readouterr().out
    info = builtin_corpus(0.1).info()
    assert f"{info['files']:,}" in out and "MB" in out and str(info["fingerprint"]) in out
