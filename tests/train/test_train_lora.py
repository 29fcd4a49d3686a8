"""LoRA runs end to end: `scratchlm finetune SRC DATA --lora` from a HF Llama and `scratchlm train` from scratch
(GPT-2 and Llama styles) save adapters only, load merged with the adapted model's logits, export merged to a
directory transformers reads with the same logits, and `--adapters-only` to peft's format that
peft.PeftModel.from_pretrained loads onto the exported base with the same logits. A LoRA run killed with
SIGKILL and resumed ends with the same adapters, bit for bit, as one never stopped."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scratchlm.api import load
from scratchlm.cli import main
from scratchlm.config import load_run_config
from scratchlm.train.adapters import BASE_FILE, adapted_model, is_adapter_key
from scratchlm.train.checkpoint import find_checkpoint, load_model_state
from scratchlm.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.ckpt_interval=2",
    "train.lr=0.02",
    "train.device=cpu",
    "train.dtype=float32",
    "train.progress=false",
    "eval.interval=2",
    "eval.batches=1",
    "eval.sample_tokens=4",
    "data.val_fraction=0.1",
]


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    from scratchlm.train import trainer

    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)  # matplotlib is slow to import


@pytest.fixture(scope="module")
def text(tmp_path_factory, shared_data):
    from scratchlm.tokenizer import train_bpe_from_iterator

    tmp = tmp_path_factory.mktemp("lora-data")
    body = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    (tmp / "text.txt").write_text(body, encoding="utf-8")
    tok = train_bpe_from_iterator(
        [body], 300, special_tokens=["<|endoftext|>"], num_workers=1, progress=False
    )
    return tmp / "text.txt", tok


def ids_for(tok) -> torch.Tensor:
    return torch.tensor([tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")[:24]])


def adapted(run: Path) -> torch.nn.Module:
    ckpt = find_checkpoint(run, "best")
    return adapted_model(load_run_config(run), run, load_model_state(ckpt), ckpt)


def check_exports(run: Path, tmp: Path, tok) -> torch.Tensor:
    """Merged load/export and the peft export all give the adapted model's logits; returns them."""
    ids = ids_for(tok)
    with torch.no_grad():
        expected = adapted(run)(ids)[0]
        assert torch.allclose(load(run, device="cpu").model(ids)[0], expected, atol=1e-5)  # merged
    assert main(["export", str(run), "--out", str(tmp / "merged")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    assert main(["export", str(run), "--adapters-only", "--out", str(tmp / "peft")]) == 0
    (tmp / "base").mkdir()  # the base alone (transformers attaches an adapter_config.json it sees itself)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp / "peft" / name, tmp / "base" / name)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapters = peft.PeftModel.from_pretrained(base, tmp / "peft").eval()
        assert (hf(ids).logits - expected).abs().max() < 1e-4
        assert (with_adapters(ids).logits - expected).abs().max() < 1e-4
    assert (base_logits - expected).abs().max() > 1e-3  # the adapters did change the model
    return base_logits


def test_finetune_lora_from_a_hf_llama(text, tmp_path):
    data, tok = text
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    src = tmp_path / "src"
    source = transformers.LlamaForCausalLM(config).eval()
    source.save_pretrained(src)
    tok.save(src / "tokenizer.json")
    run = tmp_path / "run"
    args = ["finetune", str(src), str(data), *TINY, f"train.run_dir={run}", "train.lora.rank=4"]
    assert main([*args, "train.lora.targets=*.attn.*,*.mlp.*", "--lora"]) == 0  # (flags after overrides)
    cfg = load_run_config(run)
    assert cfg.train.lora.rank == 4 and cfg.train.init_from == str(src)
    ckpt = find_checkpoint(run)
    saved = load_model_state(ckpt)
    assert saved and all(is_adapter_key(k) for k in saved)  # adapters only
    assert len(saved) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
    assert json.loads((ckpt / "state.json").read_text())["lora_base"]["kind"] == "init_from"
    assert not (run / BASE_FILE).exists()
    base_logits = check_exports(run, tmp_path, tok)
    with torch.no_grad():  # the exported base is the source, untouched
        assert (source(ids_for(tok)).logits - base_logits).abs().max() < 1e-5


@pytest.mark.parametrize("style", ["gpt2-tied", "llama-interleaved"])
def test_lora_from_scratch_keeps_its_base_in_the_run(style, text, tmp_path):
    data, tok = text
    model = (
        ["model.pos=learned", "model.norm=layernorm", "model.mlp=gelu_tanh", "model.tie_embeddings=true"]
        if style == "gpt2-tied"
        else ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false"]
        + ["model.rope_style=interleaved", "model.tie_embeddings=false"]
    )
    tok.save(tmp_path / "tok.json")
    run = tmp_path / "run"
    args = ["train", "preset=cpu-tiny", f"data.source={data}", f"tokenizer.path={tmp_path / 'tok.json'}"]
    lora = ["train.lora.rank=2", "train.lora.alpha=4", "train.lora.targets=*.attn.c_q,*.attn.c_v,*.mlp.c_fc"]
    assert main([*args, *TINY, *model, *lora, f"train.run_dir={run}"]) == 0
    assert (run / BASE_FILE).is_file()
    state = json.loads((find_checkpoint(run) / "state.json").read_text())
    assert state["lora_base"] == {"kind": "run", "path": BASE_FILE}
    check_exports(run, tmp_path, tok)


# ----------------------------------------------------------------------------------------------------------
# exact resume (the pattern of test_train_resume.py, with adapters and dropout in them)

CHILD = Path(__file__).with_name("train_child.py")
OVERRIDES = [
    "train.max_steps=20",
    "train.ckpt_interval=5",
    "train.log_interval=1",
    "eval.interval=10",
    "train.deterministic=true",
    "data.loader=sequential",
    "model.dropout=0.1",
    "train.keep_last=3",
    "train.lr=0.01",
    "train.lora.rank=4",
    "train.lora.dropout=0.1",
    "train.lora.targets=*.attn.*,*.mlp.c_fc",
]


def run_child(run_dir: Path, data_dir: Path, stop_at: int | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(run_dir), str(data_dir), *OVERRIDES],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if stop_at is not None:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
            if steps and steps[-1] >= stop_at and (run_dir / "checkpoints" / "LATEST").exists():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_lora_stop_and_resume_in_process_is_bit_exact(tmp_path):
    """Fast twin of the SIGKILL test: 4 steps, then the same run resumed to 8, equals 8 steps straight."""
    from train_helpers import ByteTokenizer, make_data, tiny_config

    from scratchlm.train import trainer

    data_dir = make_data(tmp_path, chars=6_000)
    lora = ["train.lora.rank=2", "train.lora.dropout=0.2", "model.dropout=0.1", "train.schedule=constant"]
    lora += ["train.deterministic=true", "train.lr=0.01", "train.ckpt_interval=100", "eval.interval=100"]

    def train(run, steps):
        cfg = tiny_config(run, data_dir, *lora, f"train.max_steps={steps}")
        return trainer.train_model(cfg, run, ByteTokenizer(), data_dir)

    train(tmp_path / "straight", 8)
    train(tmp_path / "resumed", 4)
    assert train(tmp_path / "resumed", 8)["step"] == 8
    ref, got = (load_model_state(find_checkpoint(tmp_path / r)) for r in ("straight", "resumed"))
    assert ref.keys() == got.keys() and all(is_adapter_key(k) for k in ref)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_lora_sigkill_then_resume_is_bit_exact(tmp_path):
    from train_helpers import make_data

    data_dir = make_data(tmp_path, chars=6_000, shard_tokens=2_000)
    reference = tmp_path / "reference"
    rc, _, err = run_child(reference, data_dir)
    assert rc == 0, err
    run = tmp_path / "run"
    stop_at = random.Random().randint(6, 16)
    rc, _, err = run_child(run, data_dir, stop_at=stop_at)
    assert rc == -signal.SIGKILL, f"finished before the kill at step {stop_at}: {err[-500:]}"
    rc, out, err = run_child(run, data_dir)
    assert rc == 0, err
    assert "resumed from" in out
    ref, got = (load_model_state(find_checkpoint(r, "latest")) for r in (reference, run))
    assert ref.keys() == got.keys() and all(is_adapter_key(k) for k in ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert any(ref[k].abs().sum() > 0 for k in ref if ".lora_B." in k)  # B moved away from zero
    losses = [
        {r["step"]: r["loss"] for r in read_metrics(d) if r.get("kind") == "train"} for d in (reference, run)
    ]
    assert losses[0] == losses[1]
    base = "lora_base.safetensors"  # and the frozen base is the same
    assert (reference / base).read_bytes() == (run / base).read_bytes()
