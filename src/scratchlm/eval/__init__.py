"""Evaluation: loss, perplexity and bits per byte of a language model on held-out tokens."""

from scratchlm.eval.perplexity import evaluate_lm, token_byte_lengths

__all__ = ["evaluate_lm", "token_byte_lengths"]
