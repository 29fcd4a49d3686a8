"""The main job, stage by stage: text source -> tokenizer -> shards -> trainer -> run directory.

Each stage is a plain function so it can be run and tested alone::

    source    = training_sources(cfg)                 # corpus.py
    tokenizer = get_tokenizer(cfg, source)            # trained here, or reused from the cache
    data_dir  = get_shards(cfg, tokenizer, source)    # data/prepare.py, reused when up to date
    run_dir   = start_run(cfg, tokenizer)             # config.yaml + tokenizer.json
    result    = train_model(cfg, run_dir, tokenizer, data_dir)   # train/trainer.py

Tokenizers and shards are cached under ``$SCRATCHLM_CACHE`` (default ``~/.cache/scratchlm``), keyed by the
source fingerprint and the tokenizer settings, so a second ``scratchlm train`` skips straight to training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.config import Config, load_run_config, save_config, to_dict
from scratchlm.console import is_terminal
from scratchlm.errors import ConfigError
from scratchlm.tokenizer.chat_template import save_chat_template

SEQ2SEQ_SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


def cache_dir() -> Path:
    """Where cached tokenizers and shards live (``$SCRATCHLM_CACHE`` or ``~/.cache/scratchlm``)."""
    return Path(os.environ.get("SCRATCHLM_CACHE", Path.home() / ".cache" / "scratchlm"))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Sources:
    """The text a run learns from: a train source and an optional explicit validation source."""

    train: Any
    val: Any | None
    description: str

    @property
    def fingerprint(self) -> str:
        return _key(self.train.fingerprint, self.val.fingerprint if self.val is not None else None)


def training_sources(cfg: Config) -> Sources:
    """The built-in corpus (split by file) when ``data.source`` is empty, else the user's sources."""
    from scratchlm.corpus import builtin_corpus, resolve_source

    if cfg.data.stream:  # a tokenizer is learnt from the head of the stream; nothing else reads it up front
        from scratchlm.data.stream import TokenizerSample

        return Sources(TokenizerSample(cfg.data), None, "the head of the stream")
    if not cfg.data.source or cfg.data.source == ["builtin"]:
        corpus = builtin_corpus(cfg.data.val_fraction)
        return Sources(corpus.train, corpus.val, corpus.train.description.rsplit(",", 1)[0])
    train = resolve_source(cfg.data.source, text_field=cfg.data.text_field)
    val = resolve_source(cfg.data.val_source, text_field=cfg.data.text_field) if cfg.data.val_source else None
    return Sources(train, val, train.description)


