"""The training loop: one loop for decoder LMs and the encoder-decoder model.

    train_model(cfg, run_dir, tokenizer, data_dir)
      setup:  seed -> model -> loaders -> optimizers -> resume from the latest complete checkpoint (if any)
      loop:   lr(step) -> k micro-batches (forward, loss / k, backward) -> clip (log the pre-clip norm)
              -> optimizer step -> log -> every eval.interval: val loss + samples -> checkpoint
      stop:   max_steps | max_time | early stopping (patience) | SIGINT/SIGTERM (after the current step)

Gradient accumulation: a step sums the gradients of ``k = tokens_per_step / (batch_size * context_length)``
micro-batches, each loss scaled by ``1/k``, so a step on k micro-batches of b rows equals one step on k*b
rows (up to float rounding). Mixed precision: bf16 autocast where supported (weights, grads and optimizer
state stay fp32); fp16 adds a GradScaler. ``torch.compile`` wraps the module for the forward only; the
optimizer, the checkpoints and evaluation use the plain module, so saved names never carry ``_orig_mod.``.

Exact resume: a checkpoint holds the weights, the optimizer (and scaler) state, the loop counters, the
data loader position and every RNG state, all captured *after* a completed step. Sampling uses its own
generator and evaluation reads a fresh loader, so neither perturbs the run; a run stopped at any step
(SIGTERM, or SIGKILL and a replay from the last checkpoint) ends with the same weights, bit for bit, as a
run that was never stopped (CPU, ``train.deterministic=true``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.config import Config
from scratchlm.device import autocast, resolve_device, resolve_dtype
from scratchlm.errors import TrainingError
from scratchlm.model import build_model
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.batches import Batch, batch_loss, batch_tokens, make_loaders
from scratchlm.train.evaluate import eval_record, evaluate, write_samples
from scratchlm.train.metrics import MetricsLogger, peak_flops, plot_run, truncate_metrics
from scratchlm.train.optim import build_optimizers, load_optimizer_state, optimizer_state, set_lr
from scratchlm.train.signals import StopRequest


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint (state.json ``train_state``)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # predicted tokens seen
    val_loss: float | None = None  # last validation loss
    best_val_loss: float | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early stopping)
    nan_skips: int = 0  # steps skipped for a non-finite loss
    elapsed: float = 0.0  # training wall seconds, summed over resumed runs


def micro_steps(cfg: Config) -> int:
    """Micro-batches per optimizer step: tokens_per_step / (batch_size * context_length), 1 if unset."""
    if cfg.train.tokens_per_step is None:
        return 1
    return cfg.train.tokens_per_step // (cfg.train.batch_size * cfg.model.context_length)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train_step(
    forward_model: torch.nn.Module,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batches: list[Batch],
    *,
    grad_clip: float,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """One optimizer step over the micro-batches; returns (mean loss, global grad norm before clipping).

    ``forward_model`` may be the compiled wrapper of ``model``. A non-finite loss or gradient norm skips
    the update (gradients are zeroed) and is returned as such for the caller to act on.
    """
    k = len(batches)
    total = torch.zeros((), device=device)
    for batch in batches:
        with autocast(device, dtype):
            loss = batch_loss(forward_model, batch)
        scaled = loss / k
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().float()
    mean_loss = (total / k).item()
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    if math.isfinite(mean_loss) and (math.isfinite(norm) or scaler is not None):
        for opt in optimizers:  # with a scaler, an inf norm is an fp16 overflow: scaler.step skips it
            scaler.step(opt) if scaler is not None else opt.step()
        if scaler is not None:
            scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return mean_loss, norm


def train_model(cfg: Config, run_dir: Path, tokenizer: Any, data_dir: Path | None) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; returns a summary dict.

    Side effects in run_dir: metrics.jsonl, checkpoints/, best/, samples.txt, plots/, tensorboard/.
    Returns ``{"run_dir", "step", "val_loss", "best_val_loss", "tokens", "wall_time", "stopped_reason"}``
    with ``stopped_reason`` in max_steps | max_time | early_stopping | interrupted.
    Raises TrainingError on a NaN/Inf loss (after ``train.max_nan_skips`` skips); CheckpointError when the
    run has checkpoints but none is complete.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if not cfg.model.vocab_size and tokenizer is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, run_dir, tokenizer, data_dir)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: Config, run_dir: Path, tokenizer: Any, data_dir: Path | None) -> dict[str, Any]:
    tc, ec = cfg.train, cfg.eval
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    model = build_model(cfg.model).to(device)
    train_loader, make_val_loader = make_loaders(cfg, tokenizer, data_dir, device)
    optimizers = build_optimizers(model, tc)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    state = TrainState()
    latest = ckpt.latest_checkpoint(run_dir) if tc.resume == "auto" else None
    if latest is not None:
        _restore(latest, model, optimizers, scaler, train_loader, state)
        truncate_metrics(run_dir, state.step)
        print(f"resumed from {latest} (step {state.step}, {state.tokens:,} tokens)")
    forward_model = torch.compile(model) if tc.compile else model
    model.train()

    data_meta = _data_meta(data_dir)
    accum = micro_steps(cfg)
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, dtype)
    logger = MetricsLogger(
        run_dir,
        max_steps=tc.max_steps,
        start_step=state.step,
        progress=tc.progress,
        tensorboard=tc.tensorboard,
    )
    run_start, elapsed_before = time.perf_counter(), state.elapsed
    interval_tokens, interval_time, stopped = 0, 0.0, None

    def save(improved: bool) -> Path:
        path = ckpt.save_checkpoint(
            run_dir,
            state.step,
            model,
            {"optimizers": optimizer_state(optimizers), "scaler": scaler.state_dict() if scaler else {}},
            {
                "train_state": dataclasses.asdict(state),
                "loader": train_loader.state_dict(),
                "rng": ckpt.capture_rng(),
                "schedule": {"name": tc.schedule, "step": state.step},
                "versions": ckpt.library_versions(),
            },
            keep_last=tc.keep_last,
        )
        if improved:
            ckpt.save_best(run_dir, path)
        return path

    with StopRequest() as stop:
        try:
            while stopped is None and state.step < tc.max_steps:
                lr = set_lr(optimizers, state.step, tc, elapsed_before + time.perf_counter() - run_start)
                t0 = time.perf_counter()
                batches = [train_loader.next_batch() for _ in range(accum)]
                loss, grad_norm = train_step(
                    forward_model,
                    model,
                    optimizers,
                    batches,
                    grad_clip=tc.grad_clip,
                    device=device,
                    dtype=dtype,
                    scaler=scaler,
                )
                dt = time.perf_counter() - t0
                if not math.isfinite(loss) or (scaler is None and not math.isfinite(grad_norm)):
                    _on_non_finite(loss, grad_norm, state, tc.max_nan_skips, run_dir, logger)
                    continue
                n_tokens = sum(batch_tokens(b) for b in batches)
                state.step += 1
                state.tokens += n_tokens
                state.elapsed = elapsed_before + time.perf_counter() - run_start
                interval_tokens, interval_time = interval_tokens + n_tokens, interval_time + dt
                logger.advance()
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
                            "mfu": flops_per_token * tokens_per_s / peak if peak else None,
                            "time": round(state.elapsed, 3),
                        }
                    )
                    interval_tokens, interval_time = 0, 0.0

                at_end = state.step >= tc.max_steps
                if tc.max_time is not None and state.elapsed >= tc.max_time:
                    stopped = "max_time"
                if stop.requested:
                    stopped = "interrupted"
                improved = False
                if make_val_loader is not None and (
                    state.step % ec.interval == 0 or at_end or stopped == "max_time"
                ):
                    improved = _evaluate(
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
                    )
                    if (
                        tc.early_stopping_patience is not None
                        and state.bad_evals >= tc.early_stopping_patience
                    ):
                        stopped = stopped or "early_stopping"
                if improved or stopped or at_end or state.step % tc.ckpt_interval == 0:
                    path = save(improved)
                    if stopped == "interrupted":
                        logger.message(
                            f"stopped by {stop.signal_name} after step {state.step}; checkpoint "
                            f"{path}; resume with `scratchlm train --resume {run_dir}`"
                        )
        finally:
            logger.close()

    _plots(run_dir)
    return {
        "run_dir": str(run_dir),
        "step": state.step,
        "val_loss": state.val_loss,
        "best_val_loss": state.best_val_loss,
        "tokens": state.tokens,
        "wall_time": state.elapsed,
        "stopped_reason": stopped or "max_steps",
    }


def _evaluate(
    model,
    make_val_loader,
    cfg: Config,
    state: TrainState,
    device,
    dtype,
    data_meta,
    logger,
    tokenizer,
    run_dir: Path,
) -> bool:
    """Validation loss + samples; updates best/early-stopping counters; returns whether it improved."""
    state.val_loss = evaluate(model, make_val_loader, cfg.eval.batches, device, dtype)
    logger.log(eval_record(state.step, state.val_loss, data_meta))
    write_samples(model, tokenizer, cfg, run_dir, state.step, device, dtype, make_val_loader)
    if state.best_val_loss is None or state.val_loss < state.best_val_loss:
        state.best_val_loss, state.bad_evals = state.val_loss, 0
        return True
    state.bad_evals += 1
    return False


def _on_non_finite(
    loss: float, grad_norm: float, state: TrainState, max_skips: int, run_dir: Path, logger: MetricsLogger
) -> None:
    """Skip the step (bounded by train.max_nan_skips) or stop with a TrainingError."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    if state.nan_skips < max_skips:
        state.nan_skips += 1
        logger.message(
            f"warning: {what} at step {state.step + 1}; step skipped "
            f"({state.nan_skips}/{max_skips} skips allowed by train.max_nan_skips)"
        )
        return
    logger.close()
    last = ckpt.latest_checkpoint(run_dir)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise TrainingError(
        f"{what} at step {state.step + 1} (training diverged); {keep}: lower train.lr, raise "
        f"train.warmup_steps, or allow skips with train.max_nan_skips=N"
    )


def _restore(ckpt_dir: Path, model, optimizers, scaler, loader, state: TrainState) -> None:
    """Load everything a checkpoint holds into the freshly built objects (exact resume)."""
    saved = ckpt.read_state(ckpt_dir)
    model.load_state_dict(ckpt.load_model_state(ckpt_dir))
    opt = ckpt.load_optimizer_file(ckpt_dir)
    load_optimizer_state(optimizers, opt["optimizers"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    loader.load_state_dict(saved["loader"])
    for key, value in saved["train_state"].items():
        setattr(state, key, value)
    ckpt.restore_rng(saved["rng"])


def _data_meta(data_dir: Path | None) -> dict[str, Any] | None:
    if data_dir is None:
        return None
    from scratchlm.data.shards import read_meta

    return read_meta(data_dir)


def _plots(run_dir: Path) -> None:
    try:
        plot_run(run_dir)
    except Exception as e:  # plots are a convenience: never fail a finished run over them
        print(f"note: plots not written ({e})")
