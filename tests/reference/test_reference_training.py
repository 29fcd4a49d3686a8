"""50 training steps through the hand-written pieces give the fast path's losses (CPU, fp32, the real trainer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import scratchlm.train.trainer as trainer
from scratchlm.model import build_model
from scratchlm.reference.modules import Embedding, Linear
from scratchlm.train.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import ByteTokenizer, make_data, tiny_config  # noqa: E402

STEPS = 50
GPT2 = ["model.mlp=gelu_tanh"]
LLAMA = [
    "model.pos=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.tie_embeddings=false",
    "model.multiple_of=16",
    "model.label_smoothing=0.1",
]


def _losses(tmp_path, data_dir, name, *overrides) -> list[float]:
    run_dir = tmp_path / name
    cfg = tiny_config(
        run_dir,
        data_dir,
        f"train.max_steps={STEPS}",
        "train.log_interval=1",
        f"train.ckpt_interval={STEPS}",
        f"eval.interval={STEPS}",
        "train.grad_clip=0.5",
        *overrides,
    )
    trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize(
    "arch, optimizer",
    [(GPT2, "adamw"), (LLAMA, "adamw"), (LLAMA, "muon")],
    ids=["gpt2-adamw", "llama-gqa-adamw", "llama-gqa-muon"],
)
def test_reference_training_matches_the_fast_path(tmp_path, monkeypatch, one_thread, arch, optimizer):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)
    data_dir = make_data(tmp_path, chars=20_000)
    fast = _losses(tmp_path, data_dir, "fast", *arch, f"train.optimizer={optimizer}")
    slow = _losses(
        tmp_path,
        data_dir,
        "reference",
        *arch,
        "model.impl=reference",
        f"train.optimizer={optimizer}_reference",
    )
    assert len(fast) == len(slow) == STEPS
    assert fast[-1] < fast[0] - 0.5  # it learned something, so the comparison means something
    # AdamW: the same losses to fp32 rounding (measured: 3e-7 relative at most). Muon orthogonalises in
    # bf16, where a last-bit difference in a gradient can flip a bf16 rounding (measured: 2e-4).
    assert slow == pytest.approx(fast, rel=1e-6 if optimizer == "adamw" else 1e-3)


def test_reference_model_is_the_same_model():
    cfg = tiny_config(Path("unused"), Path("unused"), *LLAMA, "model.impl=reference").model
    model = build_model(cfg)
    kinds = {type(m) for m in model.modules()}
    assert Linear in kinds and Embedding in kinds
    assert all(
        getattr(m, "ops", None) is None or m.ops.__name__ == "scratchlm.reference.functional"
        for m in model.modules()
    )
    fast = build_model(type(cfg)(**{**cfg.__dict__, "impl": "fast"}))
    assert fast.state_dict().keys() == model.state_dict().keys()
