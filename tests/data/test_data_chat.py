"""Instruction-tuning data: the assistant-only loss mask against a hand-built example, the loader, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.data.chat import ChatLoader, encode_conversation, read_conversations, training_pair
from scratchlm.errors import DataError
from scratchlm.model import build_model
from scratchlm.tokenizer.chat_template import CHATML, PLAIN


class Bytes:
    """UTF-8 bytes as ids; end-of-text = 256."""

    vocab_size, eot_id = 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


MESSAGES = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "k"},
]


def expected(pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """x, y of the hand-cut text: y[t] = byte t+1 where that byte is in a trained piece, else -100."""
    ids, keep = [], []
    for text, trained in pieces:
        ids += list(text.encode())
        keep += [trained] * len(text.encode())
    return ids[:-1], [i if k else -100 for i, k in zip(ids[1:], keep[1:])]


def test_assistant_only_mask_matches_a_hand_built_example():
    pieces = [
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("yo<|im_end|>", True),
        ("\n<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant\n", False),
        ("k<|im_end|>", True),
        ("\n", False),
    ]
    ids, trained = encode_conversation(Bytes(), CHATML, MESSAGES)
    x, y = training_pair(ids, trained, context_length=1000)
    assert (x, y) == expected(pieces)
    targets = [chr(t) for t in y if t != -100]
    assert "".join(targets) == "yo<|im_end|>k<|im_end|>"

    # plain: the reply with its leading space and newline is trained, "User:"/"Assistant:" are not
    ids, trained = encode_conversation(Bytes(), PLAIN, MESSAGES[1:3])
    assert training_pair(ids, trained, 1000) == expected([("User: hi\nAssistant:", False), (" yo\n", True)])
    # truncation keeps T + 1 tokens: T inputs and T targets
    x, y = training_pair(ids, trained, context_length=8)
    assert len(x) == len(y) == 8 and all(t == -100 for t in y)


def test_the_loss_is_the_mean_over_assistant_tokens_only():
    ids, trained = encode_conversation(Bytes(), CHATML, MESSAGES)
    x, y = (torch.tensor([v]) for v in training_pair(ids, trained, 1000))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=257, n_layer=1, n_head=2, d_model=16, context_length=256))
    logits, loss = model(x, y)
    keep = y[0] != -100
    manual = F.cross_entropy(logits[0][keep], y[0][keep])
    torch.testing.assert_close(loss, manual)
    assert keep.sum() == len("yo<|im_end|>k<|im_end|>")


def test_loader_pads_rows_and_resumes(tmp_path):
    examples = [training_pair(*encode_conversation(Bytes(), CHATML, MESSAGES[: k + 3]), 64) for k in range(3)]
    loader = ChatLoader(examples, batch_size=2, pad_id=256, split="train", seed=3)
    batches = [loader.next_batch() for _ in range(4)]
    x, y = batches[0]
    lengths = [len(examples[i][0]) for i in loader.batch_indices(0)]
    assert x.shape == y.shape == (2, max(lengths)) and x.dtype == y.dtype == torch.long
    short = lengths.index(min(lengths))
    assert (x[short, min(lengths) :] == 256).all() and (y[short, min(lengths) :] == -100).all()
    from scratchlm.train.batches import batch_tokens

    assert batch_tokens(batches[0]) == int((y != -100).sum()) < y.numel()  # tokens seen: trained targets
    first = ChatLoader(examples, batch_size=2, pad_id=256, split="train", seed=3)
    first.next_batch(), first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as it goes through state.json
    resumed = ChatLoader(examples, batch_size=2, pad_id=256, split="train", seed=3)
    resumed.load_state_dict(state)
    for want in batches[2:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = ChatLoader(examples[:2], batch_size=2, pad_id=256, split="train", seed=3)
    with pytest.raises(DataError, match="cannot resume the chat loader: data"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "chat.jsonl:2 is not valid JSON"),
        ('{"text": "hi"}', "chat.jsonl:2 has no 'messages' list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "chat.jsonl:2: message 0 has role 'robot'"),
    ],
)
def test_bad_chat_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"messages": MESSAGES})
    (tmp_path / "chat.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_conversations([str(tmp_path / "chat.jsonl")])
    with pytest.raises(DataError, match="is not a file"):
        read_conversations([str(tmp_path / "missing.jsonl")])
