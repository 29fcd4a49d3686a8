"""Fine-tuning from pretrained weights: HF GPT-2 / Llama sources saved with save_pretrained, on Tiny Shakespeare.

Each source is a tiny random transformers model with a BPE tokenizer trained here; the run must start exactly
where the HF model is (the loss of step 1 equals transformers' loss on the same batch), learn, and export
back to a directory transformers loads with the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from scratchlm.cli import main
from scratchlm.config import load_config, load_run_config
from scratchlm.data.loader import TokenLoader
from scratchlm.errors import ConfigError
from scratchlm.pipeline import run
from scratchlm.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    from scratchlm.train import trainer

    monkeypatch.setattr(
        trainer, "_plots", lambda run_dir: None
    )  # matplotlib is slow; plots are tested elsewhere


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory, shared_data):
    """(text file of the first 60k characters of Tiny Shakespeare, a 320-token BPE trained on it)."""
    from scratchlm.tokenizer import train_bpe_from_iterator

    tmp = tmp_path_factory.mktemp("shakespeare")
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    (tmp / "shakespeare.txt").write_text(text, encoding="utf-8")
    tok = train_bpe_from_iterator(
        [text], 320, special_tokens=["<|endoftext|>"], num_workers=1, progress=False
    )
    return tmp / "shakespeare.txt", tok


def hf_source(kind: str, tok, path):
    """A random transformers model of ``kind`` saved with save_pretrained, with the tokenizer beside it."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=tok.vocab_size,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=tok.eot_id,
            eos_token_id=tok.eot_id,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=tok.eot_id,
            eos_token_id=tok.eot_id,
        )
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return model.eval()


def finetune_config(tmp_path, source, data, *extra):
    return load_config(
        overrides=[
            "preset=finetune",
            f"train.init_from={source}",
            f"data.source={data}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "train.lr=5e-3",
            "train.warmup_steps=2",
            "train.batch_size=4",
            "train.log_interval=1",
            "train.device=cpu",
            "train.dtype=float32",
            "train.progress=false",
            "eval.interval=3",
            "eval.batches=2",
            "eval.sample_tokens=8",
            "data.num_workers=1",
            *extra,
        ]
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_finetune_from_hf_starts_at_its_loss_learns_and_exports_back(
    kind, shakespeare, tmp_path, monkeypatch
):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    text, tok = shakespeare
    hf = hf_source(kind, tok, tmp_path / "src")
    cfg = finetune_config(tmp_path, tmp_path / "src", text)
    result = run(cfg, progress=False)
    run_dir = tmp_path / "run"

    # the model config came from the source; the run says where it started
    saved = load_run_config(run_dir)
    assert (saved.model.n_layer, saved.model.d_model, saved.model.context_length) == (2, 32, 64)
    assert saved.model.pos == ("learned" if kind == "gpt2" else "rope")
    record = json.loads((run_dir / "init_from.json").read_text())
    assert record["kind"] == "hf" and record["weights"].endswith("model.safetensors")

    # step 1's loss (before any update) is transformers' loss on the same batch
    loader = TokenLoader(saved.data.data_dir, "train", 4, 64, seed=saved.train.seed)
    x, y = loader.next_batch()
    with torch.no_grad():
        hf_loss = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    assert train[0]["step"] == 1 and abs(train[0]["loss"] - hf_loss) < 1e-4
    assert train[-1]["loss"] < train[0]["loss"] - 0.2  # it learns
    assert result["step"] == 6

    # export -> transformers loads it with the fine-tuned logits
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export"), "--which", "latest"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    from scratchlm.api import load

    lm = load(run_dir, which="latest", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, lm.model(x)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(back(x).logits, hf(x).logits, atol=1e-3)  # and they are not the source's


def test_init_from_refuses_conflicting_overrides_by_name(shakespeare, tmp_path, capsys):
    text, tok = shakespeare
    hf_source("gpt2", tok, tmp_path / "src")
    with pytest.raises(ConfigError, match=r"model\.n_layer=3 conflicts .* model\.n_layer is 2"):
        run(finetune_config(tmp_path, tmp_path / "src", text, "model.n_layer=3"), progress=False)
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size=999 conflicts"):
        run(finetune_config(tmp_path, tmp_path / "src", text, "tokenizer.vocab_size=999"), progress=False)
    # on the command line, an override equal to the default is caught too (n_layer defaults to 4)
    args = [f"train.init_from={tmp_path / 'src'}", f"train.run_dir={tmp_path / 'run'}", "train.device=cpu"]
    assert main(["train", *args, "model.n_layer=4"]) == 2
    assert "error: model.n_layer=4 conflicts" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "src"), str(text), "model.n_layer=4", *args[1:]]) == 2
    assert "error: model.n_layer=4 conflicts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_init_from_bad_sources_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for source, message in [
        (tmp_path / "nope", "no such directory"),
        (tmp_path / "empty", "neither a Hugging Face model directory"),
    ]:
        assert main(["train", f"train.init_from={source}", "train.device=cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_freeze_patterns(shakespeare):
    from scratchlm.config import ModelConfig
    from scratchlm.model import build_model
    from scratchlm.train.init_from import freeze_parameters

    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, context_length=8))
    frozen = freeze_parameters(model, ["wte.*", "blocks.0.*"])
    assert "wte.weight" in frozen and all(n.startswith(("wte", "blocks.0.")) for n in frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "ln_f", "wpe")) for n in trainable)
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze_parameters(model, ["block.*"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        freeze_parameters(model, ["*"])
