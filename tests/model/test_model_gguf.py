"""GGUF export: a numpy forward pass over the tensors read back with the gguf package (llama.cpp's
conventions: adjacent-pair RoPE, fused GPT-2 qkv, (out, in) matrices) equals ScratchLM's logits for a
Llama-style and a GPT-2-style model, the tokenizer tables round-trip, q8_0 stays close, and what GGUF cannot
express is a one-line error. The slow test runs llama.cpp itself (llama-cpp-python, built from PyPI)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError
from scratchlm.model import build_model
from scratchlm.model.gguf import export_gguf
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.tokenizer.chat_template import CHATML, PLAIN
from scratchlm.tokenizer.hf_format import bytes_to_str

gguf = pytest.importorskip("gguf")

TEXTS = ["def main():\n    return 0\n", "hello world, hello there", "naïve café ü 123"] * 4

LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False)
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu_tanh", bias=True)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_iterator(TEXTS, vocab_size=300, progress=False)


def make(tok, style: dict, **kw):
    torch.manual_seed(0)
    sizes = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, context_length=32)
    cfg = ModelConfig(**{**sizes, **style, **kw})
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "ln" in name else p.normal_(0, 0.1)
    return model


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata fields, name -> float64 array in numpy (out, in) order) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    arrays = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        arrays[t.name] = np.asarray(data, dtype=np.float64).reshape([int(d) for d in reversed(t.shape)])
    return reader.fields, arrays


def field(fields, key):
    f = fields[key]
    if len(f.data) == 1:
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]
    return [
        bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
        for i in f.data
    ]


def numpy_forward(fields, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits (T, V) of llama.cpp's llama or gpt2 graph, written out in float64 numpy."""
    arch = field(fields, "general.architecture")
    n_layer = int(field(fields, f"{arch}.block_count"))
    H = int(field(fields, f"{arch}.attention.head_count"))
    T = len(ids)
    x = w["token_embd.weight"][ids]  # (T, C)
    C = x.shape[1]
    D = C // H
    if arch == "gpt2":
        eps = float(field(fields, "gpt2.attention.layer_norm_epsilon"))
        x = x + w["position_embd.weight"][:T]

        def norm(v, name):
            mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
            return (v - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]
    else:
        eps = float(field(fields, "llama.attention.layer_norm_rms_epsilon"))
        Hkv = int(field(fields, "llama.attention.head_count_kv"))
        base = float(field(fields, "llama.rope.freq_base"))

        def norm(v, name):
            return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w[name + ".weight"]

        def rope(v):  # (T, h, D), adjacent pairs (2i, 2i+1) rotated by pos * base^(-2i/D)
            theta = np.arange(T)[:, None] * base ** (-np.arange(0, D, 2) / D)[None]  # (T, D/2)
            cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
            a, b = v[..., 0::2], v[..., 1::2]
            out = np.empty_like(v)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return out

    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm")
        if arch == "gpt2":
            qkv = h @ w[p + "attn_qkv.weight"].T + w[p + "attn_qkv.bias"]
            q, k, v = (a.reshape(T, H, D) for a in np.split(qkv, 3, axis=-1))
        else:
            q = rope((h @ w[p + "attn_q.weight"].T).reshape(T, H, D))
            k = rope((h @ w[p + "attn_k.weight"].T).reshape(T, Hkv, D)).repeat(H // Hkv, axis=1)
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, Hkv, D).repeat(H // Hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        att = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, C)
        x = x + att @ w[p + "attn_output.weight"].T + w.get(p + "attn_output.bias", 0)
        h = norm(x, p + "ffn_norm")
        if arch == "gpt2":
            u = h @ w[p + "ffn_up.weight"].T + w[p + "ffn_up.bias"]
            u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
            x = x + u @ w[p + "ffn_down.weight"].T + w[p + "ffn_down.bias"]
        else:
            g = h @ w[p + "ffn_gate.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    return norm(x, "output_norm") @ w.get("output.weight", w["token_embd.weight"]).T  # llama.cpp's fallback


IDS_TEXT = "def main():\n    return hello 123"


@pytest.mark.parametrize("style", ["llama", "llama-interleaved", "llama-tied", "gpt2", "gpt2-no-bias"])
def test_numpy_forward_over_the_gguf_tensors_equals_scratchlm(tmp_path, tok, style):
    kw = {"rope_style": "interleaved"} if style == "llama-interleaved" else {}
    kw |= {"tie_embeddings": True} if style == "llama-tied" else {}
    kw |= {"bias": False} if style == "gpt2-no-bias" else {}
    model = make(tok, GPT2 if style.startswith("gpt2") else LLAMA, **kw)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    fields, w = read(path)
    assert field(fields, "general.architecture") == ("gpt2" if style.startswith("gpt2") else "llama")
    # a tied head is written once (token_embd); llama.cpp falls back to it for the output
    assert ("output.weight" in w) == (not model.config.tie_embeddings)
    if style == "gpt2-no-bias":  # llama.cpp's gpt2 graph needs biases: zeros, which change nothing
        assert not w["blk.0.attn_qkv.bias"].any() and not w["output_norm.bias"].any()
    ids = tok.encode(IDS_TEXT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].double().numpy()
    got = numpy_forward(fields, w, ids)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("style", ["llama", "llama-tied", "gpt2"])
def test_transformers_reads_the_gguf_file_as_scratchlm_computes(tmp_path, tok, style):
    """An independent reader of GGUF: transformers' loader (it undoes llama.cpp's RoPE row order and splits
    GPT-2's fused qkv itself) gives the same logits, and its GGUF tokenizer the same token ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    model = make(
        tok, GPT2 if style == "gpt2" else LLAMA, **({"tie_embeddings": True} if "tied" in style else {})
    )
    export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    # transformers maps gguf's context_length to n_ctx only; GPT-2's position table needs n_positions
    extra = {"n_positions": model.config.context_length} if style == "gpt2" else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", **extra).eval()
    ids = tok.encode(IDS_TEXT)
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = IDS_TEXT + " naïve café ü<|endoftext|>"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, allowed_special="all")


def test_q8_0_and_f16_stay_close(tmp_path, tok):
    model = make(tok, LLAMA)
    ids = tok.encode(IDS_TEXT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].double().numpy()
    for dtype, tol in (("f16", 2e-3), ("q8_0", 5e-2)):  # relative to the logits' spread
        fields, w = read(export_gguf(model, tok, tmp_path / f"{dtype}.gguf", dtype=dtype))
        err = np.abs(numpy_forward(fields, w, ids) - ref).max() / ref.std()
        assert err < tol, (dtype, err)
        assert (np.argmax(numpy_forward(fields, w, ids), -1) == np.argmax(ref, -1)).mean() > 0.9
    reader = gguf.GGUFReader(str(tmp_path / "q8_0.gguf"))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32


def test_tokenizer_tables(tmp_path, tok):
    fields, _ = read(export_gguf(make(tok, GPT2), tok, tmp_path / "m.gguf", dtype="f32"))
    assert field(fields, "tokenizer.ggml.model") == "gpt2" and field(fields, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(fields, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size
    assert (
        tokens[tok.eot_id] == "<|endoftext|>" and field(fields, "tokenizer.ggml.token_type")[tok.eot_id] == 3
    )
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == bytes_to_str(b" ") == "Ġ"
    merges = field(fields, "tokenizer.ggml.merges")
    assert len(merges) == len(tok.merges)
    a, b = tok.merges[0]
    assert merges[0] == f"{bytes_to_str(tok.decode_bytes([a]))} {bytes_to_str(tok.decode_bytes([b]))}"
    assert int(field(fields, "tokenizer.ggml.eos_token_id")) == tok.eot_id
    assert int(field(fields, "tokenizer.ggml.eot_token_id")) == tok.eot_id
    assert field(fields, "tokenizer.chat_template") == PLAIN.jinja  # what `scratchlm chat` uses for it


def test_a_chat_tuned_tokenizer_carries_its_template(tmp_path, tok):
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = "chatml"
    fields, _ = read(export_gguf(make(tok, LLAMA), chat_tok, tmp_path / "m.gguf", dtype="f32"))
    assert field(fields, "tokenizer.chat_template") == CHATML.jinja
    assert "<|im_start|>" in CHATML.jinja  # how llama.cpp recognises ChatML among its built-in templates


def test_what_gguf_cannot_express_is_one_error(tmp_path, tok):
    with pytest.raises(ConfigError, match="post-LN|norm_position=post"):
        export_gguf(make(tok, LLAMA, norm_position="post"), tok, tmp_path / "a.gguf")
    seq2seq = build_model(
        ModelConfig(
            arch="seq2seq", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=16
        )
    )
    with pytest.raises(ConfigError, match="encoder-decoder"):
        export_gguf(seq2seq, tok, tmp_path / "b.gguf")
    with pytest.raises(ConfigError, match="--dtype"):
        export_gguf(make(tok, LLAMA), tok, tmp_path / "c.gguf", dtype="q4")
    with pytest.raises(ConfigError, match="mlp=gelu,"):  # llama.cpp's gpt2 has only the tanh GELU
        export_gguf(make(tok, dict(GPT2, mlp="gelu")), tok, tmp_path / "d.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _run_dir(tmp_path, model, tok):
    from scratchlm.config import Config, save_config
    from scratchlm.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(model=model.config), run / "config.yaml")
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, 1, model, {}, {"step": 1}, keep_last=1)
    return run


def test_cli_export_gguf(tmp_path, tok, capsys):
    from scratchlm.cli import main

    model = make(tok, GPT2)
    run = _run_dir(tmp_path, model, tok)
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    assert "as GGUF (gpt2, f32)" in capsys.readouterr().out
    fields, w = read(out)
    ids = tok.encode(IDS_TEXT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].double().numpy()
    assert np.abs(numpy_forward(fields, w, ids) - ref).max() < 1e-4
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2  # exists, no --force
    assert capsys.readouterr().err.startswith(f"error: --out {out} exists")
    assert (
        main(["export", str(run), "--format", "gguf", "--out", str(out), "--force", "--dtype", "q8_0"]) == 0
    )


@pytest.mark.slow
@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_llama_cpp_greedy_tokens_equal_scratchlm(tmp_path, tok, style):
    """llama.cpp (llama-cpp-python, built from PyPI: ~10 min) reads the file and decodes as ScratchLM does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from scratchlm.inference.engine import Engine

    model = make(tok, GPT2 if style == "gpt2" else LLAMA, context_length=64)
    with torch.no_grad():  # larger weights: well-separated logits, so float order cannot flip an argmax
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    ids = tok.encode("def main")
    assert llm.tokenize(b"def main", add_bos=False, special=False) == ids  # same tokenizer
    expected = Engine(model, tok).generate_ids([ids], max_new_tokens=32, temperature=0, stop_token_ids=[])[0]
    got = []
    llm.eval(ids)
    for _ in range(32):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        llm.eval([nxt])
    assert got == expected.token_ids
