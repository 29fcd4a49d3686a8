"""Translation quality: corpus BLEU and chrF computed by the sacrebleu library (Post 2018).

    scores = corpus_scores(hypotheses, references)
    scores["bleu"], scores["chrf"], scores["bleu_signature"]

BLEU (Papineni et al. 2002): ``BP * exp(mean_{n=1..4} log p_n)`` with ``p_n`` the clipped n-gram
precisions over the whole corpus and ``BP = min(1, exp(1 - r / c))`` (``r``, ``c``: reference and
hypothesis lengths), on sacrebleu's 13a tokenization of *raw, detokenized, cased* text, as the WMT
evaluations report it. chrF (Popovic 2015): the character n-gram F-score (n <= 6, beta = 2). Both come from
sacrebleu and never from a hand-made formula, so the numbers equal ``sacrebleu REF < HYP`` on the same files;
the signature printed next to each score names every setting that produced it.
"""

from __future__ import annotations

from typing import Any

from scratchlm.errors import ConfigError, DataError


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("BLEU and chrF need sacrebleu: pip install 'scratchlm[translate]'") from None
    return sacrebleu


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF of line-aligned hypotheses and references (one reference per line).

    Returns ``{"bleu", "chrf", "bleu_signature", "chrf_signature", "sentences"}`` (scores in 0..100).
    DataError when the counts differ or nothing is given.
    """
    if len(hypotheses) != len(references):
        raise DataError(
            f"{len(hypotheses)} translations but {len(references)} references; they must be line-aligned"
        )
    if not references:
        raise DataError("no sentences to score; give at least one source/reference pair")
    sacrebleu = _sacrebleu()
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "sentences": len(references),
    }
