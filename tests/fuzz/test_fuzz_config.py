"""Generated configs: random values for every key, random YAML shapes for config files and run configs.

Property: loading either gives a Config that validates, saves and reloads to the same values and whose
run directory is runs/<name>, or raises ConfigError. Any other exception (a traceback) fails the test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from fuzz_helpers import JSON_VALUES, SCALARS, two_speeds
from hypothesis import strategies as st

from scratchlm.config import (
    SECTIONS,
    field_docs,
    from_dict,
    load_config,
    load_run_config,
    save_config,
    to_dict,
)
from scratchlm.errors import ConfigError
from scratchlm.train.trainer import seed_everything

KEYS = [row[0] for row in field_docs()]


def _check_loaded(cfg, through_yaml: bool = True) -> None:
    """A config that loaded: a named run stays under runs/, the seed seeds, and saved and reloaded (or,
    cheaper, rebuilt from its dict) it is the same config."""
    if cfg.train.run_dir is None:
        assert cfg.run_dir.parent == Path("runs") and cfg.run_dir.name == cfg.train.name
    seed_everything(cfg.train.seed)  # the seed's consumer (numpy takes [0, 2**32 - 1] only)
    if not through_yaml:
        assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "config.yaml")
        assert to_dict(load_run_config(tmp)) == to_dict(cfg)


def _values_for(key: str) -> st.SearchStrategy[str]:
    """Text a user may type for ``key``: values of its own type (any size and sign) and of every other."""
    type_name = next(row[1] for row in field_docs() if row[0] == key)
    typed = {
        "int": st.integers(min_value=-(2**70), max_value=2**70).map(str),
        "float": st.floats().map(repr),
        "str": st.text(max_size=20),
    }
    own = (
        st.one_of(*(typed[t] for t in typed if t in type_name))
        if any(t in type_name for t in typed)
        else st.nothing()
    )
    return st.one_of(own, SCALARS.map(str), st.lists(st.text(max_size=5), max_size=3).map(",".join))


def check_override(key, data):
    """`section.key=VALUE` on the command line, VALUE any text a user may type."""
    value = data.draw(_values_for(key), label="value")
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError:
        return
    _check_loaded(cfg, through_yaml=False)  # (test_yaml_file covers the YAML round trip)


# the default suite: one key of each type and role (fast); the slow run: every key, many more values
SAMPLE_KEYS = [
    "train.name",  # a path component
    "train.run_dir",  # a path
    "train.seed",  # an int with a consumer's range
    "model.n_layer",  # a positive int
    "model.n_kv_head",  # int | None
    "train.lr",  # a positive float
    "train.max_time",  # float | None
    "model.arch",  # a choice
    "train.device",  # a choice checked later
    "tokenizer.special_tokens",  # list[str]
    "model.bias",  # bool
]
_quick, _long = two_speeds(fast=12, slow=200, data=st.data())(check_override)
test_override = pytest.mark.parametrize("key", SAMPLE_KEYS)(_quick)
test_override_long = pytest.mark.parametrize("key", KEYS)(_long)


def check_yaml_file(doc):
    """A config file holding any YAML document: sections, keys and values of every type and shape."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        try:
            cfg = load_config(path)
        except ConfigError:
            return
        _check_loaded(cfg)


_KNOWN = st.sampled_from([*SECTIONS, "preset"])
_SECTION = st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]), JSON_VALUES, max_size=4)
test_yaml_file, test_yaml_file_long = two_speeds(
    fast=25,
    slow=3000,
    doc=st.one_of(
        JSON_VALUES,
        st.dictionaries(_KNOWN, st.one_of(_SECTION, JSON_VALUES), max_size=5),
        st.dictionaries(st.sampled_from(SECTIONS), _SECTION, min_size=1, max_size=5),
    ),
)(check_yaml_file)


def check_run_config_bytes(raw):
    """A run's config.yaml with any bytes in it (binary, half a YAML file, a list...)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_bytes(raw)
        try:
            load_run_config(tmp)
        except ConfigError as e:
            assert "config.yaml" in str(e) and "\n" not in str(e)


test_run_config_bytes, test_run_config_bytes_long = two_speeds(
    fast=50,
    slow=3000,
    raw=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b"[", b"{", b"- a", b"model: [", b"&a [*a]", b"!!python/object:os.system x"]),
    ),
)(check_run_config_bytes)
