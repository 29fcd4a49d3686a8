"""docs/walkthrough.ipynb executes from top to bottom, and its committed outputs are the ones a fresh run
prints and draws (so what a reader sees on the repository page is current)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "docs" / "walkthrough.ipynb"


def _outputs(nb) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def test_walkthrough_notebook_executes_and_its_committed_outputs_are_current():
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from scratchlm.viz.notebook import REGENERATE, execute, stale_cells

    committed = nbformat.read(NOTEBOOK, as_version=4)
    fresh = execute(NOTEBOOK)
    text = "".join(o.get("text", "") for o in _outputs(fresh))
    # every head of every layer, and the three attention kinds of the encoder-decoder, recomputed by formula
    for name in ("blocks.0.attn head 1", "blocks.1.attn head 0", "blocks.1.attn head 1"):
        assert f"{name}: attention weights" in text
    for kind in ("encoder self-attention", "decoder causal self-attention", "cross-attention"):
        assert f"== {kind}" in text
    assert "decoder.0.cross_attn: weights (2, 6, 7), mask none" in text  # (H, T, S): target x source
    assert sum("image/png" in o.get("data", {}) for o in _outputs(fresh)) == 5  # 2 GPT layers + 3 kinds
    problems = stale_cells(committed, fresh)
    assert not problems, f"{NOTEBOOK.name} is stale: {'; '.join(problems)}. Regenerate: {REGENERATE}"


def test_stale_outputs_are_detected():
    nbformat = pytest.importorskip("nbformat")
    from scratchlm.viz.notebook import same_text, stale_cells

    assert same_text(
        "max difference 2e-07\ntensor([0.164, 0.836])", "max difference 0e+00\ntensor([0.165, 0.836])"
    )
    assert not same_text("tensor([0.164, 0.836])", "tensor([0.170, 0.836])")
    assert not same_text("layer 0 head 1", "layer 0 head 2 ")
    committed = nbformat.read(NOTEBOOK, as_version=4)
    changed = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in changed.cells if c.cell_type == "code" and c.outputs and "text" in c.outputs[0])
    cell.outputs[0]["text"] = cell.outputs[0]["text"].replace("the", "then", 1)
    assert stale_cells(committed, committed) == []
    assert len(stale_cells(changed, committed)) == 1
    empty = nbformat.read(NOTEBOOK, as_version=4)
    for c in empty.cells:
        if c.cell_type == "code":
            c.outputs = []
    assert stale_cells(empty, committed)[0].endswith("has no committed output")
