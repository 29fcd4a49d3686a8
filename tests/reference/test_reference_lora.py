"""LoRA: the hand-written layer (scratchlm.reference.lora) and the training layer (scratchlm.train.adapters)
both equal peft's LoraModel on the same model and weights: outputs, gradients of A and B, dropout-free
training steps, and the merged weight W + (alpha/r) B A (peft's merge_and_unload)."""

from __future__ import annotations

import pytest
import torch

from scratchlm.config import LoRAConfig, ModelConfig
from scratchlm.errors import ConfigError
from scratchlm.model import build_model
from scratchlm.reference import lora as ref_lora
from scratchlm.train.adapters import (
    LoRALinear,
    adapted_layers,
    add_lora,
    lora_state,
    merge_lora,
    trainable_parameters,
)

peft = pytest.importorskip("peft")

STYLES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu_tanh", bias=True),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False),
}
TARGETS = ["*.attn.c_q", "*.attn.c_v", "*.mlp.c_fc"]


def tiny(style: str, impl: str = "fast", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97,
        n_layer=2,
        n_head=2,
        d_model=32,
        context_length=16,
        impl=impl,
        **{**STYLES[style], **kw},
    )
    return build_model(cfg)


def with_peft(model: torch.nn.Module, names: list[str], lc: LoRAConfig) -> torch.nn.Module:
    config = peft.LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=names)
    return peft.inject_adapter_in_model(config, model)  # in place


def copy_adapters_to_peft(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """peft names A as '<module>.lora_A.default.weight'; ours '<module>.lora_A.weight'."""
    sd = theirs.state_dict()
    with torch.no_grad():
        for name, t in lora_state(ours.state_dict()).items():
            key = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            sd[key].copy_(t)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_lora_equals_peft_outputs_and_gradients(style, impl):
    lc = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    model = tiny(style, impl)
    names = add_lora(model, lc)
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.c_q", "attn.c_v", "mlp.c_fc")]
    layer_type = ref_lora.LoRALinear if impl == "reference" else LoRALinear
    assert all(type(m) is layer_type for m in adapted_layers(model).values())
    base = tiny(style, impl)
    theirs = with_peft(base, names, lc)
    with torch.no_grad():  # B is zero at init: make the update non-trivial
        for layer in adapted_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    # A is initialised as peft does (Kaiming-uniform from the same generator); B = 0 before the change above
    copy_adapters_to_peft(model, theirs)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    logits, loss = model(ids, ids)
    logits_p, loss_p = theirs(ids, ids)
    assert torch.allclose(logits, logits_p, atol=1e-5, rtol=1e-5)
    loss.backward()
    loss_p.backward()
    grads_p = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(ours) == len(grads_p) == 12  # only A and B train, in both
    for name, g in ours.items():
        key = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.allclose(g, grads_p[key], atol=1e-5, rtol=1e-4), name


def test_the_adapted_model_starts_equal_to_its_base_and_a_is_initialised_as_peft_does():
    """B = 0, so the adapted model computes its base exactly; A ~ U(-1/sqrt(in), 1/sqrt(in)) as peft's
    Kaiming-uniform(a=sqrt(5)) (peft draws from the generator in another order, so compare the law)."""
    lc = LoRAConfig(rank=8, alpha=8.0, targets=["*.mlp.c_proj"])
    model, base = tiny("llama"), tiny("llama")
    add_lora(model, lc)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=8, lora_alpha=8.0, target_modules=list(adapted_layers(model))), tiny("llama")
    )
    a_ours = model.blocks[0].mlp.c_proj.lora_A.weight.detach()
    a_peft = theirs.blocks[0].mlp.c_proj.lora_A["default"].weight.detach()
    bound = 1 / a_ours.shape[1] ** 0.5
    for a in (a_ours, a_peft):
        assert a.abs().max() <= bound and abs(a.std() - bound / 3**0.5) < 0.15 * bound
    ids = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(ids)[0], base(ids)[0])


