"""Typed configuration: dataclass sections, presets, YAML files and dotted CLI overrides.

A run is described by one :class:`Config` with five sections (``model``, ``tokenizer``, ``data``, ``train``,
``eval``). The dataclasses below are the single source of truth for every default; each field carries a
one-line doc (``doc(...)``) that ``scratchlm train --help`` prints.

Precedence, lowest to highest::

    defaults  <  preset (``preset: NAME`` in YAML, or ``preset=NAME`` on the CLI)  <  YAML file  <  CLI overrides

    scratchlm train configs/shakespeare-char.yaml model.n_layer=8 train.lr=3e-4

Why a small loader of our own instead of tyro / jsonargparse / OmegaConf: the whole thing is ~250 lines
with no dependency, it gives exactly the errors we want (``unknown key 'model.n_layerr' (did you mean
'model.n_layer'?)``), it type-checks values against the dataclass annotations (``int``, ``float``,
``bool``, ``str``, ``X | None``, ``list[str]``), and a learner can read it in one sitting. OmegaConf would
add interpolation we do not need, and tyro/jsonargparse would take over argument parsing, which must
stay in ``cli.py``.

The merged config is checked once by ``config_checks.validate`` (choices, ranges, combinations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scratchlm.errors import ConfigError
from scratchlm.presets import PRESETS  # the named runs (presets.py)


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line doc (lists are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"doc": help})
    return field(default=default, metadata={"doc": help})


@dataclass
class ModelConfig:
    """The network: a decoder-only GPT (GPT-2 or Llama style) or the encoder-decoder Transformer."""

    arch: str = doc("gpt", "gpt (decoder-only LM) | seq2seq (encoder-decoder for translation)")
    vocab_size: int = doc(0, "vocabulary size; 0 = take it from the tokenizer")
    context_length: int = doc(256, "maximum sequence length in tokens (seq2seq: source and target each)")
    n_layer: int = doc(4, "transformer blocks (seq2seq: decoder blocks)")
    n_encoder_layer: int | None = doc(None, "seq2seq encoder blocks; None = n_layer")
    n_head: int = doc(4, "attention heads (query heads)")
    n_kv_head: int | None = doc(None, "key/value heads: None = n_head (MHA), 1 = MQA, in between = GQA")
    d_model: int = doc(128, "embedding / residual stream width")
    d_ff: int | None = doc(None, "MLP hidden width; None = 4*d_model, or 8/3*d_model rounded up for swiglu")
    multiple_of: int = doc(64, "swiglu hidden width is rounded up to a multiple of this")
    norm: str = doc("layernorm", "layernorm | rmsnorm")
    norm_eps: float = doc(1e-5, "epsilon inside the norms")
    norm_position: str = doc("pre", "pre (GPT-2, Llama) | post (original Transformer: x = norm(x + f(x)))")
    pos: str = doc("learned", "positions: learned | sinusoidal | rope | none")
    rope_style: str = doc("half", "RoPE pairing: half (HF Llama, rotate_half) | interleaved (RoPE paper)")
    rope_theta: float = doc(10000.0, "RoPE base frequency")
    mlp: str = doc("gelu_tanh", "gelu_tanh (GPT-2) | gelu (exact erf) | swiglu | relu2 | relu")
    bias: bool = doc(True, "bias in linear layers and LayerNorm")
    dropout: float = doc(0.0, "dropout probability (embeddings, attention, residual)")
    tie_embeddings: bool = doc(True, "share the token embedding with the output head")
    qk_norm: bool = doc(False, "normalise queries and keys per head before attention")
    attention: str = doc(
        "sdpa",
        "attention backend: sdpa | sdpa_cudnn (cuDNN's kernel first) | manual | flash_triton | "
        "auto (the fastest of sdpa, sdpa_cudnn and flash_triton, timed)",
    )
    impl: str = doc("fast", "fast (torch's fused ops) | reference (the hand-written scratchlm.reference ops)")
    init_std: float = doc(0.02, "std of the normal init; residual projections get std/sqrt(2*n_layer)")
    share_embeddings: bool = doc(True, "seq2seq: one embedding table for source and target")
    label_smoothing: float = doc(0.0, "label smoothing of the cross-entropy (0.1 in the Transformer paper)")


@dataclass
class TokenizerConfig:
    """How the tokenizer is obtained: trained here (byte-level BPE or char-level) or loaded from a file."""

    kind: str = doc("bpe", "bpe (byte-level BPE trained here) | char (one token per character) | gpt2")
    path: str | None = doc(None, "use this tokenizer.json (or a GPT-2 vocab dir) instead of training one")
    vocab_size: int = doc(4096, "BPE vocabulary size: 256 bytes + special tokens + merges")
    special_tokens: list[str] = doc(["<|endoftext|>"], "special tokens; the first is the end-of-text token")
    pattern: str = doc("gpt2", "pre-tokenizer regex: gpt2 | gpt4")
    num_workers: int | None = doc(None, "pre-tokenization processes; None = all cores")


@dataclass
class DataConfig:
    """Where the text comes from and how it is split, sharded and batched."""

    source: list[str] = doc([], "files, dirs, globs, *.jsonl, hf:NAME; empty = the built-in corpus")
    val_source: list[str] = doc([], "explicit validation source; empty = split the source by val_fraction")
    val_fraction: float = doc(0.1, "fraction of documents held out for validation")
    text_field: str = doc("text", "field holding the text in jsonl/parquet/HF records")
    data_dir: str | None = doc(None, "shard directory; None = a cache dir keyed by source and tokenizer")
    num_workers: int | None = doc(None, "encoding processes for prepare; None = all cores")
    loader: str = doc(
        "random", "random (random windows, as nanoGPT) | sequential (each token once per epoch)"
    )
    doc_aligned: bool = doc(False, "rows start at document starts (short documents packed)")
    src_lang: str = doc("de", "seq2seq: source language suffix of the parallel files")
    tgt_lang: str = doc("en", "seq2seq: target language suffix of the parallel files")
    max_pair_len: int = doc(128, "seq2seq: drop pairs longer than this many tokens on either side")
    batch_tokens: int | None = doc(
        None, "seq2seq: batch by tokens (padded source + target per batch); None = train.batch_size rows"
    )
    stream: bool = doc(False, "tokenize while training (no prepare pass); see docs/streaming.md")
    stream_workers: int = doc(1, "stream: tokenizer processes per source (0 = in the training process)")
    mixture: list[str] = doc([], "stream: WEIGHT:SOURCE entries, one drawn per row (replaces source)")
    fallback: list[str] = doc([], "stream: sources tried in order when the source/mixture cannot be opened")
    max_tokens: int | None = doc(None, "token budget: sets train.max_steps = max_tokens // tokens per step")
    format: str = doc(
        "text", "text (documents) | chat (jsonl of {messages: [...]}; loss on assistant tokens)"
    )
    chat_template: str | None = doc(
        None, "chat: plain | chatml; None = the tokenizer's stored one, else chatml"
    )


@dataclass
class LoRAConfig:
    """``train.lora.*``: low-rank adapters (Hu et al. 2021) instead of full fine-tuning (train/adapters.py)."""

    rank: int = doc(0, "LoRA rank r (0 = off: full training); only the adapters are trained and saved")
    alpha: float = doc(16.0, "LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = doc(0.0, "dropout on the adapters' input")
    targets: list[str] = doc(
        ["*.attn.c_q", "*.attn.c_v"],
        "module-name patterns (fnmatch) of the linear layers to adapt, e.g. *.attn.*,*.mlp.*",
    )


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and logging."""

    run_dir: str | None = doc(None, "run directory; None = runs/<name>")
    name: str = doc("default", "run name (used for the default run_dir)")
    seed: int = doc(1337, "random seed for init, data order and sampling")
    device: str = doc("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = doc(
        "auto",
        "auto (bf16 where GPU or CPU has bf16 instructions, else fp16/fp32) | float32 | bfloat16 | float16",
    )
    compile: bool = doc(False, "torch.compile the model (the saved state dict is always the plain module's)")
    compile_mode: str = doc(
        "default",
        "torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead (CUDA graphs)",
    )
    activation_checkpointing: bool = doc(
        False, "recompute each block's activations in the backward: less memory, ~1/3 more compute"
    )
    loss_chunk_rows: int = doc(
        0, "training loss over this many rows of output logits at a time (0 = all at once; e.g. 4096)"
    )
    auto_micro_batch: bool = doc(
        False, "CUDA: split each step into the largest micro-batches that fit in memory (same training)"
    )
    batch_size: int = doc(16, "micro-batch size (rows)")
    tokens_per_step: int | None = doc(
        None, "tokens per optimizer step, summed over ranks; None = batch_size * context per rank (no accum)"
    )
    parallel: str = doc(
        "ddp", "torchrun strategy: ddp | fsdp (FSDP2) | zero1 (ZeRO-1); ignored in one process"
    )
    max_steps: int = doc(1000, "optimizer steps")
    max_time: float | None = doc(None, "stop after this many seconds of training (schedule uses max_steps)")
    optimizer: str = doc(
        "adamw",
        "adamw | muon (Muon for hidden matrices, AdamW for the rest); *_reference: hand-written twins",
    )
    lr: float = doc(1e-3, "peak learning rate (AdamW)")
    min_lr: float = doc(1e-4, "learning rate at the end of the decay")
    muon_lr: float = doc(0.02, "Muon learning rate for hidden weight matrices")
    muon_momentum: float = doc(0.95, "Muon momentum")
    weight_decay: float = doc(0.1, "AdamW weight decay (matrices only)")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.95, "AdamW beta2")
    eps: float = doc(1e-8, "AdamW epsilon")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0 = off)")
    schedule: str = doc(
        "cosine", "cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant | noam (inverse sqrt)"
    )
    warmup_steps: int = doc(100, "linear warmup steps")
    decay_fraction: float = doc(0.2, "wsd: fraction of steps spent in the final decay")
    schedule_clock: str = doc(
        "steps", "lr schedule progress: steps (step/max_steps) | time (elapsed/max_time)"
    )
    log_interval: int = doc(10, "log metrics every N steps")
    ckpt_interval: int = doc(500, "write a checkpoint every N steps (and at the end)")
    keep_last: int = doc(2, "keep this many recent checkpoints (best/ is kept apart)")
    background_checkpoints: bool = doc(
        True,
        "write mid-run checkpoints from a snapshot on a helper thread while training goes on (one process; "
        "the same files; the last checkpoint is always written before the run returns)",
    )
    resume: str = doc("auto", "auto (continue the run in run_dir if it has a checkpoint) | never")
    init_from: str | None = doc(
        None, "start from these weights: a HF GPT-2/Llama dir or a ScratchLM run/checkpoint"
    )
    freeze: list[str] = doc([], "parameter-name patterns kept frozen (fnmatch, e.g. wte.*,blocks.0.*)")
    lora: LoRAConfig = field(
        default_factory=LoRAConfig, metadata={"doc": "LoRA adapters (train.lora.rank > 0 turns them on)"}
    )
    early_stopping_patience: int | None = doc(None, "stop after N evals without val improvement")
    average_last: int = doc(0, "seq2seq: at the end, average the last K checkpoints into averaged/ (0 = off)")
    max_nan_skips: int = doc(0, "skip up to N steps with a NaN/Inf loss before stopping (0 = stop)")
    deterministic: bool = doc(False, "use deterministic algorithms (exact resume tests)")
    tensorboard: bool = doc(False, "write TensorBoard event files (needs the tensorboard extra)")
    progress: bool = doc(True, "show a progress bar")
    threads: int = doc(
        0,
        "CPU threads (torch.set_num_threads); 0 = torch's default (one per core); -1 = auto: only the cores "
        "the load average leaves free, at least 1 (for a busy shared machine; train/threads.py)",
    )


