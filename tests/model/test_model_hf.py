"""HF parity both ways: transformers GPT2LMHeadModel / LlamaForCausalLM <-> ScratchLM GPT (fp32, random weights)."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.model import build_model
from scratchlm.model.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False, multiple_of=16)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=100, d_model=32, n_head=4, n_layer=2, context_length=32), **kw})
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that any mix-up shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def ids():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def hf_gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **kw
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        **kw,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


@pytest.mark.parametrize(
    "make_hf, mlp",
    [
        (hf_gpt2, "gelu_tanh"),
        # large weights: pre-activations of order 1, where exact and tanh GELU differ (by ~3e-3 in the logits)
        (lambda: hf_gpt2(activation_function="gelu", initializer_range=0.5), "gelu"),
        (lambda: hf_gpt2(activation_function="gelu_pytorch_tanh"), "gelu_tanh"),
        (hf_llama, "swiglu"),
    ],
    ids=["gpt2", "gpt2-exact-gelu", "gpt2-pytorch-tanh", "llama-gqa"],
)
def test_import_hf_gives_the_same_logits(make_hf, mlp, tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    model, cfg = import_hf(tmp_path)
    assert cfg.mlp == mlp
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], hf(ids()).logits, atol=1e-5, rtol=1e-5)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


def test_import_llama_keeps_its_architecture(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    _, cfg = import_hf(tmp_path)
    assert (cfg.n_kv_head, cfg.d_ff, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (
        2,
        80,
        500.0,
        1e-6,
        False,
    )


@pytest.mark.parametrize(
    "variant",
    ["gpt2", "gpt2-exact-gelu", "gpt2-untied", "gpt2-no-bias", "llama-gqa", "llama-interleaved-tied"],
)
def test_export_hf_loads_in_transformers_with_the_same_logits(variant, tmp_path):
    kw = {
        "gpt2": {},
        "gpt2-exact-gelu": dict(mlp="gelu", init_std=0.5),  # pre-activations of order 1 (see above)
        "gpt2-untied": dict(tie_embeddings=False),
        "gpt2-no-bias": dict(bias=False),  # GPT-2 always has biases: written as zeros, logits unchanged
        "llama-gqa": dict(LLAMA, n_kv_head=2),
        "llama-interleaved-tied": dict(LLAMA, rope_style="interleaved", tie_embeddings=True),
    }[variant]
    model = tiny(**kw)
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expected_cls = "GPT2LMHeadModel" if variant.startswith("gpt2") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_cls
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, model(ids())[0], atol=1e-5, rtol=1e-5)
    back, _ = import_hf(tmp_path)  # and the round trip
    if variant == "gpt2-no-bias":  # comes back with (zero) biases
        assert all(not b.any() for n, b in back.state_dict().items() if n.endswith("bias"))
    elif variant != "llama-interleaved-tied":  # re-imported as rope_style=half: same logits, permuted weights
        assert back.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(back(ids())[0], model(ids())[0], atol=1e-5, rtol=1e-5)


def test_export_writes_the_tokenizer_and_its_eot(tmp_path):
    class FakeTokenizer:
        eot_id = 7

        def save(self, path):
            path.write_text('{"model": {}}')

    export_hf(tiny(), tmp_path, tokenizer=FakeTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == 7 and (tmp_path / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 7 and "stop_strings" not in generation  # not chat-tuned


def test_unsupported_models_and_directories_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="export"):
        export_hf(tiny(pos="sinusoidal"), tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not supported"):
        import_hf(tmp_path)


def test_import_old_style_gpt2_directory(tmp_path):
    """Original GPT-2 uploads: pytorch_model.bin, keys without "transformer.", causal-mask buffers included."""
    hf = hf_gpt2()
    hf.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model, _ = import_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], hf(ids()).logits, atol=1e-5, rtol=1e-5)


def test_weights_that_do_not_fit_the_config_raise_checkpoint_error(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(CheckpointError, match="do not match"):
        import_hf(tmp_path)
