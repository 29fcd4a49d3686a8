"""The training loop: one loop for decoder LMs and the encoder-decoder model.

    train_model(cfg, run_dir, tokenizer, data_dir)
      setup:  seed -> model -> loaders -> optimizers -> resume from the latest complete checkpoint (if any)
      loop:   lr(step) -> k micro-batches (forward, loss / k, backward) -> clip (log the pre-clip norm)
              -> optimizer step -> log -> every eval.interval: val loss (+ samples at the end) -> checkpoint
      stop:   max_steps | max_time | early stopping (patience) | SIGINT/SIGTERM (after the current step)

The step itself is ``train/step.py`` (one wait for the device per step; the next step's batches are read
while it runs); ``train/memory.py`` applies activation checkpointing and the chunked loss to the model.

Gradient accumulation: a step sums the gradients of ``k = tokens_per_step / (batch_size * context_length *
world_size)`` micro-batches per rank, each loss scaled by ``1/k``, so a step on k micro-batches of b rows
equals one step on k*b rows (up to float rounding). Mixed precision: bf16 autocast where supported (weights,
grads and optimizer state stay fp32); fp16 adds a GradScaler. ``torch.compile`` wraps the module for the
forward only; the optimizer, the checkpoints and evaluation use the plain module, so saved names never carry
``_orig_mod.``.

Several processes (``torchrun``, see ``train/distributed.py``): each rank reads its share of the batches,
``train.parallel`` (DDP, FSDP2, ZeRO-1) is applied to the model from outside, and every decision is the same
on every rank: the loss is averaged over ranks, a signal on any rank stops all of them after the same step,
the clock is the ranks' mean. Only rank 0 writes metrics, samples, plots and checkpoints; all ranks take
part in gathering the state it writes, and all resume from the same files.

Exact resume: a checkpoint holds the weights, the optimizer (and scaler) state, the loop counters, the
data loader position and every RNG state, all captured *after* a completed step. Sampling uses its own
generator and evaluation reads a fresh loader, so neither perturbs the run; a run stopped at any step
(SIGTERM, or SIGKILL and a replay from the last checkpoint) ends with the same weights, bit for bit, as a
run that was never stopped (CPU, ``train.deterministic=true``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.config import Config
from scratchlm.device import resolve_dtype
from scratchlm.model import build_model
from scratchlm.model.attention_choice import resolve_attention
from scratchlm.train import checkpoint as ckpt
from scratchlm.train import distributed as dist
from scratchlm.train.batches import apply_token_budget, batch_tokens, make_loaders, micro_steps, shard_meta
from scratchlm.train.dryrun import check_memory
from scratchlm.train.evaluate import truncate_samples
from scratchlm.train.init_from import init_model
from scratchlm.train.memory import apply_memory_options, fit_micro_batch
from scratchlm.train.metrics import MetricsLogger, peak_flops, plot_run, start_line, truncate_metrics
from scratchlm.train.optim import set_lr
from scratchlm.train.signals import StopRequest
from scratchlm.train.step import CUDA_GRAPH_MODES, Prefetcher, train_step
from scratchlm.train.stopping import describe_stop, on_non_finite, stop_record, warmup_warning
from scratchlm.train.threads import set_cpu_threads
from scratchlm.train.validation import run_evaluation

__all__ = ["TrainState", "micro_steps", "train_model", "train_step"]


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint (state.json ``train_state``)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # predicted tokens seen
    val_loss: float | None = None  # last validation loss
    best_val_loss: float | None = None
    val_bleu: float | None = None  # last validation BLEU (seq2seq, eval.bleu_sentences > 0)
    best_val_bleu: float | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    nan_skips: int = 0  # steps skipped for a non-finite loss
    elapsed: float = 0.0  # training wall seconds, summed over resumed runs
    # train losses of the steps since the last evaluation (its train_loss is their mean): saved, so that
    # a resumed run reports the same train_loss as one never stopped
    eval_losses: list[float] = dataclasses.field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train_model(cfg: Config, run_dir: Path, tokenizer: Any, data_dir: Path | None) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns a summary dict.

    Side effects in run_dir: metrics.jsonl, checkpoints/, best/, samples.txt, plots/, tensorboard/.
    Returns ``{"run_dir", "step", "val_loss", "best_val_loss", "tokens", "wall_time", "stopped_reason",
    "stop_detail"}`` with ``stopped_reason`` in max_steps | max_time | early_stopping | interrupted and
    ``stop_detail`` a sentence (train/stopping.py); both are also logged to metrics.jsonl.
    Raises TrainingError on a NaN/Inf loss (after ``train.max_nan_skips`` skips); CheckpointError when the
    run has checkpoints but none is complete.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if not cfg.model.vocab_size and tokenizer is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        with dist.process_group(tc.device) as world:  # torchrun: join the group (a no-op in one process)
            return _train(cfg, run_dir, tokenizer, data_dir, world)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)  # train.threads holds for this run only


def _train(cfg: Config, run_dir: Path, tokenizer: Any, data_dir: Path | None, world: dist.World) -> dict:
    cfg = apply_token_budget(cfg, world.size, verbose=world.is_main)  # data.max_tokens -> train.max_steps
    device = dist.rank_device(cfg.train.device, world)
    dtype = resolve_dtype(cfg.train.dtype, device)
    threads_note = set_cpu_threads(cfg.train.threads, device)  # train/threads.py: fewer on busy cores
    if threads_note and world.is_main:
        print(threads_note)
    if cfg.train.auto_micro_batch:  # the same step in micro-batches that fit (before anything is built)
        cfg = fit_micro_batch(cfg, device, dtype, world.size)
    tc, ec = cfg.train, cfg.eval
    accum = micro_steps(cfg, world.size)
    seed_everything(tc.seed)
    sharded = world.size if tc.parallel in ("fsdp", "zero1") else 1
    check_memory(cfg, device, dtype, sharded)  # a far too large model: one line, not an allocator traceback
    cfg = dataclasses.replace(cfg, model=resolve_attention(cfg.model, tc.batch_size, device, dtype))
    model = build_model(cfg.model).to(device)  # the same initial weights on every rank (same seed)
    apply_memory_options(model, tc)  # activation checkpointing, chunked loss: names unchanged
    if world.size > 1:
        torch.manual_seed(tc.seed + world.rank)  # but independent dropout noise per rank
    train_loader, make_val_loader = make_loaders(cfg, tokenizer, data_dir, device, world.rank, world.size)
    train_loader = Prefetcher(train_loader, accum)  # next step's batches read while the device works
    state = TrainState()
    latest = dist.on_main(lambda: ckpt.latest_checkpoint(run_dir)) if tc.resume == "auto" else None
    if tc.lora.rank:  # LoRA: frozen base + adapters; a checkpoint holds the adapters only (train/adapters.py)
        from scratchlm.train.adapters import setup_lora

        setup_lora(model, cfg, run_dir, latest, is_main=world.is_main)
    else:
        if latest is not None:  # full weights into the plain module, before DDP broadcasts / FSDP shards them
            model.load_state_dict(ckpt.load_model_state(latest))
        init_model(model, cfg, resumed=latest is not None)  # train.init_from weights (new runs), train.freeze
    forward_model, optimizers = dist.parallelize(model, tc, world, device, arch=cfg.model.arch, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if latest is not None:
        _restore(latest, model, optimizers, scaler, train_loader, state, world)
        if world.is_main:
            print(f"resumed from {latest} (step {state.step}, {state.tokens:,} tokens)")
    if world.is_main:  # drop what was logged after the checkpoint (all of it when there is none: a rerun
        truncate_metrics(run_dir, state.step)  # after a kill before the first checkpoint logs it again)
        truncate_samples(run_dir, state.step)
    if tc.compile:  # "reduce-overhead" and "max-autotune" also capture CUDA graphs (train_step marks steps)
        forward_model = torch.compile(
            forward_model, mode=None if tc.compile_mode == "default" else tc.compile_mode
        )
    model.train()

    data_meta = None if cfg.data.stream else shard_meta(data_dir)  # (bits per byte needs shard meta)
    if world.is_main:  # one line; the resolved config is for --dry-run and --verbose
        # seq2seq token batches hold up to data.batch_tokens padded tokens (source + target), not rows x context
        rows = cfg.data.batch_tokens if cfg.model.arch == "seq2seq" and cfg.data.batch_tokens else None
        tokens_per_step = accum * world.size * (rows or tc.batch_size * cfg.model.context_length)
        print(start_line(cfg, model, device, dtype, run_dir, tokens_per_step), flush=True)
    # warmup longer than the budget: said at once for max_steps, after 5 timed steps for max_time
    warmup_said = world.is_main and bool(warn_if(warmup_warning(tc, state.step)))
    first_step = state.step
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, dtype)
    logger = MetricsLogger(
        run_dir,
        max_steps=tc.max_steps,
        start_step=state.step,
        progress=tc.progress,
        tensorboard=tc.tensorboard,
        enabled=world.is_main,
        max_time=tc.max_time if tc.schedule_clock == "time" else None,  # the bar counts seconds then
        start_time=state.elapsed,
    )
    run_start, elapsed_before = time.perf_counter(), state.elapsed
    interval_tokens, interval_time, stopped = 0, 0.0, None
    losses = state.eval_losses  # train losses since the last evaluation (restored on resume)

    # mid-run checkpoints of one process are written from a snapshot on a helper thread (checkpoint.py)
    writer = ckpt.BackgroundWriter() if tc.background_checkpoints and world.size == 1 else None

    def save(improved: bool, final: bool) -> Path | None:
        """Every rank gathers (FSDP / ZeRO-1 shards, RNG states); rank 0 writes; all get its path or error.
        With ``writer``, a checkpoint that is not the run's last goes to the background: returns None."""
        weights, optimizer = dist.full_model_state(model), dist.full_optimizer_state(model, optimizers)
        if tc.lora.rank:  # only the adapters, and where their base is
            from scratchlm.train.adapters import base_record, lora_state

            weights, lora_record = lora_state(weights), {"lora_base": base_record(cfg)}
        else:
            lora_record = {}
        rng, loaders = zip(*dist.all_gather_objects((ckpt.capture_rng(), train_loader.state_dict())))
        per_rank = {"rng_per_rank": list(rng), "loader_per_rank": list(loaders)} if world.size > 1 else {}
        optimizer_state = {"optimizers": optimizer, "scaler": scaler.state_dict() if scaler else {}}
        meta = {
            "train_state": dataclasses.asdict(state),
            "loader": loaders[0],  # a stream's position differs per rank, shards' does not
            "rng": rng[0],
            **per_rank,
            **lora_record,
            "schedule": {"name": tc.schedule, "step": state.step},
            "versions": ckpt.library_versions(),
        }
        step, background = state.step, writer is not None and not final
        if background:  # this step's values, out of reach of the steps that run while it is written
            weights, optimizer_state = ckpt.snapshot((weights, optimizer_state))
            meta = json.loads(json.dumps(meta))

        def write() -> Path:
            path = ckpt.save_checkpoint(run_dir, step, weights, optimizer_state, meta, keep_last=tc.keep_last)
            if improved:
                ckpt.save_best(run_dir, path)
            return path

        if writer is None:
            return dist.on_main(write)
        if background:
            writer.submit(write)  # raises the previous background write's error, if it failed
            return None
        writer.wait()
        return write()

    with StopRequest() as stop:
        try:
            while stopped is None and state.step < tc.max_steps:
                lr = set_lr(optimizers, state.step, tc, state.elapsed)
                t0 = time.perf_counter()
                batches = train_loader.next_step()
                loss, grad_norm = train_step(
                    forward_model,
                    model,
                    optimizers,
                    batches,
                    grad_clip=tc.grad_clip,
                    device=device,
                    dtype=dtype,
                    scaler=scaler,
                    before_sync=train_loader.fill,
                    cuda_graphs=tc.compile and tc.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda",
                )
                dt = time.perf_counter() - t0
                if not math.isfinite(loss) or (scaler is None and not math.isfinite(grad_norm)):
                    if writer is not None:  # the last good checkpoint it names is on disk first
                        writer.wait()
                    on_non_finite(loss, grad_norm, state, tc.max_nan_skips, run_dir, logger)
                    continue
                # one all-reduce for what every rank must agree on: tokens of all ranks, a signal on any
                # rank (nobody stops alone, so nobody waits forever in a collective), the mean clock
                n_tokens, signals, clock = dist.sum_over_ranks(
                    sum(batch_tokens(b) for b in batches),
                    stop.requested,
                    elapsed_before + time.perf_counter() - run_start,
                )
                state.step += 1
                losses.append(loss)
                state.tokens += int(n_tokens)
                state.elapsed = clock / world.size
                interval_tokens, interval_time = interval_tokens + int(n_tokens), interval_time + dt
                logger.advance(state.elapsed)
                if state.step == first_step + 1:
                    first_clock = state.elapsed  # (the first step pays for warm-up: not timed)
                elif state.step == first_step + 6 and tc.max_time and world.is_main and not warmup_said:
                    warmup_said = bool(
                        warn_if(
                            warmup_warning(tc, state.step, state.elapsed, (state.elapsed - first_clock) / 5)
                        )
                    )
                if state.step % tc.log_interval == 0 or state.step == 1:
                    tokens_per_s = interval_tokens / max(interval_time, 1e-9)
                    logger.log(
                        {
                            "kind": "train",
                            "step": state.step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens": state.tokens,
                            "tokens_per_s": tokens_per_s,
                            "mfu": flops_per_token * tokens_per_s / (peak * world.size) if peak else None,
                            "time": round(state.elapsed, 3),
                        }
                    )
                    interval_tokens, interval_time = 0, 0.0

                at_end = state.step >= tc.max_steps
                if tc.max_time is not None and state.elapsed >= tc.max_time:
                    stopped = "max_time"
                if signals:
                    stopped = "interrupted"
                improved = False
                if make_val_loader is not None and (
                    state.step % ec.interval == 0 or at_end or stopped == "max_time"
                ):
                    improved = run_evaluation(
                        model,
                        make_val_loader,
                        cfg,
                        state,
                        device,
                        dtype,
                        data_meta,
                        logger,
                        tokenizer,
                        run_dir,
                        world,
                        train_loss=sum(losses) / len(losses),
                        epoch=train_loader.state_dict().get("epoch"),  # seq2seq loaders count epochs
                        final=at_end or stopped is not None,  # samples: at the end (eval.sample_interval)
                    )
                    losses.clear()
                    if (
                        tc.early_stopping_patience is not None
                        and state.bad_evals >= tc.early_stopping_patience
                    ):
                        stopped = stopped or "early_stopping"
                if improved or stopped or at_end or state.step % tc.ckpt_interval == 0:
                    path = save(improved, final=bool(stopped or at_end))
                    if stopped == "interrupted":
                        logger.message(f"checkpoint {path}; resume with `scratchlm train --resume {run_dir}`")
            reason = stopped or "max_steps"
            detail = describe_stop(reason, state, tc, stop.signal_name)
            logger.log(stop_record(state.step, reason, detail))
        finally:
            logger.close()
            if writer is not None:
                _finish_background_write(writer)

    if world.is_main:
        if tc.average_last and cfg.model.arch == "seq2seq":
            from scratchlm.train.average import average_run

            out, n = average_run(run_dir, tc.average_last, allow_fewer=True)
            print(f"averaged the last {n} checkpoints into {out}")
        _plots(run_dir)
    return {
        "run_dir": str(run_dir),
        "step": state.step,
        "val_loss": state.val_loss,
        "best_val_loss": state.best_val_loss,
        "tokens": state.tokens,
        "wall_time": state.elapsed,
        "stopped_reason": reason,
        "stop_detail": detail,
    }