def get_tokenizer(cfg: Config, sources: Sources | None = None, progress: bool = True):
    """Load ``tokenizer.path``, or train one on the training source (cached by fingerprint + settings)."""
    from scratchlm.tokenizer import CharTokenizer, load_tokenizer, train_bpe, train_bpe_from_iterator

    tc = cfg.tokenizer
    if tc.path:
        return load_tokenizer(tc.path)
    if tc.kind == "gpt2":
        raise ConfigError(
            "tokenizer.kind=gpt2 needs tokenizer.path=DIR holding GPT-2's vocab.json and merges.txt"
        )
    if sources is None:
        sources = training_sources(cfg)
    specials = list(tc.special_tokens)
    if cfg.model.arch == "seq2seq":
        specials += [s for s in SEQ2SEQ_SPECIALS if s not in specials]
    path = cached_tokenizer_path(cfg, sources)
    if path.is_file():
        print(f"tokenizer: reusing {path}")
        return load_tokenizer(path)
    print(f"tokenizer: training {tc.kind} (vocab {tc.vocab_size}) on {sources.description}")
    if tc.kind == "char":
        tok = CharTokenizer.train(sources.train.documents(), special_tokens=specials)
    elif getattr(sources.train, "paths", None):
        tok = train_bpe(
            sources.train.paths,
            tc.vocab_size,
            special_tokens=specials,
            pattern=tc.pattern,
            num_workers=tc.num_workers,
            progress=progress,
        )
    else:
        tok = train_bpe_from_iterator(
            sources.train.documents(),
            tc.vocab_size,
            special_tokens=specials,
            pattern=tc.pattern,
            num_workers=tc.num_workers,
            progress=progress,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tokenizer.json.tmp")
    tok.save(tmp)
    tmp.replace(path)
    return tok


def cached_tokenizer_path(cfg: Config, sources: Sources) -> Path:
    """Where the tokenizer trained on ``sources`` with ``cfg.tokenizer``'s settings is cached."""
    tc = cfg.tokenizer
    specials = list(tc.special_tokens)
    if cfg.model.arch == "seq2seq":
        specials += [s for s in SEQ2SEQ_SPECIALS if s not in specials]
    settings = dict(kind=tc.kind, vocab_size=tc.vocab_size, specials=specials, pattern=tc.pattern, v=1)
    return cache_dir() / "tokenizers" / _key(sources.train.fingerprint, settings) / "tokenizer.json"


def get_shards(cfg: Config, tokenizer, sources: Sources | None = None, progress: bool = True) -> Path:
    """Encode the sources into ``data.data_dir`` (or a cache dir) unless up-to-date shards are there."""
    from scratchlm.data.prepare import prepare

    if sources is None:
        sources = training_sources(cfg)
    if cfg.data.data_dir:
        out = Path(cfg.data.data_dir)
    else:
        out = cache_dir() / "shards" / _key(sources.fingerprint, tokenizer.fingerprint, cfg.data.val_fraction)
    prepare(
        sources.train,
        tokenizer,
        out,
        val_source=sources.val,
        val_fraction=cfg.data.val_fraction,
        num_workers=cfg.data.num_workers,
        progress=progress,
    )
    return out


def resolved(cfg: Config, tokenizer) -> Config:
    """The config with derived values filled in (the vocabulary size comes from the tokenizer)."""
    if cfg.model.vocab_size and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; leave it at 0 to take it from the tokenizer"
        )
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*"))


