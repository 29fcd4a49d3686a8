"""model.attention=auto: sdpa on the CPU; on a GPU the backend with the shorter measured time."""

from __future__ import annotations

import pytest
import torch

from scratchlm.config import ModelConfig, load_config
from scratchlm.errors import ConfigError
from scratchlm.model import attention_choice, build_model


def test_auto_is_sdpa_on_cpu_and_other_values_are_kept():
    cfg = ModelConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, d_model=16, attention="auto")
    assert attention_choice.resolve_attention(cfg, 4, torch.device("cpu"), torch.float32).attention == "sdpa"
    manual = ModelConfig(attention="manual")
    assert attention_choice.resolve_attention(manual, 4, torch.device("cuda"), torch.bfloat16) is manual


@pytest.mark.parametrize(
    "times,winner",
    [({"sdpa": 2.0, "flash_triton": 1.0}, "flash_triton"), ({"sdpa": 1.0, "flash_triton": 1.5}, "sdpa")],
)
def test_auto_on_a_gpu_takes_the_faster_measured_backend(monkeypatch, capsys, times, winner):
    cfg = ModelConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, d_model=16, attention="auto")
    seen = {}
    monkeypatch.setattr(
        attention_choice, "attention_timings", lambda c, b, d, t: seen.update(b=b, t=t) or times
    )
    out = attention_choice.resolve_attention(cfg, 4, torch.device("cuda"), torch.bfloat16)
    assert out.attention == winner and seen == {"b": 4, "t": torch.bfloat16}
    assert winner in capsys.readouterr().out


def test_auto_is_a_valid_choice_and_an_unresolved_auto_model_runs_sdpa():
    cfg = load_config(None, ["model.attention=auto"])
    assert cfg.model.attention == "auto"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=fastest"])
    small = ModelConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, d_model=16)
    torch.manual_seed(0)
    a = build_model(small)
    b = build_model(ModelConfig(**{**small.__dict__, "attention": "auto"}))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(b(x)[0], a(x)[0])
