"""Exports that chat. A tiny Llama instruction-tuned (``scratchlm finetune ... chat.jsonl``) until it answers
"Hi" with "Hello there<|im_end|>" is exported:

- to the HF format: transformers' ``apply_chat_template`` renders ScratchLM's prompt and ``generate`` (greedy,
  with the generation_config.json it reads) stops at the end of the turn, with ScratchLM's reply;
- for Ollama: the Modelfile passes a checker of Ollama's documented Modelfile grammar, and its TEMPLATE,
  run by a small evaluator of the Go-template subset it uses, renders exactly ScratchLM's chat prompt;
- as GGUF for llama.cpp (slow test, llama-cpp-python): its own template formats the chat and its greedy reply
  equals ``scratchlm chat``'s.

And the sample printed at the end of the run is a chat turn through the template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from scratchlm.api import load
from scratchlm.cli import main
from scratchlm.config import load_config, load_run_config, save_config
from scratchlm.inference.chat import ChatSession
from scratchlm.model import build_model
from scratchlm.model.ollama import go_template, modelfile
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.tokenizer.chat_template import CHATML, PLAIN
from scratchlm.train.checkpoint import save_checkpoint

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A ScratchLM Llama run instruction-tuned on one conversation (~20 s on 2 loaded cores)."""
    from scratchlm.train import trainer

    tmp = tmp_path_factory.mktemp("chat-export")
    conv = [*HI, {"role": "assistant", "content": "Hello there"}]
    text = CHATML.render(conv, add_generation_prompt=False) * 20
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
            "model.pos=rope",
            "model.norm=rmsnorm",
            "model.mlp=swiglu",
            "model.bias=false",
            "model.tie_embeddings=false",
        ]
    )
    src = tmp / "src"
    src.mkdir()
    save_config(cfg, src / "config.yaml")
    tok.save(src / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(src, 1, build_model(cfg.model), {}, {"step": 1}, keep_last=1)
    chat = tmp / "chat.jsonl"
    chat.write_text((json.dumps({"messages": conv}) + "\n") * 20)
    plots, trainer._plots = trainer._plots, lambda run_dir: None
    try:
        args = ["train.max_steps=30", "train.lr=1e-2", "train.warmup_steps=2", "train.batch_size=8"]
        args += ["train.device=cpu", "train.dtype=float32", "train.progress=false", "train.log_interval=10"]
        args += ["eval.interval=30", "eval.batches=1", "eval.sample_tokens=4", "data.val_fraction=0.0"]
        assert main(["finetune", str(src), str(chat), f"train.run_dir={tmp / 'run'}", *args]) == 0
    finally:
        trainer._plots = plots
    run = tmp / "run"
    session = ChatSession(load(run, device="cpu").engine, temperature=0, max_new_tokens=16)
    assert "".join(session.reply("Hi")) == "Hello there"  # it learnt the turn (and ends it)
    return run


def greedy_ids(run: Path, prompt: str, n: int) -> list[int]:
    lm = load(run, device="cpu")
    return lm.engine.generate_ids(
        [lm.tokenizer.encode(prompt)], max_new_tokens=n, temperature=0, stop_token_ids=[]
    )[0].token_ids


def test_transformers_generate_stops_at_the_end_of_the_turn(chat_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", str(chat_run), "--out", str(out)]) == 0
    tok_ours = load(chat_run, device="cpu").tokenizer
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok_ours.eot_id and generation["stop_strings"] == ["<|im_end|>"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML.jinja

    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tok.apply_chat_template(HI, tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML.render(HI)  # the same text scratchlm chat sends
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok_ours.encode(prompt)
    with torch.no_grad():
        stopped = model.generate(ids, tokenizer=tok, do_sample=False, max_new_tokens=30)[0, ids.shape[1] :]
        model.generation_config.stop_strings = None  # what transformers did before: run past the turn
        unstopped = model.generate(ids, do_sample=False, max_new_tokens=30)[0, ids.shape[1] :]
    reply = tok.decode(stopped)
    assert reply == "Hello there<|im_end|>"  # stops right after the end-of-turn marker
    assert len(unstopped) > len(stopped) and tok.decode(unstopped).startswith(reply)
    assert stopped.tolist() == greedy_ids(chat_run, prompt, len(stopped))  # ScratchLM's greedy tokens


# ----------------------------------------------------------------------------------------------------------
# Ollama: a checker of the Modelfile grammar (docs/modelfile.md of ollama) and an evaluator of the Go
# template subset the TEMPLATE uses (range, if / else if / else with eq, .Role, .Content, string literals)

INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
PARAMETERS = {
    "mirostat": int,
    "mirostat_eta": float,
    "mirostat_tau": float,
    "num_ctx": int,
    "repeat_last_n": int,
    "repeat_penalty": float,
    "temperature": float,
    "seed": int,
    "stop": str,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs; AssertionError for anything outside the documented grammar: one
    instruction per line, arguments bare, "quoted" (one line, no quote inside) or \"\"\"triple-quoted\"\"\"
    (may span lines); '#' comments; FROM required; PARAMETER names and value types from the docs."""
    out, i = [], 0
    while i < len(text):
        line_end = text.find("\n", i)
        line = text[i : len(text) if line_end < 0 else line_end]
        if not line.strip() or line.lstrip().startswith("#"):
            i = len(text) if line_end < 0 else line_end + 1
            continue
        m = re.match(r"(\w+)\s+", line)
        assert m, f"not an instruction: {line!r}"
        name, rest_at = m.group(1).upper(), i + m.end()
        assert name in INSTRUCTIONS, name
        rest = text[rest_at:]
        if name == "PARAMETER":
            key, _, rest = rest.partition(" ")
            assert key in PARAMETERS, f"unknown parameter {key}"
            rest_at = len(text) - len(rest)
        if rest.startswith('"""'):
            close = rest.find('"""', 3)
            assert close > 0, "unclosed triple quote"
            value, consumed = rest[3:close], close + 3
        elif rest.startswith('"'):
            close = rest.find('"', 1)
            assert close > 0 and "\n" not in rest[:close], "bad quoted value"
            value, consumed = rest[1:close], close + 1
        else:
            value = rest.split("\n", 1)[0].strip()
            consumed = len(rest.split("\n", 1)[0])
        after = rest[consumed:].split("\n", 1)[0]
        assert not after.strip(), f"text after the value of {name}: {after!r}"
        if name == "PARAMETER":
            PARAMETERS[key](value)  # ValueError if the type is wrong
            value = f"{key} {value}"
        out.append((name, value))
        i = rest_at + consumed
    assert any(n == "FROM" for n, _ in out), "FROM is required"
    return out


def render_go(template: str, messages: list[dict]) -> str:
    """Evaluate the Go-template subset over {.Messages}: returns the rendered text."""
    tokens = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template, flags=re.S)
    pieces: list[tuple[str, str]] = []  # ("text", s) | ("action", body)
    for t in tokens:
        if t.startswith("{{"):
            if t.startswith("{{-") and pieces and pieces[-1][0] == "text":
                pieces[-1] = ("text", pieces[-1][1].rstrip())
            pieces.append(("action", t.strip("{}-").strip()))
            if t.endswith("-}}"):
                pieces.append(("trim", ""))
        elif pieces and pieces[-1][0] == "trim":
            pieces[-1] = ("text", t.lstrip())
        else:
            pieces.append(("text", t))

    def block(pos: int, scope: dict | None) -> tuple[str, int, str]:
        """Render from ``pos`` until an else/end action; returns (text, position after it, that action)."""
        out = ""
        while pos < len(pieces):
            kind, body = pieces[pos]
            pos += 1
            if kind in ("text", "trim"):
                out += body
            elif body.startswith('"'):
                out += json.loads(body)
            elif body in (".Content", ".Role"):
                out += scope[body[1:].lower()]
            elif body == "range .Messages":
                start = pos
                for m in messages:
                    text, pos, _ = block(start, m)
                    out += text
                if not messages:
                    _, pos, _ = block(start, {"role": "", "content": ""})
            elif body.startswith("if "):
                taken, cond = False, body[3:]
                while True:
                    want = re.fullmatch(r'eq \.Role "(\w+)"', cond)
                    hit = not taken and (cond == "" or (want and scope["role"] == want.group(1)))
                    text, pos, end = block(pos, scope)
                    if hit:
                        out, taken = out + text, True
                    if end == "end":
                        break
                    cond = end.removeprefix("else").removeprefix(" if ").strip()
            elif body == "end" or body.startswith("else"):
                return out, pos, body
            else:
                raise AssertionError(f"unsupported action {{{{ {body} }}}}")
        return out, pos, ""

    return block(0, None)[0]


CONVERSATIONS = [
    HI,
    [{"role": "system", "content": "Be brief."}, *HI],
    [*HI, {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "a {{ b }} c"}],
]


@pytest.mark.parametrize("template", [CHATML, PLAIN])
def test_the_go_template_renders_what_scratchlm_chat_sends(template):
    for messages in CONVERSATIONS:
        assert render_go(go_template(template), messages) == template.render(messages)


def test_ollama_export_writes_a_valid_modelfile(chat_run, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "ollama"
    assert main(["export", str(chat_run), "--format", "ollama", "--out", str(out), "--dtype", "f32"]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    parsed = parse_modelfile((out / "Modelfile").read_text())
    values = dict(parsed[:2] + [p for p in parsed if p[0] != "PARAMETER"])
    assert values["FROM"] == "./model.gguf" and (out / "model.gguf").is_file()
    assert render_go(values["TEMPLATE"], CONVERSATIONS[1]) == CHATML.render(CONVERSATIONS[1])
    params = [v for n, v in parsed if n == "PARAMETER"]
    assert "stop <|im_end|>" in params and "num_ctx 64" in params and "temperature 0.8" in params
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == CHATML.jinja
    # a base model's Modelfile: the plain transcript, whose stop string holds a newline (triple quotes)
    tok = load(chat_run, device="cpu").tokenizer
    tok.chat_template = None
    text = modelfile(tok, 64)
    assert 'PARAMETER stop """\nUser:"""' in text
    assert ("PARAMETER", "stop \nUser:") in parse_modelfile(text)
    assert main(["export", str(chat_run), "--format", "ollama", "--out", str(out)]) == 2  # not empty


def test_adapters_only_is_for_lora_runs_and_the_hf_format(chat_run, tmp_path, capsys):
    assert main(["export", str(chat_run), "--adapters-only", "--out", str(tmp_path / "a")]) == 2
    assert "is not a LoRA run (train.lora.rank=0)" in capsys.readouterr().err
    args = ["export", str(chat_run), "--adapters-only", "--format", "gguf", "--out", str(tmp_path / "b.gguf")]
    assert main(args) == 2
    assert "--adapters-only writes peft's format" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_end_of_run_sample_of_a_chat_run_is_a_chat_turn(chat_run, capsys):
    from scratchlm.cli.train import _print_sample

    cfg = load_run_config(chat_run)
    _print_sample(str(chat_run), cfg)
    printed = capsys.readouterr().out
    sample = printed.split("--- sample ---\n", 1)[1].split("\n--- end of sample ---")[0]
    session = ChatSession(
        load(chat_run).engine, temperature=0.8, top_k=50, seed=cfg.train.seed, max_new_tokens=32
    )
    reply = "".join(session.reply("Hi"))
    assert sample == f"user: Hi\nassistant: {reply}"
    assert "<|im" not in sample and reply


@pytest.mark.slow
def test_llama_cpp_chats_with_the_gguf_template_like_scratchlm_chat(chat_run, tmp_path):
    """llama.cpp (llama-cpp-python) formats the chat with the GGUF's own template; greedy replies agree."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "m.gguf"
    assert main(["export", str(chat_run), "--format", "gguf", "--dtype", "f32", "--out", str(path)]) == 0
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == CHATML.jinja
    answer = llm.create_chat_completion(messages=HI, temperature=0.0, max_tokens=16, stop=["<|im_end|>"])
    session = ChatSession(load(chat_run, device="cpu").engine, temperature=0, max_new_tokens=16)
    assert answer["choices"][0]["message"]["content"].strip() == "".join(session.reply("Hi"))