def test_merge_equals_peft_merge_and_the_formula():
    lc = LoRAConfig(rank=3, alpha=6.0, targets=["*.attn.*", "*.mlp.*", "lm_head"])
    model = tiny("llama")
    add_lora(model, lc)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    theirs = with_peft(tiny("llama"), list(adapted_layers(model)), lc)
    copy_adapters_to_peft(model, theirs)
    ids = torch.randint(0, 97, (2, 16))
    before = model(ids)[0]
    layer = model.blocks[1].mlp.c_proj
    expected = layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # W + (alpha / r) B A
    for m in theirs.modules():  # peft's merge: base_layer.weight += scaling * B A
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.merge()
    merged_peft = {
        k.replace(".base_layer.", "."): v for k, v in theirs.state_dict().items() if "lora_" not in k
    }
    merge_lora(model)
    assert type(model.blocks[1].mlp.c_proj) is torch.nn.Linear and not lora_state(model.state_dict())
    assert torch.allclose(model.blocks[1].mlp.c_proj.weight, expected, atol=1e-6)
    assert set(model.state_dict()) == set(tiny("llama").state_dict())  # the base's names exactly
    assert merged_peft.keys() == model.state_dict().keys()
    for name, w in merged_peft.items():
        assert torch.allclose(model.state_dict()[name], w, atol=1e-6), name
    assert torch.allclose(model(ids)[0], before, atol=1e-5)


def test_reference_function_equals_the_training_layer_with_dropout():
    torch.manual_seed(0)
    x, W, b = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    A, B = torch.randn(3, 8), torch.randn(6, 3)
    layer = torch.nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    add_lora(torch.nn.ModuleDict({"l": layer}), LoRAConfig(rank=3, alpha=5.0, dropout=0.0, targets=["l"]))
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    expected = x @ W.T + b + 5.0 / 3 * (x @ A.T) @ B.T
    assert torch.allclose(ref_lora.lora_linear(x, W, b, A, B, 5.0), expected, atol=1e-5)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # dropout acts on the adapter's input only (the base sees x): replay the same mask
    from scratchlm.reference import functional

    torch.manual_seed(3)
    got = ref_lora.lora_linear(x, W, b, A, B, 5.0, dropout_p=0.5)
    torch.manual_seed(3)
    xd = functional.dropout(x, 0.5)
    assert not torch.equal(xd, x)
    assert torch.allclose(got, x @ W.T + b + 5.0 / 3 * (xd @ A.T) @ B.T, atol=1e-5)


def test_only_adapters_train_and_bad_targets_are_one_error():
    model = tiny("gpt2")
    add_lora(model, LoRAConfig(rank=2, targets=["*.attn.c_q"]))
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 2 * (32 + 32)  # 2 layers x r * (in + out)
    assert total == trainable + sum(p.numel() for p in tiny("gpt2").parameters())
    with pytest.raises(ConfigError, match=r"'\*\.atn\.c_q' matches no linear layer"):
        add_lora(tiny("gpt2"), LoRAConfig(rank=2, targets=["*.atn.c_q"]))
    with pytest.raises(ConfigError, match="tied to the embedding"):
        add_lora(tiny("gpt2"), LoRAConfig(rank=2, targets=["lm_head"]))


def test_seq2seq_encoder_decoder_and_cross_attention_get_adapters():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="seq2seq", vocab_size=50, n_layer=1, n_head=2, d_model=16, context_length=16)
    model = build_model(cfg)
    names = add_lora(model, LoRAConfig(rank=2, targets=["*attn.c_q", "*attn.c_v"]))
    assert names == [
        "encoder.0.attn.c_q",
        "encoder.0.attn.c_v",
        "decoder.0.attn.c_q",
        "decoder.0.attn.c_v",
        "decoder.0.cross_attn.c_q",
        "decoder.0.cross_attn.c_v",
    ]
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    model.eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 5))
    before = model(src, tgt)[0]
    merge_lora(model)
    assert torch.allclose(model(src, tgt)[0], before, atol=1e-5)