def start_run(cfg: Config, tokenizer) -> Path:
    """Create (or re-enter, when resuming) the run directory with config.yaml and tokenizer.json.

    A run directory that already holds checkpoints is only re-entered to resume the same run: with
    ``train.resume=never``, or with a different model or tokenizer, it is an error (nothing is overwritten).
    """
    run_dir = cfg.run_dir
    if has_checkpoint(run_dir):
        if cfg.train.resume == "never":
            raise ConfigError(
                f"run directory {run_dir} already holds checkpoints; pick another train.name "
                "(or train.run_dir), or resume it with train.resume=auto"
            )
        saved = load_run_config(run_dir)
        if to_dict(saved)["model"] != to_dict(cfg)["model"]:
            raise ConfigError(
                f"run directory {run_dir} holds a run with another model config; resume it with "
                f"`scratchlm train --resume {run_dir}` or pick another train.name"
            )
        saved_tok = run_dir / "tokenizer.json"
        if saved_tok.is_file():
            from scratchlm.tokenizer import load_tokenizer

            if load_tokenizer(saved_tok).fingerprint != tokenizer.fingerprint:
                raise ConfigError(
                    f"run directory {run_dir} was trained with another tokenizer; pick another train.name"
                )
        print(f"resuming the run in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    tmp = run_dir / "tokenizer.json.tmp"
    tokenizer.save(tmp)
    tmp.replace(run_dir / "tokenizer.json")
    save_chat_template(tokenizer, run_dir)  # tokenizer_config.json, when the tokenizer has a chat template
    return run_dir


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Everything the main job does: tokenizer, shards (decoder models), training. Returns the summary.

    Under torchrun every rank calls this: rank 0 trains the tokenizer, prepares the shards and creates the
    run directory while the others wait, then they load the tokenizer and shards from the cache it wrote.
    """
    from scratchlm.train import distributed as dist
    from scratchlm.train.trainer import train_model

    source = None
    if cfg.train.init_from:  # model config and tokenizer from the pretrained source (train/init_from.py)
        from scratchlm.train.init_from import apply_init_from

        cfg, source = apply_init_from(cfg)
    preflight(cfg)  # cheap checks (device, seed, sizes, tokens_per_step) before any expensive work
    with dist.process_group(cfg.train.device) as world:
        progress = progress and world.is_main and is_terminal()  # bars for a person at a terminal only
        if cfg.model.arch == "seq2seq":
            tokenizer = dist.main_first(lambda: _seq2seq_tokenizer(cfg, progress))
            data_dir = None
        elif cfg.data.format == "chat":  # conversations are encoded in memory (data/chat.py), no shards
            from scratchlm.data.chat import chat_tokenizer

            tokenizer, data_dir = chat_tokenizer(cfg), None
        else:
            sources = training_sources(cfg)
            tokenizer = dist.main_first(lambda: get_tokenizer(cfg, sources, progress))
            if cfg.data.stream:  # tokenized while training (data/stream.py): no shards
                data_dir = None
            else:
                data_dir = dist.main_first(lambda: get_shards(cfg, tokenizer, sources, progress))
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(data_dir)))
        cfg = resolved(cfg, tokenizer)
        saved = _saved_run(cfg.run_dir) if world.is_main else None
        before = _entries(cfg.run_dir) if world.is_main and saved is None else None
        run_dir = dist.on_main(lambda: start_run(cfg, tokenizer))
        if source is not None:
            from scratchlm.train.init_from import record_init_source

            dist.on_main(lambda: record_init_source(run_dir, source))
        try:
            return train_model(cfg, run_dir, tokenizer, data_dir)
        except BaseException:
            if saved is not None:
                _restore_if_unchanged(run_dir, *saved)
            elif before is not None:
                _remove_unstarted(run_dir, before)
            raise


def preflight(cfg: Config) -> None:
    """The checks that need neither tokenizer nor data, run before the expensive stages (a tokenizer and
    shards can take minutes to build) and before the run directory exists: tokens_per_step among the
    ranks, the device and precision, and whether the model can fit the device at all."""
    from scratchlm.device import resolve_dtype
    from scratchlm.train import distributed as dist
    from scratchlm.train.dryrun import check_memory
    from scratchlm.train.trainer import micro_steps

    world = dist.world_from_env()
    micro_steps(cfg, world.size)
    device = dist.rank_device(cfg.train.device, world)
    dtype = resolve_dtype(cfg.train.dtype, device)
    # the vocabulary comes from the tokenizer, not built yet: its configured size is the bound to check
    vocab = cfg.model.vocab_size or (50257 if cfg.tokenizer.kind == "gpt2" else cfg.tokenizer.vocab_size)
    sized = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    check_memory(sized, device, dtype, world.size if cfg.train.parallel in ("fsdp", "zero1") else 1)


def _entries(run_dir: Path) -> set[str]:
    """Names in ``run_dir`` now (empty when it does not exist)."""
    return {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()


def _remove_unstarted(run_dir: Path, before: set[str]) -> None:
    """A new run that failed before its first checkpoint leaves nothing behind: what it added to the run
    directory (all of it, when it made the directory) is removed, so no half-made run confuses a later
    resume. The error message is the diagnosis; a run with a checkpoint is kept as it is."""
    import shutil

    if has_checkpoint(run_dir) or not run_dir.is_dir():
        return
    for name in _entries(run_dir) - before:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if not before:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _saved_run(run_dir: Path) -> tuple[bytes, Path | None] | None:
    """(config.yaml bytes, latest checkpoint) of a run about to be resumed; None for a new run."""
    from scratchlm.train.checkpoint import latest_checkpoint

    if not (has_checkpoint(run_dir) and (run_dir / "config.yaml").is_file()):
        return None
    return (run_dir / "config.yaml").read_bytes(), latest_checkpoint(run_dir)


def _restore_if_unchanged(run_dir: Path, config_bytes: bytes, checkpoint: Path | None) -> None:
    """A resume that failed before writing a checkpoint leaves the run's config.yaml as it found it, so
    that overrides which never took effect (a bad value, a typo) are not saved into the run."""
    from scratchlm.train.checkpoint import latest_checkpoint

    if latest_checkpoint(run_dir) == checkpoint:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_bytes(config_bytes)
        tmp.replace(run_dir / "config.yaml")


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The saved config of ``run_dir`` (plus overrides such as a longer ``train.max_steps``), set to resume."""
    from scratchlm.config import from_dict, parse_overrides

    run_dir = Path(run_dir)
    if not has_checkpoint(run_dir):
        raise ConfigError(f"nothing to resume in {run_dir}: no checkpoints/step_* directory")
    saved = to_dict(load_run_config(run_dir))
    values = copy.deepcopy(saved)
    for sec, kv in parse_overrides(overrides or []).items():
        if sec == "preset":
            raise ConfigError("preset= cannot change a run being resumed; override single keys instead")
        for key, value in kv.items():  # a nested group (train.lora) is updated field by field
            if isinstance(value, dict) and isinstance(values[sec].get(key), dict):
                values[sec][key] = {**values[sec][key], **value}
            else:
                values[sec][key] = value
    values["train"].update(run_dir=str(run_dir), resume="auto")
    cfg = from_dict(values, f"{run_dir}/config.yaml + overrides")
    changed = [k for k, v in to_dict(cfg)["model"].items() if v != saved["model"].get(k)]
    if changed:
        raise ConfigError(
            f"model.{changed[0]} cannot change in a run being resumed (its checkpoints are of the saved "
            "model); drop the model override, or start a new run with another train.name"
        )
    return cfg


def _seq2seq_tokenizer(cfg: Config, progress: bool):
    """One tokenizer shared by source and target, trained on both sides of the parallel training files."""
    from scratchlm.data.pairs import load_pairs
    from scratchlm.tokenizer import load_tokenizer, train_bpe

    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if not cfg.data.source:
        raise ConfigError(
            "model.arch=seq2seq needs data.source=PREFIX of line-aligned files (e.g. "
            "../shared/data/multi30k/train with data.src_lang=de data.tgt_lang=en) or a .tsv file"
        )
    prefix = cfg.data.source[0]
    if prefix.lower().endswith(".tsv"):
        files = [prefix]
    else:
        # sorted: one joint tokenizer for both directions (de-en and en-de share the cache entry)
        files = sorted([f"{prefix}.{cfg.data.src_lang}", f"{prefix}.{cfg.data.tgt_lang}"])
    load_pairs(prefix, cfg.data.src_lang, cfg.data.tgt_lang)  # checks the files exist and line up
    specials = list(cfg.tokenizer.special_tokens) + [
        s for s in SEQ2SEQ_SPECIALS if s not in cfg.tokenizer.special_tokens
    ]
    key = _key(  # every setting that changes the tokenizer, the special tokens (and their order) included
        [str(Path(f).resolve()) for f in files],
        [Path(f).stat().st_mtime_ns for f in files],
        cfg.tokenizer.vocab_size,
        cfg.tokenizer.pattern,
        specials,
    )
    path = cache_dir() / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path)
    tok = train_bpe(
        files,
        cfg.tokenizer.vocab_size,
        special_tokens=specials,
        pattern=cfg.tokenizer.pattern,
        num_workers=cfg.tokenizer.num_workers,
        progress=progress,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path.with_name("tokenizer.json.tmp"))
    path.with_name("tokenizer.json.tmp").replace(path)
    return tok