@dataclass
class EvalConfig:
    """Validation and samples written during and after training."""

    interval: int = doc(250, "evaluate on the validation split every N steps (and at the end)")
    batches: int = doc(20, "validation batches per evaluation")
    num_samples: int = doc(1, "samples written to samples.txt (at the end; see sample_interval)")
    sample_interval: int = doc(
        0, "also write samples at evaluations whose step is a multiple of N (0 = only at the end)"
    )
    sample_prompt: str = doc("", "prompt of those samples ('' = start after an end-of-text token)")
    sample_tokens: int = doc(128, "tokens per sample")
    temperature: float = doc(0.8, "sampling temperature for those samples")
    top_k: int | None = doc(50, "top-k for those samples (None = off)")
    metric: str = doc("loss", "what selects best/: loss (val loss) | bleu (seq2seq val BLEU, greedy)")
    bleu_sentences: int = doc(
        0, "seq2seq: validation pairs translated (greedy) for BLEU/chrF per eval; 0 = off"
    )


@dataclass
class Config:
    """A whole run. ``preset`` names the preset it started from (for the record)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str | None = doc(None, "preset the config started from (see `scratchlm presets`)")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or Path("runs") / self.train.name)


SECTIONS = ("model", "tokenizer", "data", "train", "eval")
# data.stream_workers is per source, each a spawned process with its own queue: beyond this only the
# start-up cost and the memory grow (one or two per source keep a GPU fed; docs/streaming.md)
MAX_STREAM_WORKERS = 64


# ----------------------------------------------------------------------------------------------------------
# loading, merging, validation


def field_docs(section: str | None = None) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every option, in declaration order (for --help)."""
    rows = []
    for sec in SECTIONS if section is None else (section,):
        rows += _field_rows(sec, _section_class(sec))
    return rows


