"""Multiple-choice scoring: batched scores vs one full forward per candidate, argmax, truncation, an oracle
whose answer is known, the HellaSwag loader on the real file, bad files, and ``scratchlm eval --task``."""

from __future__ import annotations

import json
import random
import string
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from scratchlm.cli import main
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.errors import DataError
from scratchlm.eval.perplexity import token_byte_lengths
from scratchlm.eval.tasks import (
    MultipleChoiceItem,
    encode_choices,
    evaluate_multiple_choice,
    load_hellaswag,
    score_item,
)
from scratchlm.model import build_model
from scratchlm.tokenizer import CharTokenizer, train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint

TEXTS = ["A man is sitting on a roof. he starts pulling up roofing.", "The lady lifts the weight. ü é"] * 3
ITEMS = [
    MultipleChoiceItem(
        "A man is sitting on a roof. he",
        ["is ripping tiles.", "rides", "x", "starts pulling up roofing on a roof."],
        3,
    ),
    MultipleChoiceItem(
        "The lady", ["lifts the weight over her head.", "swims", "is on a roof é ü", "pulls"], 0
    ),
    MultipleChoiceItem("", ["a", "bb", "roof roof", "The"], 2),  # an empty context starts after end-of-text
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (on a busy 2-core machine, 2 threads make each forward ~300x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_iterator(TEXTS, vocab_size=290, progress=False)


def tiny_gpt(vocab_size: int, context_length: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=32, context_length=context_length)
    )
    with torch.no_grad():  # larger weights: scores that differ clearly between candidates
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def brute_force_scores(model, tok, item: MultipleChoiceItem, context_length: int) -> dict[str, list[float]]:
    """Reference: one unpadded forward per candidate, the sum of log-probs read off the model's own loss."""
    out = {"acc": [], "acc_norm": [], "acc_token": []}
    ctx = tok.encode(item.context) or [tok.eot_id]
    for ending in item.endings:
        end = tok.encode(" " + ending)
        seq = (ctx + end)[-(context_length + 1) :]
        n = min(len(end), len(seq) - 1)
        x = torch.tensor([seq[:-1]])
        y = torch.tensor([[-100] * (len(seq) - 1 - n) + seq[-n:]])
        with torch.no_grad():
            _, loss = model(x, y)  # mean negative log-likelihood over the n scored tokens
        total = -loss.item() * n
        nbytes = len(tok.decode_bytes(seq[-n:]))
        out["acc"].append(total)
        out["acc_norm"].append(total / nbytes)
        out["acc_token"].append(total / n)
    return out


def test_batched_scores_equal_one_forward_per_candidate(tok):
    model = tiny_gpt(tok.vocab_size)
    token_bytes = token_byte_lengths(tok)
    for item in ITEMS:
        got = score_item(model, tok, item, token_bytes)
        ref = brute_force_scores(model, tok, item, 64)
        for name in ("acc", "acc_norm", "acc_token"):
            torch.testing.assert_close(got[name], torch.tensor(ref[name]), rtol=1e-4, atol=1e-4)
    # without truncation the byte count is the UTF-8 length of " " + ending
    ref = brute_force_scores(model, tok, ITEMS[1], 64)
    assert ref["acc"][2] / ref["acc_norm"][2] == pytest.approx(len(" is on a roof é ü".encode()))


def test_batch_layout_right_padding_and_targets(tok):
    idx, targets, owner = encode_choices(tok, ITEMS[0].context, ITEMS[0].endings, 64)
    assert owner.tolist() == [0, 1, 2, 3]  # every ending fits: one row each
    ctx = tok.encode(ITEMS[0].context)
    for k, ending in enumerate(ITEMS[0].endings):
        end = tok.encode(" " + ending)
        n_real = len(ctx) + len(end) - 1
        assert idx[k, :n_real].tolist() == (ctx + end)[:-1]
        assert targets[k].tolist() == [-100] * (len(ctx) - 1) + end + [-100] * (idx.shape[1] - n_real)
        assert (idx[k, n_real:] == 0).all()


def test_prediction_is_argmax_and_accuracy_counts(tok):
    model = tiny_gpt(tok.vocab_size, seed=1)
    refs = [brute_force_scores(model, tok, item, 64) for item in ITEMS]
    # label item i with the brute-force argmax of "acc" for the first two items, something else for the last
    best = [max(range(4), key=lambda k, r=r: r["acc"][k]) for r in refs]
    items = [
        MultipleChoiceItem(it.context, it.endings, b if i < 2 else (b + 1) % 4)
        for i, (it, b) in enumerate(zip(ITEMS, best))
    ]
    result = evaluate_multiple_choice(model, tok, items)
    assert result["items"] == 3
    assert result["acc"] == pytest.approx(2 / 3)
    for name in ("acc_norm", "acc_token"):
        expected = (
            sum(max(range(4), key=lambda k, r=r: r[name][k]) == it.label for r, it in zip(refs, items)) / 3
        )
        assert result[name] == pytest.approx(expected)


def test_left_truncation_to_the_context_window(tok):
    C = 12  # learned positions: the model itself raises on more than C tokens
    model = tiny_gpt(tok.vocab_size, context_length=C, seed=2)
    item = MultipleChoiceItem(
        "The lady lifts the weight. " * 4,
        ["he starts pulling up", "a", "roof", "The lady"],  # each ending fits the window (see the next test)
        0,
    )
    assert max(len(tok.encode(" " + e)) for e in item.endings) <= C
    idx, targets, owner = encode_choices(tok, item.context, item.endings, C)
    assert idx.shape[1] <= C and owner.tolist() == [0, 1, 2, 3]
    got = score_item(model, tok, item, token_byte_lengths(tok))
    ref = brute_force_scores(model, tok, item, C)
    torch.testing.assert_close(got["acc"], torch.tensor(ref["acc"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["acc_norm"], torch.tensor(ref["acc_norm"]), rtol=1e-4, atol=1e-4)
    # the kept window ends with the ending: the oldest context tokens were the ones dropped
    seq = tok.encode(item.context) + tok.encode(" a")
    assert len(seq) > C + 1
    assert idx[1, :C].tolist() == seq[-(C + 1) : -1]
    assert targets[1][targets[1] != -100].tolist() == tok.encode(" a")


class BigramOracle(nn.Module):
    """logits[t] = log P(next | idx[t]) from bigram counts of the right answers: it knows the answers."""

    def __init__(self, tok, texts: list[str], context_length: int = 128):
        super().__init__()
        counts = torch.full((tok.vocab_size, tok.vocab_size), 1e-30)  # unseen: (nearly) impossible
        for text in texts:
            ids = tok.encode(text)
            for a, b in zip(ids, ids[1:]):
                counts[a, b] += 1
        self.log_table = nn.Parameter(counts.log() - counts.sum(-1, keepdim=True).log(), requires_grad=False)
        self.config = SimpleNamespace(context_length=context_length)

    def forward(self, idx, targets=None):
        return self.log_table[idx], None


def test_an_ending_longer_than_the_window_is_scored_on_every_token(tok):
    """An ending of more than C tokens goes in several rows: with a bigram model, whose scores do not depend
    on how much context it sees, they add up to the score of the whole ending; each target has at least
    C // 2 tokens before it, and a model with learned positions (which refuses more than C) runs on them."""
    C = 8
    ending = "he starts pulling up roofing on a roof. The lady lifts the weight."
    item = MultipleChoiceItem("The lady", [ending, "a", ending[:20], "The lady lifts"], 0)
    ctx, end = tok.encode(item.context), tok.encode(" " + ending)
    assert len(end) > 3 * C
    idx, targets, owner = encode_choices(tok, item.context, item.endings, C)
    assert idx.shape[1] <= C and (owner == 0).sum() >= 6 and (owner == 1).sum() == 1
    # the rows of ending 0 score each of its tokens once, in order, each after >= C // 2 real tokens
    scored = [
        t for r in (owner == 0).nonzero().flatten().tolist() for t in targets[r][targets[r] != -100].tolist()
    ]
    assert scored == end
    for r in (owner == 0).nonzero().flatten().tolist():
        first = int((targets[r] != -100).nonzero()[0])
        assert first + 1 >= C // 2 or idx[r, 0] == ctx[0]  # inputs before the first target (or all of seq)
    oracle = BigramOracle(tok, TEXTS + [item.context + " " + e for e in item.endings], context_length=C)
    got = score_item(oracle, tok, item, token_byte_lengths(tok))
    for k, e in enumerate(item.endings):
        seq = ctx + tok.encode(" " + e)
        want = sum(float(oracle.log_table[a, b]) for a, b in zip(seq[len(ctx) - 1 :], seq[len(ctx) :]))
        assert float(got["acc"][k]) == pytest.approx(want, rel=1e-5)
        assert float(got["acc"][k] / got["acc_norm"][k]) == pytest.approx(len((" " + e).encode()))
    score_item(tiny_gpt(tok.vocab_size, context_length=C), tok, item, token_byte_lengths(tok))


def test_oracle_model_gets_every_item_right():
    rng = random.Random(0)
    right, wrong = string.ascii_lowercase[:13], string.ascii_lowercase[13:]  # disjoint alphabets

    def word(letters, n):
        return "".join(rng.choice(letters) for _ in range(n))

    items = []
    for _ in range(12):
        label = rng.randrange(4)
        endings = [word(wrong, rng.randint(2, 30)) for _ in range(4)]
        endings[label] = word(right, rng.randint(2, 30))
        items.append(MultipleChoiceItem(word(right, 20), endings, label))
    tok = CharTokenizer.train([string.ascii_lowercase + " "])
    oracle = BigramOracle(tok, [it.context + " " + it.endings[it.label] for it in items])
    result = evaluate_multiple_choice(oracle, tok, items)
    assert result == {"acc": 1.0, "acc_norm": 1.0, "acc_token": 1.0, "items": 12.0}
    # and it gets them all wrong once the labels point at a wrong ending
    shifted = [MultipleChoiceItem(it.context, it.endings, (it.label + 1) % 4) for it in items]
    assert evaluate_multiple_choice(oracle, tok, shifted)["acc_norm"] == 0.0


def test_load_hellaswag_real_file(shared_data):
    path = shared_data / "hellaswag" / "hellaswag_val.jsonl"
    items = load_hellaswag(path, limit=20)
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(next(f)) for _ in range(20)]
    assert len(items) == 20
    assert [it.ind for it in items] == [r["ind"] for r in raw]
    assert [it.context for it in items] == [r["ctx"] for r in raw]
    assert [it.endings for it in items] == [r["endings"] for r in raw]
    assert [it.label for it in items] == [r["label"] for r in raw]
    assert all(len(it.endings) == 4 and 0 <= it.label < 4 for it in items)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "not found"),
        ("", "no items"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{not json\n', ":2: not valid JSON"),
        ('{"ctx": "a", "label": 0}\n', "missing field 'endings'"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}\n', "'label' must be an integer"),
        ('{"ctx": "a", "endings": "bcde", "label": 0}\n', "'endings' must be a list"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bad_hellaswag_file_is_a_one_line_data_error(tmp_path, content, fragment):
    path = tmp_path / "hs.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=fragment) as e:
        load_hellaswag(path)
    assert "\n" not in str(e.value) and "hs.jsonl" in str(e.value)


def test_cli_eval_task_hellaswag(tmp_path, tok, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, context_length=64)
    )
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    model = tiny_gpt(tok.vocab_size)
    save_checkpoint(run, 1, model, {}, {"step": 1}, keep_last=1)
    data = tmp_path / "hs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"ind": i, "ctx": it.context, "endings": it.endings, "label": it.label}) + "\n"
            for i, it in enumerate(ITEMS)
        )
    )
    rc = main(
        [
            "eval",
            str(run),
            "--which",
            "latest",
            "--device",
            "cpu",
            "--task",
            "hellaswag",
            "--task-file",
            str(data),
            "--limit",
            "2",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    expected = evaluate_multiple_choice(model, tok, ITEMS[:2])
    assert (
        rc == 0
        and out["items"] == 2
        and out["acc"] == expected["acc"]
        and out["acc_norm"] == expected["acc_norm"]
    )
    assert main(["eval", str(run), "--task", "hellaswag"]) == 2  # no --task-file
    assert "--task-file" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                str(run),
                "--which",
                "latest",
                "--task",
                "hellaswag",
                "--task-file",
                str(tmp_path / "nope.jsonl"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
