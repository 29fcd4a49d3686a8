"""Walkthrough shapes and attention maps on a tiny model."""

from __future__ import annotations

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.model import build_model
from scratchlm.viz.walkthrough import format_walkthrough, walkthrough


def _tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, context_length=16, **kw)
    return build_model(cfg)


def test_walkthrough_records_shapes_in_order():
    model = _tiny()
    steps = walkthrough(model, torch.randint(0, 50, (1, 7)))
    by_name = {s.name: s for s in steps}
    assert by_name["wte"].inputs == [(1, 7)] and by_name["wte"].output == (1, 7, 16)
    assert by_name["lm_head"].output == (1, 7, 50)
    assert steps[-1].name == "model" and steps[-1].output == (1, 7, 50)
    names = [s.name for s in steps]
    assert (
        names.index("wte")
        < names.index("blocks.0.attn")
        < names.index("blocks.1.mlp")
        < names.index("lm_head")
    )
    # each parameter counted once (tied embedding included)
    assert sum(s.params for s in steps) == sum(p.numel() for p in model.parameters())
    assert "lm_head" in format_walkthrough(steps)


def test_walkthrough_labels_the_tied_head():
    """A tied lm_head showed 0 parameters with no word why; it now says whose weight it uses."""
    steps = walkthrough(_tiny(), torch.randint(0, 50, (1, 7)))
    by_name = {s.name: s for s in steps}
    assert by_name["lm_head"].params == 0 and by_name["lm_head"].tied_to == "wte"
    (line,) = [x for x in format_walkthrough(steps).splitlines() if x.startswith("lm_head")]
    assert line.endswith("0  (tied to wte)")
    untied = walkthrough(_tiny(tie_embeddings=False), torch.randint(0, 50, (1, 7)))
    head = next(s for s in untied if s.name == "lm_head")
    assert head.params == 50 * 16 and head.tied_to == "" and "tied" not in format_walkthrough(untied)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_attention_maps_are_causal_distributions(pos):
    from scratchlm.viz.plots import attention_maps

    model = _tiny(pos=pos)
    idx = torch.randint(0, 50, (1, 9))
    before = model(idx)[0]
    maps = attention_maps(model, idx)
    assert len(maps) == 2 and maps[0].shape == (2, 9, 9)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 9))
        assert torch.all(torch.triu(m, diagonal=1) == 0)
    # the model's own backend is restored and its output unchanged
    attention = [m for m in model.modules() if hasattr(m, "record")]
    assert len(attention) == 2 and all(a.backend == "sdpa" and a.record is None for a in attention)
    torch.testing.assert_close(model(idx)[0], before)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from scratchlm.viz.plots import attention_maps, plot_attention, plot_positions

    model = _tiny()
    idx = torch.randint(0, 50, (1, 5))
    p1 = plot_positions(16, 32, tmp_path / "pos.png")
    p2 = plot_attention(attention_maps(model, idx), list("abcde"), tmp_path / "att.png")
    assert p1.stat().st_size > 1000 and p2.stat().st_size > 1000
    assert p1.read_bytes()[:4] == b"\x89PNG"
