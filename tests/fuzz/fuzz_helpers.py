"""Shared pieces of the generated (fuzz) tests: two speeds of one property, hostile values, file damage.

Every property runs twice: in the default suite with a fixed seed (``derandomize``) and a few dozen
examples (a few seconds), and under ``-m slow`` with many more examples and no fixed seed, to find the
next case. No example database is written (the default suite stays hermetic).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def two_speeds(fast: int, slow: int, **strategies) -> Callable:
    """``@two_speeds(fast=30, slow=1000, x=st...)`` on ``check_NAME(x)`` -> (fast test, slow test).

    Use as ``test_NAME, test_NAME_long = two_speeds(...)(check_NAME)``.
    """

    def build(check: Callable):
        quick = settings(max_examples=fast, derandomize=True, **_COMMON)(given(**strategies)(check))
        long = settings(max_examples=slow, derandomize=False, **_COMMON)(given(**strategies)(check))
        return quick, pytest.mark.slow(long)

    return build


# JSON / YAML values a careless or hostile file may hold where another value belongs
HUGE_INTS = st.sampled_from([2**31, 2**32, 2**63, 2**64 + 1, -(2**63), 10**30, -1, 0])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            "none",
            "null",
            "~",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "0x10",
            "1_000",
            "[]",
            "{}",
            "../x",
            "a/b",
            "\0",
            "'",
            '"',
            ":",
            "- a",
            "yes",
            "no",
        ]
    ),
)
JSON_VALUES = st.recursive(
    SCALARS.filter(lambda v: not (isinstance(v, float) and v != v)),  # json.dumps writes NaN; keep it out
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def damage(data: bytes, how: str, draw_ints: list[int]) -> bytes:
    """``data`` truncated, bit-flipped or overwritten, steered by ``draw_ints`` (non-negative ints)."""
    if not data:
        return bytes(draw_ints[:8])
    if how == "truncate":
        return data[: draw_ints[0] % len(data)]
    if how == "flip":
        out = bytearray(data)
        for k in draw_ints:
            out[k % len(out)] ^= 1 << (k // len(out)) % 8
        return bytes(out)
    if how == "overwrite":
        out = bytearray(data)
        start = draw_ints[0] % len(out)
        for i, k in enumerate(draw_ints[1:]):
            if start + i < len(out):
                out[start + i] = k % 256
        return bytes(out)
    if how == "append":
        return data + bytes(k % 256 for k in draw_ints)
    raise ValueError(how)


DAMAGE = st.tuples(
    st.sampled_from(["truncate", "flip", "overwrite", "append"]),
    st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=16),
)
