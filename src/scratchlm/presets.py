"""Named presets: nested dicts applied on top of the config defaults (config.py), holding only what differs.

``preset=NAME`` (or ``preset: NAME`` in a YAML file) applies one; ``scratchlm presets`` lists them.
"""

from __future__ import annotations

from typing import Any

_GPT2 = dict(
    n_layer=12,
    n_head=12,
    d_model=768,
    context_length=1024,
    vocab_size=50257,
    norm="layernorm",
    pos="learned",
    mlp="gelu_tanh",
    bias=True,
    tie_embeddings=True,
)


def _llama(d_model: int, n_layer: int, n_head: int, n_kv_head: int | None = None) -> dict[str, Any]:
    # Llama-2 style at TinyStories sizes (llama2.c): RMSNorm, RoPE (HF half-split), SwiGLU, no bias. Tied
    # embeddings as in llama2.c's stories15M/42M/110M, so the names match the parameter counts.
    return dict(
        d_model=d_model,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        norm="rmsnorm",
        pos="rope",
        rope_style="half",
        mlp="swiglu",
        multiple_of=32,
        bias=False,
        tie_embeddings=True,
        context_length=256,
        norm_eps=1e-5,
    )


# the main job's sample starts here: a function signature and docstring, so the model writes Python
MAIN_JOB_PROMPT = 'def read_file(path):\n    """Return the contents of the file at path."""\n'


PRESETS: dict[str, dict[str, Any]] = {
    # the main job: a small GPT on the built-in corpus that trains in a few minutes on 2 CPU cores
    "cpu-small": {
        "model": dict(
            n_layer=4,
            n_head=4,
            d_model=128,
            context_length=128,
            pos="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            tie_embeddings=True,
        ),
        "tokenizer": dict(vocab_size=4096),
        # Tuned with `scratchlm sweep` for the lowest validation loss in 5 minutes on 2 CPU cores
        # (docs/experiments.md, "Tuning the main job"): width 128 beat 192 and 256 at this budget, Muon beat
        # AdamW, and the schedule follows the wall clock, so the cosine ends exactly when the 300 s are up
        # on any machine (max_steps is only an upper bound).
        "train": dict(
            batch_size=16,
            max_steps=100_000,
            max_time=300.0,
            schedule_clock="time",
            optimizer="muon",
            muon_lr=0.02,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=50,
        ),
        "eval": dict(interval=250, batches=10, sample_prompt=MAIN_JOB_PROMPT),
    },
    # seconds-long runs for tests and smoke checks
    "cpu-tiny": {
        "model": dict(n_layer=2, n_head=2, d_model=32, context_length=32),
        "tokenizer": dict(vocab_size=320),
        "train": dict(
            batch_size=4, max_steps=20, warmup_steps=2, log_interval=5, ckpt_interval=10, progress=False
        ),
        "eval": dict(interval=10, batches=2, sample_tokens=16),
    },
    "gpt2": {"model": dict(_GPT2), "tokenizer": dict(kind="gpt2")},
    "gpt2-medium": {
        "model": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
        "tokenizer": dict(kind="gpt2"),
    },
    "llama-15m": {"model": _llama(288, 6, 6), "tokenizer": dict(vocab_size=32000)},
    "llama-42m": {"model": _llama(512, 8, 8), "tokenizer": dict(vocab_size=32000)},
    "llama-110m": {"model": _llama(768, 12, 12), "tokenizer": dict(vocab_size=32000)},
    "llama-gqa-tiny": {"model": _llama(128, 4, 4, n_kv_head=2)},
    # fine-tuning defaults (`scratchlm finetune`): a 10x lower peak lr, a short warmup, no weight decay,
    # frequent evaluations and early stopping once the validation loss stops improving
    "finetune": {
        "train": dict(
            lr=1e-4,
            min_lr=1e-5,
            warmup_steps=10,
            weight_decay=0.0,
            max_steps=300,
            early_stopping_patience=3,
            ckpt_interval=100,
            log_interval=10,
        ),
        "eval": dict(interval=25, batches=10),
    },
    # "Attention Is All You Need" base model: post-LN, sinusoidal positions, shared embeddings
    "transformer-base": {
        "model": dict(
            arch="seq2seq",
            n_layer=6,
            n_head=8,
            d_model=512,
            d_ff=2048,
            pos="sinusoidal",
            norm_position="post",
            mlp="relu",
            dropout=0.1,
            label_smoothing=0.1,
            context_length=256,
        ),
    },
}
