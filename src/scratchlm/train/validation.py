"""One evaluation during training: validation loss and perplexity, train perplexity since the last
evaluation, BLEU/chrF of greedy translations (seq2seq), samples, and whether the run improved.

    improved = run_evaluation(model, make_val_loader, cfg, state, ..., train_loss=mean_train_loss)

The record appended to metrics.jsonl (``kind: eval``) holds ``val_loss``, ``val_ppl = exp(val_loss)``,
``val_bpb`` (when byte counts are known), ``val_acc_top1`` / ``val_acc_top5`` (:mod:`scratchlm.eval.accuracy`),
``train_loss`` / ``train_ppl`` (the mean training loss over the steps since the previous evaluation, and
its exponential), ``epoch`` (seq2seq loaders count epochs) and, with ``eval.bleu_sentences = N > 0``,
``val_bleu`` and ``val_chrf``: sacreBLEU and chrF (:mod:`scratchlm.eval.bleu`) of greedy translations of the
first N validation pairs (a fixed subset, so the numbers are comparable across evaluations; the training
loss includes label smoothing, the BLEU does not care). ``eval.metric`` picks what best/ follows: the lowest
``val_loss`` or the highest ``val_bleu``.

Every rank computes the same numbers (the BLEU subset is translated on every rank: under FSDP every
forward needs all of them), so best/ and early stopping decide the same everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Config, DataConfig
from scratchlm.device import autocast
from scratchlm.train import distributed as dist
from scratchlm.train.evaluate import eval_record, evaluate_metrics, write_samples


def run_evaluation(
    model,
    make_val_loader,
    cfg: Config,
    state: Any,
    device: torch.device,
    dtype: torch.dtype,
    data_meta: dict[str, Any] | None,
    logger: Any,
    tokenizer: Any,
    run_dir: Path,
    world: dist.World,
    *,
    train_loss: float | None = None,
    epoch: int | None = None,
    final: bool = True,
) -> bool:
    """Evaluate, log the record, write samples; update ``state``'s best/early-stopping counters.

    Returns whether the run improved on ``eval.metric``. Each rank evaluates its share of the validation
    batches (all-reduced: the same loss everywhere); rank 0 writes the samples (under FSDP every rank
    generates them with it). Samples are written at the ``final`` evaluation of the run and at those whose
    step is a multiple of ``eval.sample_interval`` (> 0): generating them token by token costs more than
    the evaluation itself at small sizes (nanoGPT's CPU recipe: ~1.4 s for 128 tokens against ~1.6 s for
    the 20 validation batches, under load), so a run does it only where asked.
    """
    ec = cfg.eval
    metrics = evaluate_metrics(model, make_val_loader, ec.batches, device, dtype, world.rank, world.size)
    state.val_loss = metrics.pop("val_loss")
    extra = dict(metrics, tokens=state.tokens, time=round(state.elapsed, 3))
    record = eval_record(state.step, state.val_loss, data_meta, **extra)
    if train_loss is not None and math.isfinite(train_loss):
        record.update(train_loss=train_loss, train_ppl=math.exp(min(train_loss, 50.0)))
    if epoch is not None:
        record["epoch"] = epoch
    if cfg.model.arch == "seq2seq" and ec.bleu_sentences > 0 and tokenizer is not None:
        scores = validation_bleu(model, tokenizer, cfg, device, dtype)
        record.update(val_bleu=scores["bleu"], val_chrf=scores["chrf"])
        state.val_bleu = scores["bleu"]
    logger.log(record)
    if ec.metric == "bleu":
        improved = state.best_val_bleu is None or state.val_bleu > state.best_val_bleu
        if improved:
            state.best_val_bleu = state.val_bleu
    else:
        improved = state.best_val_loss is None or state.val_loss < state.best_val_loss
    if state.best_val_loss is None or state.val_loss < state.best_val_loss:
        state.best_val_loss = state.val_loss
    state.bad_evals = 0 if improved else state.bad_evals + 1
    patience = cfg.train.early_stopping_patience
    final = final or (patience is not None and state.bad_evals >= patience)  # early stopping ends it here
    every = ec.sample_interval
    if (final or (every > 0 and state.step % every == 0)) and (world.is_main or dist.is_sharded(model)):
        args = (model, tokenizer, cfg, run_dir, state.step, device, dtype, make_val_loader)
        write_samples(*args, write=world.is_main)
    return improved


_PAIRS: dict[tuple[str, int], list[tuple[str, str]]] = {}  # (repr of data config, n) -> the BLEU subset


def _bleu_pairs(data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
    """The first ``n`` validation pairs, read once per process."""
    from scratchlm.data.pairs import split_pairs

    key = (repr(data_cfg), n)
    if key not in _PAIRS:
        _PAIRS[key] = split_pairs(data_cfg)[1][:n]
    return _PAIRS[key]


def validation_bleu(
    model: torch.nn.Module, tokenizer: Any, cfg: Config, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """sacreBLEU and chrF of greedy translations of the first ``eval.bleu_sentences`` validation pairs.

    Sources longer than the model's context are left out (they could not be translated in training
    either). The model is put back in train mode afterwards.
    """
    from scratchlm.eval.bleu import corpus_scores
    from scratchlm.inference.translate import translate_texts

    pairs = _bleu_pairs(cfg.data, cfg.eval.bleu_sentences)
    ctx = cfg.model.context_length
    lengths = [len(ids) for ids in tokenizer.encode_batch([s for s, _ in pairs])]
    pairs = [p for p, n in zip(pairs, lengths) if n < ctx]
    with autocast(device, dtype):
        hyps = translate_texts(model, tokenizer, [s for s, _ in pairs], beam_size=1, batch_size=128)
    model.train()
    return corpus_scores(hyps, [t for _, t in pairs])
