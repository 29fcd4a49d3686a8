"""Why a run stopped, in words, and what happens on a non-finite loss.

A run ends for one of five reasons (``stopped_reason``): ``max_steps`` (the planned steps are done),
``max_time`` (``train.max_time`` seconds of training), ``early_stopping`` (``train.early_stopping_patience``
evaluations in a row without a better validation loss), ``interrupted`` (SIGINT/SIGTERM; the run can be
resumed) or a ``TrainingError`` (a NaN/Inf loss after ``train.max_nan_skips`` skips). The reason and a
sentence (``stop_detail``) are printed, returned by ``train_model`` and logged to metrics.jsonl as
``{"kind": "stop", "step", "reason", "detail"}`` (the last such record is the run's latest stop).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scratchlm.errors import TrainingError
from scratchlm.train import checkpoint as ckpt


def describe_stop(reason: str, state: Any, train_cfg: Any, signal_name: str | None = None) -> str:
    """One sentence for a stop reason, e.g. ``early stopping at step 600 after 3 evaluations without
    improvement (best val loss 1.8123)``; ``state`` is the loop's TrainState, ``train_cfg`` its TrainConfig."""
    step, max_steps, max_time = state.step, train_cfg.max_steps, train_cfg.max_time
    elapsed, patience, best_val_loss = state.elapsed, train_cfg.early_stopping_patience, state.best_val_loss
    if reason == "max_steps":
        return f"reached train.max_steps={max_steps}"
    if reason == "max_time":
        return f"reached train.max_time={max_time:g} s at step {step} ({elapsed:.0f} s of training)"
    if reason == "early_stopping":
        best = f" (best val loss {best_val_loss:.4f})" if best_val_loss is not None else ""
        return f"early stopping at step {step} after {patience} evaluations without improvement{best}"
    if reason == "interrupted":
        return f"interrupted by {signal_name or 'a signal to another rank'} after step {step}"
    return f"{reason} at step {step}"


def warmup_warning(
    train_cfg: Any, step: int = 0, elapsed: float = 0.0, seconds_per_step: float | None = None
) -> str | None:
    """One line when ``train.warmup_steps`` exceeds the steps the run's budget allows, else None.

    The budget is ``train.max_steps``, or, with ``train.max_time`` and a measured ``seconds_per_step``,
    ``step + (max_time - elapsed) / seconds_per_step`` when that is fewer: a 2-minute run of a recipe with
    200 warmup steps may end before its learning rate ever reaches ``train.lr``, quietly (it happened: a
    Multi30k run at BLEU 0.06).
    """
    tc = train_cfg
    budget, why = tc.max_steps, f"train.max_steps={tc.max_steps}"
    if tc.max_time and seconds_per_step:
        estimate = step + max(0.0, tc.max_time - elapsed) / seconds_per_step
        if estimate < budget:
            budget = int(estimate)
            why = f"train.max_time={tc.max_time:g} s (about {budget} steps at {seconds_per_step:.3g} s per step)"
    if tc.warmup_steps <= budget:
        return None
    return (
        f"train.warmup_steps={tc.warmup_steps} exceeds the {budget} steps that {why} allows: the learning rate "
        f"will not reach train.lr={tc.lr:g}; lower train.warmup_steps (e.g. {max(1, budget // 10)}) or give the "
        "run more steps"
    )


def stop_record(step: int, reason: str, detail: str) -> dict[str, Any]:
    """The metrics.jsonl record of a stop."""
    return {"kind": "stop", "step": step, "reason": reason, "detail": detail}


def on_non_finite(
    loss: float, grad_norm: float, state: Any, max_skips: int, run_dir: Path, logger: Any
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
    logger.log(stop_record(state.step, "diverged", f"{what} at step {state.step + 1}"))
    logger.close()
    last = ckpt.latest_checkpoint(run_dir)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise TrainingError(
        f"{what} at step {state.step + 1} (training diverged); {keep}: lower train.lr, raise "
        f"train.warmup_steps, or allow skips with train.max_nan_skips=N"
    )
