"""Instruction tuning end to end: `scratchlm finetune` of a ScratchLM run on chat jsonl, then chat with the
stored template, and a killed-and-resumed fine-tuning run that ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scratchlm.api import load
from scratchlm.cli import main
from scratchlm.config import load_config, save_config
from scratchlm.model import build_model
from scratchlm.pipeline import resume_config, run
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.tokenizer.chat_template import CHATML
from scratchlm.train.checkpoint import find_checkpoint, load_model_state, save_checkpoint
from scratchlm.train.init_from import resolve_source
from scratchlm.train.metrics import read_metrics

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "candle",
    "forest",
    "mirror",
    "silver",
    "garden",
]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    from scratchlm.train import trainer

    monkeypatch.setattr(
        trainer, "_plots", lambda run_dir: None
    )  # matplotlib is slow; plots are tested elsewhere


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A ScratchLM run directory made by hand: config, a BPE tokenizer, one checkpoint of random weights."""
    tmp = tmp_path_factory.mktemp("instruct")
    text = " ".join(f"Repeat {w}: {w} {w}." for w in WORDS) * 10
    tok = train_bpe_from_iterator(
        [text], 300, special_tokens=["<|endoftext|>"], num_workers=1, progress=False
    )
    cfg = load_config(
        overrides=[
            f"model.vocab_size={tok.vocab_size}",
            "model.n_layer=2",
            "model.n_head=2",
            "model.d_model=32",
            "model.context_length=64",
        ]
    )
    src = tmp / "pretrained"
    src.mkdir()
    save_config(cfg, src / "config.yaml")
    tok.save(src / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(src, 1, build_model(cfg.model), {}, {"step": 1}, keep_last=1)
    chat = tmp / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(60):
            w = WORDS[i % len(WORDS)]
            messages = [
                {"role": "user", "content": f"Repeat {w}"},
                {"role": "assistant", "content": f"{w} {w}"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return src, chat


ARGS = [
    "train.max_steps=6",
    "train.lr=5e-3",
    "train.warmup_steps=2",
    "train.batch_size=8",
    "train.log_interval=1",
    "train.ckpt_interval=3",
    "train.deterministic=true",
    "train.device=cpu",
    "train.dtype=float32",
    "train.progress=false",
    "train.freeze=wpe.*",
    "eval.interval=3",
    "eval.batches=2",
    "eval.sample_tokens=8",
    "data.val_fraction=0.2",
]


def test_finetune_on_chat_data_then_chat_and_resume_exactly(source, tmp_path):
    src, chat = source
    run_dir = tmp_path / "run"
    assert main(["finetune", str(src), str(chat), f"train.run_dir={run_dir}", *ARGS]) == 0

    # the chat template is stored with the run's tokenizer; the run records its source
    config = json.loads((run_dir / "tokenizer_config.json").read_text())
    assert config["scratchlm_chat_template"] == "chatml"
    assert json.loads((run_dir / "init_from.json").read_text())["kind"] == "scratchlm"
    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5

    # frozen parameters kept the source's values, the others moved
    final = load_model_state(find_checkpoint(run_dir, "latest"))
    start = load_model_state(find_checkpoint(src, "latest"))
    assert torch.equal(final["wpe.weight"], start["wpe.weight"])
    assert not torch.equal(final["blocks.0.attn.c_q.weight"], start["blocks.0.attn.c_q.weight"])

    # `scratchlm chat` renders the conversation with the stored template
    from scratchlm.inference.chat import ChatSession

    session = ChatSession(load(run_dir, device="cpu").engine, max_new_tokens=4, temperature=0)
    assert session.template is CHATML
    assert (
        session.prompt_for("Repeat tiger")
        == "<|im_start|>user\nRepeat tiger<|im_end|>\n<|im_start|>assistant\n"
    )

    # a run killed after step 3 (its later checkpoint lost) and resumed ends with the same weights, bit for bit
    replay = tmp_path / "replay"
    shutil.copytree(run_dir, replay)
    shutil.rmtree(replay / "checkpoints" / "step_00000006")
    (replay / "checkpoints" / "LATEST").write_text("step_00000003\n")
    cfg = resume_config(replay)
    assert cfg.train.init_from == str(src)
    run(cfg, progress=False)
    resumed = load_model_state(find_checkpoint(replay, "latest"))
    assert find_checkpoint(replay, "latest").name == "step_00000006"
    for name, tensor in final.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_checkpoint_directory_is_a_source_and_chat_needs_one(source, tmp_path, capsys):
    src, chat = source
    ckpt = find_checkpoint(src, "latest")
    resolved = resolve_source(ckpt)
    assert (resolved.kind, resolved.weights, resolved.tokenizer_path) == (
        "scratchlm",
        ckpt,
        src / "tokenizer.json",
    )
    assert resolved.model == load_config(src / "config.yaml").model
    assert main(["train", f"data.source={chat}", "data.format=chat", "train.device=cpu"]) == 2
    assert "data.format=chat fine-tunes a pretrained model" in capsys.readouterr().err
