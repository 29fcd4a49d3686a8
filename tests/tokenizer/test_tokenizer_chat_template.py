"""Chat templates: the rendered strings, the trained segments, validation, storage beside the tokenizer, and
parity with transformers' apply_chat_template on the Jinja text they are exported with."""

from __future__ import annotations

import json

import pytest

from scratchlm.errors import ChatFormatError, TokenizerError
from scratchlm.tokenizer import load_tokenizer, train_bpe_from_iterator
from scratchlm.tokenizer.chat_template import (
    CHATML,
    PLAIN,
    chat_template_of,
    get_template,
    save_chat_template,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!\nHow can I help?"},
    {"role": "user", "content": "Name a fruit."},
]


@pytest.fixture(scope="module")
def tok():
    text = "User: hello\nAssistant: hi there, how are you today? <|im_start|>user fine<|im_end|>\n" * 20
    return train_bpe_from_iterator(
        [text], 300, special_tokens=["<|endoftext|>"], num_workers=1, progress=False
    )


def test_plain_is_the_base_model_transcript():
    assert PLAIN.render(CONVERSATION) == (
        "System: Be brief.\nUser: Hello there\nAssistant: Hi!\nHow can I help?\nUser: Name a fruit.\nAssistant:"
    )
    assert PLAIN.render(CONVERSATION[1:2], add_generation_prompt=False) == "User: Hello there\n"
    assert PLAIN.stop == ["\nUser:"]


def test_chatml_rendering():
    assert CHATML.render(CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi!\nHow can I help?<|im_end|>\n"
        "<|im_start|>user\nName a fruit.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert CHATML.stop == ["<|im_end|>"]


@pytest.mark.parametrize("template", [PLAIN, CHATML], ids=lambda t: t.name)
def test_segments_mark_exactly_the_assistant_turns(template):
    segments = template.segments(CONVERSATION, add_generation_prompt=True)
    assert "".join(text for text, _ in segments) == template.render(CONVERSATION)
    trained = [text for text, is_trained in segments if is_trained]
    assert trained == [template.content_prefix + "Hi!\nHow can I help?" + template.turn_end]


@pytest.mark.parametrize("template", [PLAIN, CHATML], ids=lambda t: t.name)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_transformers_renders_the_exported_jinja_identically(template, generation_prompt, tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    tok.chat_template = template.name
    tok.save(tmp_path / "tokenizer.json")
    save_chat_template(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in (CONVERSATION, CONVERSATION[:3], CONVERSATION[1:2]):
        ours = template.render(messages, add_generation_prompt=generation_prompt)
        assert (
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == ours
        )


def test_the_template_is_stored_beside_the_tokenizer(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").chat_template is None
    assert chat_template_of(load_tokenizer(tmp_path)) is PLAIN  # a base model chats with the transcript
    tok.chat_template = "chatml"
    save_chat_template(tok, tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert chat_template_of(load_tokenizer(path)) is CHATML
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    saved["scratchlm_chat_template"] = "vicuna"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(saved))
    with pytest.raises(TokenizerError, match="unknown scratchlm_chat_template 'vicuna'"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "bot", "content": "x"}], "role 'bot'; use one of system, user, assistant"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"role": "user"}], "content must be a string"),
        (["hello"], "must be an object"),
    ],
)
def test_malformed_conversations_are_clear_errors(messages, message):
    with pytest.raises(ChatFormatError, match=message):
        CHATML.render(messages)
    with pytest.raises(ChatFormatError, match="unknown chat template 'alpaca'"):
        get_template("alpaca")


def test_chat_session_uses_the_stored_template(tok):
    import torch

    from scratchlm.config import ModelConfig
    from scratchlm.inference.chat import ChatSession
    from scratchlm.inference.engine import Engine
    from scratchlm.model import build_model

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=256)
    )
    tok.chat_template = "chatml"
    session = ChatSession(Engine(model.eval(), tok), system="Be brief.", max_new_tokens=4, temperature=0)
    assert session.template is CHATML
    session.history.append(("Hello there", "Hi!\nHow can I help?"))
    assert session.prompt_for("Name a fruit.") == CHATML.render(CONVERSATION)
    reply = "".join(session.reply("Name a fruit."))
    assert session.history[-1] == ("Name a fruit.", reply.strip())


def test_the_openai_server_renders_with_the_stored_template(tok):
    from scratchlm.inference.openai_api import render_chat

    tok.chat_template = "chatml"
    assert render_chat(CONVERSATION, tok) == (CHATML.render(CONVERSATION), ["<|im_end|>"])
    tok.chat_template = None  # a base model: the server's plain transcript
    assert render_chat(CONVERSATION[1:2], tok)[0] == "User: Hello there\nAssistant:"
