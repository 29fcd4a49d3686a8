"""Generated jsonl records: --prompts-file lines and metrics.jsonl lines holding any JSON value or text.

Property: a prompts file gives exactly the string prompts of its {"prompt": str} records, or one
GenerationError line naming the file and line (never "None" or "5" generated from); metrics.jsonl
reading keeps exactly its object records with an integer step and never raises.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fuzz_helpers import JSON_VALUES, two_speeds
from hypothesis import strategies as st

from scratchlm.cli.generate import _read_prompts
from scratchlm.errors import DataError, GenerationError
from scratchlm.train.metrics import read_metrics, truncate_metrics

_RECORD = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=20)}),  # the valid kind
    st.fixed_dictionaries({"prompt": JSON_VALUES}),
    JSON_VALUES,
)
LINES = st.lists(
    st.one_of(
        _RECORD.map(json.dumps), st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s)
    ),
    max_size=6,
)


def _expected(line: str):
    """The prompt of one line, None for a blank line; raises ValueError for a line that is not a record."""
    if not line.strip():
        return None
    record = json.loads(line)
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)):
        raise ValueError(line)
    return record["prompt"]


def check_prompts_file(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        text_lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        try:
            expected = [p for p in map(_expected, text_lines) if p is not None]
        except (ValueError, RecursionError):
            expected = None
        try:
            got = _read_prompts(str(path))
        except GenerationError as e:
            assert "\n" not in str(e) and (expected is None or expected == [])
            return
        except DataError as e:  # a lone surrogate written as bytes that are not UTF-8: the file is named
            assert str(path) in str(e) and "not UTF-8" in str(e) and "\n" not in str(e)
            return
        assert got == expected and all(isinstance(p, str) for p in got)


test_prompts_file, test_prompts_file_long = two_speeds(fast=40, slow=5000, lines=LINES)(check_prompts_file)


def check_metrics_file(lines, step):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.jsonl").write_text(
            "\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass"
        )
        records = read_metrics(tmp)
        assert all(isinstance(r, dict) and type(r["step"]) is int for r in records)
        truncate_metrics(Path(tmp), step)
        assert all(r["step"] <= step for r in read_metrics(tmp))


_METRIC = st.fixed_dictionaries(
    {"kind": st.just("train"), "step": st.one_of(st.integers(-5, 50), JSON_VALUES)}
)
test_metrics_file, test_metrics_file_long = two_speeds(
    fast=30,
    slow=3000,
    lines=st.lists(st.one_of(_METRIC.map(json.dumps), LINES.map("".join)), max_size=8),
    step=st.integers(0, 40),
)(check_metrics_file)
