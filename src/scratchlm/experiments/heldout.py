"""Held-out test scores of a finished translation run: sacreBLEU, chrF and perplexity on a test file pair.

    record = score_test_set("runs/sweeps/multi30k-pos/pos=none", "test_2016_flickr.de", "test_2016_flickr.en")

The sweep calls this after each seq2seq point when its config's ``sweep.test`` names a source and a reference
file (configs/ablations/multi30k-*.yaml), so its table has test BLEU and chrF next to validation perplexity.
The model scored is the run's final one: ``averaged/`` when the run wrote it (``train.average_last``), else
``best/`` (by the run's own validation metric); the test files are never used to choose. Translations are
greedy unless ``beams`` > 1 (:mod:`scratchlm.eval.translation`; raw cased text, sacrebleu's defaults).

The result is one ``{"kind": "eval_translation", ...}`` record appended to the run's metrics.jsonl, the layout
``scratchlm eval RUN --src FILE --ref FILE`` writes (``bleu``, ``chrf``, ``loss``, ``ppl``, signatures,
``src``/``ref`` paths, ``checkpoint``) plus ``val_pairs_loss``/``val_pairs_ppl`` (the same model's
perplexity on every validation pair, without label smoothing), and the translations in ``RUN/eval/test_<src stem>_beam<k>.hyp``.
A record for the same files, search and checkpoint is not computed twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from scratchlm import fileio
from scratchlm.errors import DataError
from scratchlm.train.metrics import read_metrics


def final_checkpoint_kind(run_dir: Path) -> str:
    """``"averaged"`` when the run wrote averaged/ (train.average_last), else ``"best"``."""
    from scratchlm.train.average import AVERAGED

    return "averaged" if (Path(run_dir) / AVERAGED).is_dir() else "best"


def read_pairs(src: str | Path, ref: str | Path) -> list[tuple[str, str]]:
    """Line-aligned (source, reference) pairs of two UTF-8 files; DataError naming the file otherwise."""
    lines = []
    for path in (src, ref):
        try:
            lines.append(Path(path).read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(
                f"test file {path} cannot be read ({e}); check sweep.test in the config"
            ) from None
    if len(lines[0]) != len(lines[1]) or not lines[0]:
        raise DataError(f"{src} has {len(lines[0])} lines but {ref} has {len(lines[1])}; line-align them")
    return list(zip(lines[0], lines[1]))


def score_test_set(
    run_dir: str | Path, src: str | Path, ref: str | Path, *, beams: int = 1, device: str | None = None
) -> dict[str, Any]:
    """Score the run's final model on the (src, ref) files; returns (and appends) the metrics record."""
    from scratchlm.api import load
    from scratchlm.data.pairs import split_pairs
    from scratchlm.device import resolve_dtype
    from scratchlm.eval.translation import evaluate_translation, reference_loss

    run_dir = Path(run_dir)
    src, ref = str(Path(src).resolve()), str(Path(ref).resolve())
    which = final_checkpoint_kind(run_dir)
    lm = load(run_dir, which=which, device=device)
    for r in reversed(read_metrics(run_dir)):
        same = (r.get("src"), r.get("ref"), r.get("beams"), r.get("checkpoint")) == (
            src,
            ref,
            beams,
            str(lm.checkpoint),
        )
        if r.get("kind") == "eval_translation" and same and r.get("bleu") is not None:
            return r
    pairs = read_pairs(src, ref)
    start = time.perf_counter()
    dtype = resolve_dtype(lm.config.train.dtype, lm.device)
    # a source longer than the context is cut to it with one warning, as `scratchlm eval` does (issue 26.7)
    result = evaluate_translation(
        lm.model,
        lm.tokenizer,
        pairs,
        beam_size=beams,
        dtype=dtype,
        truncate=True,
        strict_option="`scratchlm eval RUN --src F --ref F --strict`",
    )
    # validation perplexity of the same model on every validation pair, without label smoothing (training's
    # val_loss includes it and covers eval.batches batches only)
    val_loss, _, _ = reference_loss(lm.model, lm.tokenizer, split_pairs(lm.config.data)[1], dtype)
    step = json.loads((Path(lm.checkpoint) / "state.json").read_text()).get("step")
    record = {
        "kind": "eval_translation",
        "step": step,
        "checkpoint": str(lm.checkpoint),
        "which": which,
        "src": src,
        "ref": ref,
        "sentences": result["sentences"],
        "beams": beams,
        "length_penalty": result["length_penalty"],
        "loss": result["loss"],
        "ppl": result["ppl"],
        "bleu": result["bleu"],
        "chrf": result["chrf"],
        "bleu_signature": result["bleu_signature"],
        "chrf_signature": result["chrf_signature"],
        "val_pairs_loss": val_loss,
        "val_pairs_ppl": math.exp(min(val_loss, 50.0)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    (run_dir / "eval").mkdir(exist_ok=True)
    hyp = run_dir / "eval" / f"test_{Path(src).stem}_beam{beams}.hyp"
    fileio.write_text(hyp, "".join(h + "\n" for h in result["hypotheses"]))
    return record