def _field_rows(prefix: str, cls: type) -> list[tuple[str, str, Any, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):  # a nested group (train.lora): one row per field
            rows += _field_rows(f"{prefix}.{f.name}", tp)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}.{f.name}", _type_name(tp), default, f.metadata.get("doc", "")))
    return rows


def _section_class(name: str) -> type:
    return _SECTION_TYPES[name]


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The field types of a section class, evaluated once (``get_type_hints`` compiles every annotation
    string: per field it made ``scratchlm train --help`` take a second). Read only."""
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(args[0])}]"
    return "None" if tp is type(None) else tp.__name__


def _closest(key: str, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option; a known section's own keys are tried first."""
    sec, _, name = key.partition(".")
    same_section = [o for o in options if o.startswith(sec + ".")] if name else []
    match = difflib.get_close_matches(key, same_section, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, options, n=1, cutoff=0.5
    )
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(options)})" if len(options) <= 12 else " (see `scratchlm train --help`)"


def _all_keys() -> list[str]:
    return [row[0] for row in field_docs()] + ["preset"]


def _int_in_float_notation(text: str) -> Any:
    """``"1e9"`` -> 1000000000 (exactly, through Decimal); anything else is returned unchanged."""
    import decimal

    try:
        d = decimal.Decimal(text.strip().replace("_", ""))
    except decimal.InvalidOperation:
        return text
    if not d.is_finite() or d != d.to_integral_value() or abs(d.adjusted()) > 30:
        return text
    return int(d)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; strings from the CLI are parsed as YAML scalars first."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = parse_list(key, value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            with contextlib.suppress(yaml.YAMLError):
                value = yaml.safe_load(value)
        if isinstance(value, str):  # "1e9": YAML 1.1 reads a float only with a dot (1.0e9), so parse it here
            value = _int_in_float_notation(value)
        if isinstance(value, float) and value.is_integer():  # 1e3 -> 1000
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _merge(cfg: dict[str, dict[str, Any]], updates: dict[str, Any], where: str) -> None:
    """Merge a nested dict of section -> {field: value} into ``cfg`` after checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got {updates!r}")
    for sec, values in updates.items():
        if sec == "preset":
            continue
        if sec not in SECTIONS:
            raise ConfigError(f"{where}: unknown section '{sec}'{_closest(str(sec), list(SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{sec}' must be a mapping of options, got {values!r}")
        hints = _hints(_SECTION_TYPES[sec])
        for k, v in values.items():
            key = f"{sec}.{k}"
            if k not in hints:
                raise ConfigError(f"{where}: unknown key '{key}'{_closest(key, _all_keys())}")
            if dataclasses.is_dataclass(hints[k]):  # a nested group: merged field by field
                cfg[sec][k] = _merge_group(key, cfg[sec].get(k) or hints[k](), v, where)
            else:
                cfg[sec][k] = _coerce(key, v, hints[k])


def _merge_group(key: str, current: Any, values: Any, where: str) -> Any:
    """``current`` (a nested dataclass, e.g. LoRAConfig) with ``values`` (a mapping) merged in, checked."""
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping of options, got {values!r}")
    hints = _hints(type(current))
    updates = {}
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(f"{where}: unknown key '{key}.{k}'{_closest(f'{key}.{k}', _all_keys())}")
        updates[k] = _coerce(f"{key}.{k}", v, hints[k])
    return dataclasses.replace(current, **updates)


def _apply_preset(cfg: dict[str, dict[str, Any]], name: str, where: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset '{name}'{_closest(name, sorted(PRESETS))}")
    _merge(cfg, PRESETS[name], f"preset {name}")


def parse_list(key: str, text: str) -> list[Any]:
    """A list value written on the command line: ``a,b`` or the YAML/bracket form ``['a', 'b']``.

    ``[a.txt, b.txt]`` and ``['<|endoftext|>', '<|bos|>']`` are parsed as YAML flow lists (quotes are
    YAML's, not part of the items); ``a, b`` splits at commas and strips the spaces; ``''`` or ``[]`` is
    the empty list. A bracket form that is not a valid YAML list is a ConfigError, never a silent guess.
    """
    text = text.strip()
    if text.startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError:
            items = None
        if not isinstance(items, list):
            raise ConfigError(
                f"{key}={text!r} is not a valid list; write {key}=a,b or {key}=\"['a', 'b']\" "
                "(quote items that contain commas or brackets)"
            )
        return items
    return [v.strip() for v in text.split(",") if v.strip()]


# Fields holding paths of inputs; a relative one written in a config file is relative to that file's
# folder (the run directory, an output, stays relative to the current directory like its default).
PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("source", "val_source", "data_dir"),
    "tokenizer": ("path",),
}


def _resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's values with relative paths of :data:`PATH_FIELDS` made absolute against ``folder``.

    Left alone: absolute paths, ``~/...``, ``hf:NAME`` sources and the ``builtin`` corpus. Values of a wrong
    type pass through unchanged for :func:`_coerce` to name.
    """

    def fix(v: Any) -> Any:
        if not isinstance(v, str) or not v or v == "builtin" or v.startswith(("hf:", "~")):
            return v
        return v if Path(v).is_absolute() else str(Path(os.path.abspath(folder / v)))

    out = dict(values)
    for sec, names in PATH_FIELDS.items():
        section = out.get(sec)
        if not isinstance(section, dict):
            continue
        section = dict(section)
        for name in names:
            v = section.get(name)
            if isinstance(v, list):
                section[name] = [fix(x) for x in v]
            elif isinstance(v, str) and name in ("source", "val_source"):
                section[name] = [fix(x) for x in parse_list(f"{sec}.{name}", v)]
            elif v is not None:
                section[name] = fix(v)
        out[sec] = section
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.n_layer=8", "train.lr=3e-4"]`` -> ``{"model": {"n_layer": "8"}, "train": {"lr": "3e-4"}}``.

    Values stay strings here; :func:`_coerce` parses them against the field's type. Paths stay relative
    to the current directory (only a config file's paths are relative to the file).
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. model.n_layer=8)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key == "preset":
            out["preset"] = value
            continue
        if key.count(".") == 2 and key in _all_keys():  # a nested group's field: train.lora.rank=8
            sec, group, name = key.split(".")
            out.setdefault(sec, {}).setdefault(group, {})[name] = value
            continue
        if key.count(".") == 2 and any(k.startswith(key.rsplit(".", 1)[0] + ".") for k in _all_keys()):
            raise ConfigError(f"unknown key '{key}'{_closest(key, _all_keys())}")
        if key.count(".") != 1:
            raise ConfigError(f"override key '{key}' must be section.key{_closest(key, _all_keys())}")
        sec, name = key.split(".")
        if sec not in SECTIONS:
            raise ConfigError(f"unknown key '{key}'{_closest(key, _all_keys())}")
        out.setdefault(sec, {})[name] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> Config:
    """Resolve a :class:`Config`: defaults < preset < YAML file < dotted overrides.

    The preset is taken from (highest first) ``preset=`` in the overrides, the argument, or ``preset:`` in
    the YAML file. Relative paths in the file (:data:`PATH_FIELDS`) are resolved against the file's folder
    and stored absolute; a top-level ``sweep:`` mapping (a study's grid) is skipped here. Raises
    :class:`ConfigError` naming the key for unknown keys, wrong types, bad values or
    a missing file.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found (give a YAML file, e.g. configs/cpu-small.yaml)")
        file_values = _read_yaml(p, "fix the file") or {}
        if not isinstance(file_values, dict):
            raise ConfigError(
                f"config file '{p}' must be a mapping of sections, got {type(file_values).__name__}"
            )
        file_values.pop("sweep", None)  # a study's grid, read by `scratchlm sweep` (experiments/sweep.py)
        file_values = _resolve_paths(file_values, p.parent)
    cli_values = parse_overrides(overrides or [])

    chosen = cli_values.get("preset") or preset or file_values.get("preset")
    cfg: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
    if chosen:
        _apply_preset(cfg, str(chosen), "preset")
    _merge(cfg, file_values, str(path))
    _merge(cfg, cli_values, "command line")
    config = Config(**{sec: _SECTION_TYPES[sec](**cfg[sec]) for sec in SECTIONS}, preset=chosen or None)
    from scratchlm.config_checks import validate  # (it imports this module)

    validate(config)
    return config


# ----------------------------------------------------------------------------------------------------------
# (de)serialisation


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any], where: str = "config") -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. a run's config.yaml), checking keys and types."""
    cfg: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
    _merge(cfg, {k: v for k, v in values.items() if k != "preset"}, where)
    config = Config(**{sec: _SECTION_TYPES[sec](**cfg[sec]) for sec in SECTIONS}, preset=values.get("preset"))
    from scratchlm.config_checks import validate  # (it imports this module)

    validate(config)
    return config


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    from scratchlm import fileio

    fileio.write_text(path, to_yaml(cfg))


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a ScratchLM run directory (no config.yaml); train one first")
    values = _read_yaml(path, "restore the run's config.yaml, or start a new run")
    missing = [
        sec for sec in SECTIONS if not isinstance(values, dict) or not isinstance(values.get(sec), dict)
    ]
    if missing:  # a saved config always holds every section: an empty or cut-off file is not a default run
        raise ConfigError(
            f"{path} is empty, truncated or not a saved config (no '{missing[0]}' section); restore the "
            "run's config.yaml (it holds every section), or start a new run"
        )
    try:
        return from_dict(values, str(path))
    except ConfigError as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def _read_yaml(path: Path, fix: str) -> Any:
    """``yaml.safe_load`` of a file, with every way it can fail said in one line naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (a binary or damaged file); {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); {fix}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config; {fix}") from None
