"""Generation: sampling processors, the KV-cache engine (batching, streaming), chat, seq2seq beam search.

    from scratchlm.inference import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    engine.generate(["def "], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)[0].text

See docs/generation.md.
"""

from scratchlm.inference.engine import Engine, GenerationResult, GenerationStats
from scratchlm.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "GenerationStats", "SamplingParams"]