def _finish_background_write(writer: ckpt.BackgroundWriter) -> None:
    """Let a checkpoint still being written finish before the run returns. Normally the last save waited
    for it already; here the loop left early with an error, so a failed write is only a warning (the
    error in flight is the one to report; the previous checkpoint is intact either way)."""
    try:
        writer.wait()
    except Exception as e:
        warnings.warn(f"a background checkpoint write also failed: {e}", stacklevel=2)


def warn_if(message: str | None) -> str | None:
    """``warnings.warn(message)`` when there is one (the CLI prints it as one ``warning:`` line)."""
    if message:
        warnings.warn(message, stacklevel=2)
    return message


def _restore(ckpt_dir: Path, model, optimizers, scaler, loader, state: TrainState, world: dist.World) -> None:
    """Load the rest of a checkpoint (the weights are in already) into the new objects (exact resume).

    Every rank reads the same files; the loader position is rank 0's (batch s of rank r is a pure function
    of (seed, rank, world_size, s)) and the RNG states are the rank's own."""
    saved = ckpt.read_state(ckpt_dir)
    opt = ckpt.load_optimizer_file(ckpt_dir)
    dist.load_optimizer_state(model, optimizers, opt["optimizers"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    loader.load_state_dict(saved.get("loader_per_rank", [saved["loader"]] * world.size)[world.rank])
    for key, value in saved["train_state"].items():
        setattr(state, key, value)
    ckpt.restore_rng(saved["rng_per_rank"][world.rank] if world.size > 1 else saved["rng"])


def _plots(run_dir: Path) -> None:
    try:
        plot_run(run_dir)
    except Exception as e:  # plots are a convenience: never fail a finished run over them
        print(f"note: plots not written ({e})")
