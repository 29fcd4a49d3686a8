"""Generated inputs of the second audit's classes: tokenizer training inputs, HF config.json files, the
metrics reader and counted repetitions in pre-tokenizer regexes.

Properties:
- tokenizer training input (documents as text files, .jsonl, .jsonl.gz, any of them damaged): `scratchlm
  tokenizer train` learns exactly the merges of the documents themselves (train_bpe_from_iterator on them,
  the reference), or exits 2 with one `error:` line; never merges of JSON syntax or gzip bytes;
- an HF config.json holding any JSON value, or a GPT-2 config with any setting replaced: a ModelConfig that
  builds (on the meta device) or one ScratchLMError line;
- metrics.jsonl records with any value in any known field: read_metrics hands out only numbers in number
  fields and strings in text fields, and the readers (curves, summaries, series) never raise;
- a regex with counted repetitions: accepted only with a bounded compile cost, else one ConfigError line.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import tempfile
from pathlib import Path

import torch
from fuzz_helpers import DAMAGE, JSON_VALUES, damage, two_speeds
from hypothesis import strategies as st

from scratchlm.cli import main
from scratchlm.errors import ScratchLMError

# ---- tokenizer training inputs ---------------------------------------------------------------------------

DOCS = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60), min_size=1, max_size=5)


def _write_docs(folder: Path, kind: str, docs: list[str]) -> Path:
    if kind == "text":
        d = folder / "texts"
        d.mkdir()
        for i, doc in enumerate(docs):
            (d / f"{i:02d}.txt").write_text(doc, encoding="utf-8", newline="")
        return d
    body = "".join(json.dumps({"text": doc}) + "\n" for doc in docs).encode()
    if kind == "jsonl":
        (folder / "d.jsonl").write_bytes(body)
        return folder / "d.jsonl"
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(body, mtime=0))
    return folder / "d.jsonl.gz"


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def check_tokenizer_input(kind, docs, dmg):
    from scratchlm.tokenizer import load_tokenizer, train_bpe_from_iterator

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write_docs(folder, kind, docs)
        damaged = dmg is not None and kind != "text"
        if damaged:
            path.write_bytes(damage(path.read_bytes(), *dmg))
        out = folder / "tok.json"
        argv = ["tokenizer", "train", "--input", str(path), "--vocab-size", "280", "--workers", "1"]
        rc, err = _run([*argv, "--out", str(out), "--no-progress"])
        if rc != 0:
            assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
            assert not out.exists()
            if not damaged:  # an intact input fails only when it holds no text, or a NUL in a text file
                binary = kind == "text" and any("\0" in d for d in docs) and "binary" in err
                assert binary or not "".join(docs).strip() or "empty" in err or "no text" in err, err
            return
        if damaged:
            return  # a damaged file that still parses is a (different) valid input
        reference = train_bpe_from_iterator(docs, 280, progress=False, num_workers=1)
        assert load_tokenizer(out).merges == reference.merges


test_tokenizer_input, test_tokenizer_input_long = two_speeds(
    fast=25,
    slow=1500,
    kind=st.sampled_from(["text", "jsonl", "jsonl.gz"]),
    docs=DOCS,
    dmg=st.one_of(st.none(), DAMAGE),
)(check_tokenizer_input)


# ---- HF config.json -----------------------------------------------------------------------------------

GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 2}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
HUGE = st.sampled_from([10**9, 1e9, 2**40, 10**30, 1e300, -1, 0, 3, 7, 100_000])


def check_hf_config(base, key, value, whole):
    from scratchlm.model.hf import hf_model_config
    from scratchlm.model.size import meta_model

    config = whole if whole is not None else {**base, key: value}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            cfg = hf_model_config(tmp)
        except ScratchLMError as e:
            assert "\n" not in str(e) and "config.json" in str(e), str(e)
            return
        model = meta_model(cfg, "fuzz")  # what was accepted builds, without memory
        assert sum(p.numel() for p in model.parameters()) > 0
        assert all(p.device == torch.device("meta") for p in model.parameters())


test_hf_config, test_hf_config_long = two_speeds(
    fast=40,
    slow=3000,
    base=st.sampled_from([GPT2, LLAMA]),
    key=st.sampled_from(
        sorted({*GPT2, *LLAMA, "n_inner", "tie_word_embeddings", "rope_scaling", "head_dim"})
    ),
    value=st.one_of(HUGE, JSON_VALUES),
    whole=st.one_of(st.none(), st.none(), JSON_VALUES),
)(check_hf_config)


# ---- the metrics reader -------------------------------------------------------------------------------

FIELDS = [
    "loss",
    "lr",
    "tokens",
    "tokens_per_s",
    "time",
    "val_loss",
    "train_loss",
    "kind",
    "reason",
    "detail",
]


def check_metrics_reader(records):
    from scratchlm.experiments.runs import curves
    from scratchlm.train.metrics import NUMBER_FIELDS, TEXT_FIELDS, read_metrics, series

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        got = read_metrics(tmp)
        for r in got:
            for k in NUMBER_FIELDS:
                v = r.get(k)
                assert v is None or (isinstance(v, int | float) and not isinstance(v, bool)), (k, v)
            for k in TEXT_FIELDS:
                assert k not in r or isinstance(r[k], str), (k, r[k])
        for key in FIELDS:
            xs, ys = series(got, key)
            assert len(xs) == len(ys)
        c = curves(tmp)
        assert set(c) == {"train", "eval"}


_RECORD = st.builds(
    lambda kind, step, extra: {"kind": kind, "step": step, **extra},
    st.sampled_from(["train", "eval", "stop", "other"]),
    st.integers(0, 20),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(st.floats(-10, 10), JSON_VALUES), max_size=6),
)
test_metrics_reader, test_metrics_reader_long = two_speeds(
    fast=40, slow=3000, records=st.lists(_RECORD, max_size=8)
)(check_metrics_reader)


# ---- counted repetitions in a pre-tokenizer regex -----------------------------------------------------

_PIECES = st.sampled_from(["a", "\\w", "[a-z]", "(?:ab)", "(", ")", "\\p{L}", "[{}]", "|", "x"])
_COUNTS = st.sampled_from(["", "", "{2}", "{1,3}", "{50}", "{1000}", "{,99999}", "{99999999}", "{3,}", "+"])


def check_counted_pattern(parts):
    from scratchlm.errors import ConfigError
    from scratchlm.tokenizer.pretokenize import MAX_PATTERN_COST, pattern_cost, resolve_pattern

    pattern = "".join(piece + count for piece, count in parts) or "a"
    try:
        resolve_pattern(pattern)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert pattern_cost(pattern) <= MAX_PATTERN_COST  # accepted only when cheap to compile


test_counted_pattern, test_counted_pattern_long = two_speeds(
    fast=60, slow=5000, parts=st.lists(st.tuples(_PIECES, _COUNTS), max_size=6)
)(check_counted_pattern)
