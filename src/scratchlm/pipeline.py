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
from pathlib import Path
from typing import Any

from scratchlm.config import Config, load_run_config, save_config, to_dict
from scratchlm.console import is_terminal
from scratchlm.data.sources import (  # noqa: F401 - SEQ2SEQ_SPECIALS, Sources: names of the pipeline too
    SEQ2SEQ_SPECIALS,
    Sources,
    _key,
    cache_dir,
    cached_tokenizer_path,
    training_sources,
)
from scratchlm.errors import ConfigError, ScratchLMError
from scratchlm.tokenizer.chat_template import save_chat_template


def get_tokenizer(cfg: Config, sources: Sources | None = None, progress: bool = True):
    """Load ``tokenizer.path``, or train one on the training source (cached by fingerprint + settings)."""
    from scratchlm.tokenizer import CharTokenizer, load_tokenizer
    from scratchlm.tokenizer.bpe import train_bpe_on_source

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
    else:  # the source's documents (jsonl records, parquet rows, text files), as prepare reads them
        tok = train_bpe_on_source(
            sources.train,
            tc.vocab_size,
            special_tokens=specials,
            pattern=tc.pattern,
            num_workers=tc.num_workers,
            progress=progress and is_terminal(),  # a bar
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)  # (atomic: fileio)
    return tok


def get_shards(cfg: Config, tokenizer, sources: Sources | None = None, progress: bool = True) -> Path:
    """Encode the sources into ``data.data_dir`` (or a cache dir) unless up-to-date shards are there."""
    from scratchlm.data.prepare import prepare

    if sources is None:
        sources = training_sources(cfg)
    if cfg.data.data_dir:
        out = Path(cfg.data.data_dir)
    else:
        # "split-bytes": shards whose meta.json counts each split's bytes (bits per byte); older caches lack them
        key = _key(sources.fingerprint, tokenizer.fingerprint, cfg.data.val_fraction, "split-bytes")
        out = cache_dir() / "shards" / key
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
    tokenizer.save(run_dir / "tokenizer.json")  # (atomic: fileio)
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
        progress = progress and world.is_main  # the stages' one-line reports; their bars need a terminal too
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
        run_dir = cfg.run_dir
        try:  # a failure from here on (a full disk in start_run included) leaves the run as it found it
            run_dir = dist.on_main(lambda: start_run(cfg, tokenizer))
            if source is not None:
                from scratchlm.train.init_from import record_init_source

                dist.on_main(lambda: record_init_source(run_dir, source))
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
        from scratchlm import fileio

        fileio.write_bytes(run_dir / "config.yaml", config_bytes)


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The saved config of ``run_dir`` (plus overrides such as a longer ``train.max_steps``), set to resume."""
    from scratchlm.config import from_dict, parse_overrides

    run_dir = Path(run_dir)
    if not has_checkpoint(run_dir):
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"nothing to resume in {run_dir}: not a run directory (no config.yaml)")
        every = _saved_ckpt_interval(run_dir)
        raise ConfigError(
            f"nothing to resume in {run_dir}: the run stopped before its first checkpoint"
            f"{f' (one every {every} steps: train.ckpt_interval)' if every else ''}; start it over by running "
            f"the command that started it again (without --resume: its metrics restart from step 0), "
            f"or delete {run_dir}"
        )
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


def _saved_ckpt_interval(run_dir: Path) -> int | None:
    """train.ckpt_interval of the run's config.yaml, or None when it cannot be read (the hint is optional)."""
    try:
        return load_run_config(run_dir).train.ckpt_interval
    except ScratchLMError:
        return None


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
        progress=progress and is_terminal(),  # a bar
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)  # (atomic: fileio)
    return tok
