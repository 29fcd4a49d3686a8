"""Generated sweep specs: ``--vary`` items, ``sweep:`` sections of config files, seeds, limits, names.

Property: parsing and planning either give points that can be run (unique names that are plain folder
names, values taken from the spec, as many as the grid says and never more than the limit) or raise
ConfigError. Any other exception (a traceback) fails the test. Nothing is trained: planning comes before
any config is resolved.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import yaml
from fuzz_helpers import JSON_VALUES, SCALARS, two_speeds
from hypothesis import strategies as st

from scratchlm.errors import ConfigError
from scratchlm.experiments.sweep import file_grid, parse_vary, plan
from scratchlm.naming import check_run_name

KEYS = st.one_of(
    st.sampled_from(["model.n_head", "model.pos", "train.lr", "train.seed", "a.b", "model.n_layer"]),
    st.text(max_size=12),
)
VALUE_TEXT = st.one_of(SCALARS.map(str), st.text(max_size=20))
VARY_ITEM = st.one_of(
    st.builds(
        lambda k, vs, sep: f"{k}={sep.join(vs)}",
        KEYS,
        st.lists(VALUE_TEXT, max_size=6),
        st.sampled_from([",", ", "]),
    ),
    st.builds(lambda k, vs: f"{k}={vs!r}", KEYS, st.lists(SCALARS, max_size=5)),
    st.text(max_size=30),
)


def _check_points(vary: dict, zipped: bool, seeds: int, max_points: int) -> None:
    try:
        points = plan(vary, zipped=zipped, seeds=seeds, base_seed=7, max_points=max_points)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    lengths = [len(v) for v in vary.values()]
    assert len(points) == (lengths[0] if zipped else math.prod(lengths)) * seeds <= max_points
    assert len({p.name for p in points}) == len(points)  # one folder per run
    for p in points:
        assert check_run_name(p.name) == p.name and (Path("runs") / p.name).parent == Path("runs")
        assert all(any(str(v) == str(x) for x in vary[k]) for k, v in p.values.items())
        assert 7 <= p.seed < 7 + seeds


def check_vary_items(items, zipped, seeds, max_points):
    try:
        vary = parse_vary(items)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert len(vary) == len(items)  # a key given twice is refused, never silently replaced
    _check_points(vary, zipped, seeds, max_points)


test_vary_items, test_vary_items_long = two_speeds(
    fast=60,
    slow=3000,
    items=st.lists(VARY_ITEM, max_size=4),
    zipped=st.booleans(),
    seeds=st.integers(min_value=-2, max_value=5),
    max_points=st.sampled_from([1, 3, 50, 1000]),
)(check_vary_items)


def check_sweep_section(section, seeds, max_points):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump({"sweep": section}))
        try:
            grid = file_grid(path)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
    vary = grid.get("vary") or {}
    assert isinstance(vary, dict) and all(isinstance(v, list) and v for v in vary.values())
    _check_points(vary, grid.get("zip", False), seeds, max_points)


test_sweep_section, test_sweep_section_long = two_speeds(
    fast=60,
    slow=3000,
    section=st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries(
            {"vary": st.dictionaries(KEYS, st.lists(SCALARS, max_size=5), max_size=3)},
            optional={"zip": st.booleans(), "seeds": SCALARS, "jobs": SCALARS},
        ),
    ),
    seeds=st.integers(min_value=1, max_value=4),
    max_points=st.sampled_from([2, 1000]),
)(check_sweep_section)


def check_run_names(name):
    try:
        assert check_run_name(name, "sweep --name") == name
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("sweep --name=")
        return
    folder = Path("runs") / "sweeps" / name
    assert folder.parent == Path("runs") / "sweeps" and name not in (".", "..") and "/" not in name


test_run_names, test_run_names_long = two_speeds(
    fast=80,
    slow=5000,
    name=st.one_of(
        st.text(max_size=300),
        st.sampled_from(["..", ".", "../../x", "a/b", "a\\b", "x\0y", " ", "é" * 130, "ok-name_1.2"]),
    ),
)(check_run_names)
