"""model.attention=auto: sdpa on the CPU; on a GPU the backend with the shortest measured time.

model.attention=sdpa_cudnn: SDPA asked for cuDNN's kernel first; where cuDNN cannot serve (here, a CPU) the
same results as sdpa, traced by torch.compile without a graph break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

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
    [
        ({"sdpa": 2.0, "sdpa_cudnn": 1.8, "flash_triton": 1.0}, "flash_triton"),
        ({"sdpa": 1.0, "sdpa_cudnn": 1.2, "flash_triton": 1.5}, "sdpa"),
        ({"sdpa": 2.0, "sdpa_cudnn": 1.1, "flash_triton": 1.5}, "sdpa_cudnn"),
    ],
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


def test_sdpa_cudnn_puts_cudnn_first_inside_the_call_and_restores_the_order(monkeypatch):
    model = build_model(ModelConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, d_model=16,
                                    attention="sdpa_cudnn"))  # fmt: skip
    before = _cur_sdpa_kernel_backends(with_priority=True)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(_cur_sdpa_kernel_backends(with_priority=True))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(torch.randint(0, 32, (2, 8)))
    assert seen and all(
        order[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] for order in seen
    )
    assert _cur_sdpa_kernel_backends(with_priority=True) == before


def test_sdpa_cudnn_equals_sdpa_on_the_cpu_eager_and_compiled():
    small = dict(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32)
    torch.manual_seed(0)
    ref = build_model(ModelConfig(**small))
    model = build_model(ModelConfig(**small, attention="sdpa_cudnn"))
    model.load_state_dict(ref.state_dict())
    x, y = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    loss_ref = ref(x, y)[1]
    loss_ref.backward()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fails on a graph break
    for fwd in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = fwd(x, y)[1]
        loss.backward()
        torch.testing.assert_close(loss, loss_ref)
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


def test_a_candidate_that_fails_at_the_shape_is_left_out(monkeypatch, capsys):
    """attention_timings on the CPU with the timer stubbed: sdpa_cudnn raising is skipped, sdpa is kept."""
    cfg = ModelConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, d_model=16)
    calls = iter([1.5, RuntimeError("cuDNN Frontend error: no valid engine configs\nmore")])

    def fake_time(fn):
        fn()  # the candidate really runs (forward and backward on the CPU)
        result = next(calls)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(attention_choice, "_time_ms", fake_time)
    timings = attention_choice.attention_timings(cfg, 2, torch.device("cpu"), torch.float32)
    assert timings == {"sdpa": 1.5}
    assert "sdpa_cudnn left out (RuntimeError: cuDNN Frontend error: no valid engine configs)" in (
        capsys.readouterr().out
    )
    monkeypatch.setattr(attention_choice, "_time_ms", lambda fn: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):  # plain sdpa failing is an error, not a silent choice
        attention_choice.attention_timings(cfg, 2, torch.device("cpu"), torch.float32)
