"""Multi-process training on CPU (gloo) through torchrun: DDP, ZeRO-1 and FSDP2 against one process.

Two launches, because starting processes costs more than the tiny runs: ``dist_child.py`` runs every
parity and resume scenario in one 2-rank process group, and the CLI test runs ``python -m
torch.distributed.run --nproc_per_node 2 --standalone -m scratchlm train ...`` end to end.

Parity design: the sequential loader gives rank r the batches r, r+2, r+4, ... of the one-process order, with
b = 4 rows each, 2 micro-batches per rank and step (``tokens_per_step`` = 2 ranks x 2 x 4 x 32). The reference
is one process running ``train_step`` on micro-batches of 2b rows: rank 0's rows concatenated with rank 1's
(the ranks record the rows they trained on, and the test checks they are exactly those). fp32, deterministic
algorithms, clipping active. AdamW divides by sqrt(v), which magnifies float rounding in near-zero gradients
(the attention key bias has an exactly zero gradient in exact arithmetic), so weights are compared at
atol 3e-5 (0.3% of one step at lr 1e-2; a wrong data split or reduction moves them by ~1e-2), and the losses,
gradient norms at rtol 1e-5, the optimizer moments at 1e-5 of their largest value.
Muon under FSDP orthogonalises DTensors in bf16 with partial sums over the ranks, so it is checked at bf16
level instead (a per-shard orthogonalisation would be off by the size of the update).

Resume: a SIGTERM to rank 1 only must stop both ranks after the same step (the stop flag is all-reduced; a
rank stopping alone would leave the other waiting in a collective, and the launch would time out). The
resumed run ends ``torch.equal`` to the uninterrupted one, for every strategy: with 2 ranks a gloo
all-reduce adds the same two numbers in the same order every time, so the runs are bitwise deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_child
import pytest
import torch
from train_helpers import ByteTokenizer, make_data, tiny_config

from scratchlm.cli import main as cli_main
from scratchlm.config import ModelConfig, TrainConfig, load_config
from scratchlm.data.loader import TokenLoader
from scratchlm.errors import ConfigError
from scratchlm.model import build_model
from scratchlm.train.batches import make_loaders
from scratchlm.train.checkpoint import find_checkpoint, load_model_state, load_optimizer_file
from scratchlm.train.distributed import World, parallelize
from scratchlm.train.evaluate import evaluate
from scratchlm.train.metrics import read_metrics
from scratchlm.train.optim import build_optimizers, set_lr
from scratchlm.train.trainer import micro_steps, seed_everything, train_step

CHILD = Path(__file__).with_name("dist_child.py")
CPU, FP32 = torch.device("cpu"), torch.float32


def torchrun(*args: str, env: dict[str, str] | None = None, timeout: int = 240):
    """``python -m torch.distributed.run --nproc_per_node 2 --standalone ARGS``; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("dist-data"))


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> Path:
    """Every dist_child scenario, in one 2-rank launch."""
    out = tmp_path_factory.mktemp("dist-runs")
    torchrun(str(CHILD), str(out), str(data_dir))
    return out


def one_process_reference(cfg, data_dir: Path, world_size: int = 2):
    """Train in this process on the concatenated rows of every rank; returns (model, optimizers, steps, rows).

    ``steps``: (loss, grad norm) per step; ``rows[r]``: (steps, k, B, T) inputs rank r was to train on.
    """
    tc = cfg.train
    seed_everything(tc.seed)
    model = build_model(cfg.model)
    optimizers = build_optimizers(model, tc)
    loaders = [
        TokenLoader(
            data_dir,
            "train",
            tc.batch_size,
            cfg.model.context_length,
            mode="sequential",
            seed=tc.seed,
            rank=r,
            world_size=world_size,
        )
        for r in range(world_size)
    ]
    k = micro_steps(cfg, world_size)
    steps, rows = [], [[] for _ in range(world_size)]
    for step in range(tc.max_steps):
        set_lr(optimizers, step, tc, 0.0)
        micro = []
        for _ in range(k):
            per_rank = [loader.next_batch() for loader in loaders]
            for r, (x, _) in enumerate(per_rank):
                rows[r].append(x)
            micro.append(tuple(torch.cat(parts) for parts in zip(*per_rank)))  # (2B, T) x and y
        steps.append(
            train_step(model, model, optimizers, micro, grad_clip=tc.grad_clip, device=CPU, dtype=FP32)
        )
    rows = [torch.stack(r).view(tc.max_steps, k, tc.batch_size, -1) for r in rows]
    return model, optimizers, steps, rows


def parity_config(runs: Path, data_dir: Path, name: str):
    run_dir = runs / "parity" / name / "run"
    return run_dir, tiny_config(run_dir, data_dir, *dist_child.PARITY, *dist_child.PARITY_RUNS[name])


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("name", ["ddp", "zero1", "fsdp"])
def test_two_ranks_match_one_process_on_the_same_rows(runs, data_dir, name):
    run_dir, cfg = parity_config(runs, data_dir, name)
    model, optimizers, steps, rows = one_process_reference(cfg, data_dir)
    for r in range(2):  # the ranks trained on exactly the rows the reference concatenated
        assert torch.equal(torch.load(run_dir.parent / f"rows_rank{r}.pt"), rows[r]), r
    assert not torch.equal(rows[0], rows[1])

    ckpt = find_checkpoint(run_dir)
    assert ckpt.name == "step_00000003"
    got, ref = load_model_state(ckpt), model.state_dict()
    seed_everything(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=3e-5, msg=n)
    assert max((ref[n] - init[n]).abs().max() for n in ref) > 1e-2  # the weights did move: 300x the atol

    logged = train_records(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for rec, (loss, norm) in zip(logged, steps):
        assert rec["loss"] == pytest.approx(loss, rel=1e-5) and rec["grad_norm"] == pytest.approx(
            norm, rel=1e-5
        )
    assert logged[-1]["tokens"] == 3 * cfg.train.tokens_per_step

    # optimizer.pt: full state in the one-process format (index keys, same groups), equal to the reference
    saved = load_optimizer_file(ckpt)["optimizers"]
    wants = [opt.state_dict() for opt in optimizers]
    for key in ("exp_avg", "exp_avg_sq"):  # atol: 1e-5 of the largest moment (the key bias's are noise)
        atol = 1e-5 * max(s[key].abs().max() for want in wants for s in want["state"].values())
        for sd, want in zip(saved, wants, strict=True):
            assert sd["param_groups"] == want["param_groups"]
            assert sorted(sd["state"]) == sorted(want["state"])
            for i, s in want["state"].items():
                assert float(sd["state"][i]["step"]) == float(s["step"]) == 3.0
                torch.testing.assert_close(sd["state"][i][key], s[key], rtol=1e-4, atol=atol)
    opt = build_optimizers(build_model(cfg.model), cfg.train)[0]
    opt.load_state_dict(saved[0])  # loads into a single-process optimizer as is


def test_fsdp_with_muon_matches_one_process_at_bf16_level(runs, data_dir):
    run_dir, cfg = parity_config(runs, data_dir, "fsdp-muon")
    model, _, steps, _ = one_process_reference(cfg, data_dir)
    seed_everything(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    got, ref = load_model_state(find_checkpoint(run_dir)), model.state_dict()
    hidden = [n for n in ref if n.endswith("weight") and (".attn.c_" in n or ".mlp.c_" in n)]  # Muon's
    err = sum((got[n] - ref[n]).norm() ** 2 for n in hidden).sqrt()
    moved = sum((ref[n] - init[n]).norm() ** 2 for n in hidden).sqrt()
    assert err < 0.15 * moved, (err, moved)  # measured ~0.05 (bf16 Newton-Schulz on DTensors)
    for rec, (loss, _) in zip(train_records(run_dir), steps):
        assert rec["loss"] == pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_evaluation_over_ranks_equals_one_process(runs, data_dir, name):
    """eval.batches=3 over 2 ranks (rank 1's second forward is not counted) = one process's 3 batches."""
    run_dir, cfg = parity_config(runs, data_dir, name)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(find_checkpoint(run_dir)))
    _, make_val_loader = make_loaders(cfg, ByteTokenizer(), data_dir, CPU)
    want = evaluate(model, make_val_loader, cfg.eval.batches, CPU, FP32)
    (logged,) = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    assert logged["step"] == 3 and logged["val_loss"] == pytest.approx(want, rel=1e-6)
    one_rank = evaluate(model, make_loaders(cfg, None, data_dir, CPU, 0, 2)[1], 2, CPU, FP32)
    assert one_rank != pytest.approx(want, rel=1e-4)  # rank 0's share alone would be another number


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp"])
def test_sigterm_on_one_rank_stops_both_and_resume_is_bit_exact(runs, strategy):
    root = runs / "resume" / strategy
    for r in range(2):
        stopped = json.loads((root / "run" / f"stopped_rank{r}.json").read_text())
        assert stopped["stopped_reason"] == "interrupted" and stopped["step"] == dist_child.STOP_AFTER, r
        resumed = json.loads((root / "run" / f"resumed_rank{r}.json").read_text())
        assert resumed["stopped_reason"] == "max_steps" and resumed["step"] == 10, r
    ref_run, run = root / "reference" / "run", root / "run" / "run"
    ref, got = load_model_state(find_checkpoint(ref_run)), load_model_state(find_checkpoint(run))
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    losses = {r["step"]: r["loss"] for r in train_records(run)}
    assert [r["step"] for r in train_records(run)] == list(range(1, 11))  # every step logged once
    assert losses == {r["step"]: r["loss"] for r in train_records(ref_run)}
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert len(state["rng_per_rank"]) == 2 and state["rng_per_rank"][0] != state["rng_per_rank"][1]


def test_torchrun_cli_fsdp_run_loads_and_generates_in_one_process(tmp_path):
    import scratchlm

    text = tmp_path / "text.txt"
    text.write_text(Path(dist_child.__file__).read_text() * 4)
    run_dir = tmp_path / "run"
    proc = torchrun(
        "-m",
        "scratchlm",
        "train",
        "preset=cpu-tiny",
        "tokenizer.kind=char",
        f"data.source={text}",
        "data.num_workers=1",
        f"train.run_dir={run_dir}",
        "train.parallel=fsdp",
        "train.max_steps=4",
        "train.device=cpu",
        "train.dtype=float32",
        "eval.interval=4",
        "eval.batches=2",
        env={"SCRATCHLM_CACHE": str(tmp_path / "cache")},
    )
    assert proc.stdout.count("training: preset cpu-tiny") == 1 and proc.stdout.count("--- sample ---") == 1
    assert "tokens: 1,024" in proc.stdout  # one micro-batch of 4 x 32 per rank and step, 2 ranks, 4 steps
    records = read_metrics(run_dir)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1),
        ("eval", 4),
        ("stop", 4),
    ]  # rank 0 alone logs
    assert (run_dir / "samples.txt").read_text().count("=== step 4 ===") == 1  # both generated, 0 wrote
    ckpt = find_checkpoint(run_dir)
    weights = load_model_state(ckpt)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    assert weights["lm_head.weight"] is weights["wte.weight"]  # tied: stored once, aliased back
    lm = scratchlm.load(run_dir)
    assert lm.model.lm_head.weight is lm.model.wte.weight
    for name, t in lm.model.state_dict().items():
        assert torch.equal(t, weights[name]), name
    assert isinstance(lm.generate("def ", max_new_tokens=12, temperature=0.0), str)


def test_bad_parallel_value_is_a_one_line_config_error(capsys):
    with pytest.raises(ConfigError, match=r"train\.parallel='bogus' is not one of ddp, fsdp, zero1") as e:
        load_config(None, ["train.parallel=bogus"])
    assert "\n" not in str(e.value)
    assert cli_main(["train", "preset=cpu-tiny", "train.parallel=bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.parallel='bogus'") and "\n" not in err


def test_tokens_per_step_must_divide_among_ranks(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, ["preset=cpu-tiny", "train.tokens_per_step=384"])  # 3 micro-batches of 4 x 32
    assert micro_steps(cfg) == 3
    with pytest.raises(ConfigError, match=r"train\.tokens_per_step=384 is 3 micro-batches .* among 2 ranks"):
        micro_steps(cfg, world_size=2)
    cfg = load_config(None, ["preset=cpu-tiny", "train.tokens_per_step=512"])
    assert (micro_steps(cfg, 1), micro_steps(cfg, 2), micro_steps(cfg, 4)) == (4, 2, 1)
    # under torchrun (rank 0 of 2): the CLI says so before joining the process group or writing anything
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = cli_main(["train", "preset=cpu-tiny", "train.tokens_per_step=384", f"train.run_dir={run_dir}"])
    assert code == 2 and not run_dir.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.tokens_per_step=384") and "multiple of 256" in err


def test_fsdp_refuses_what_it_cannot_run_with_a_clear_error():
    """Checked before anything touches torch.distributed (no process group in this test)."""
    tc, world = TrainConfig(parallel="fsdp"), World(rank=0, size=2)
    cfg = ModelConfig(arch="seq2seq", vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16)
    with pytest.raises(ConfigError, match="train.parallel=fsdp supports model.arch=gpt.*use ddp or zero1"):
        parallelize(build_model(cfg), tc, world, CPU, arch="seq2seq")
    gpt = build_model(ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ConfigError, match="fsdp with float16.*bfloat16"):
        parallelize(gpt, tc, world, CPU, dtype=torch.float16)


def test_seq2seq_under_ddp_counts_every_rank_and_evaluates_like_one_process(runs):
    from scratchlm.data.pairs import build_pair_loaders
    from scratchlm.train.batches import batch_tokens

    run_dir = runs / "seq2seq" / "run"
    cfg = tiny_config(run_dir, runs, *dist_child.SEQ2SEQ, f"data.source={runs / 'pairs.tsv'}")
    tok, tc = dist_child.PairTokenizer(), cfg.train
    results = [json.loads((run_dir.parent / f"result_rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in results] == [4, 4]
    want_tokens = 0  # predicted tokens of both ranks' batches: they differ, as the padding does
    for r in range(2):
        train, _ = build_pair_loaders(cfg.data, tok, tc.batch_size, 32, tc.seed, rank=r, world_size=2)
        want_tokens += sum(batch_tokens(train.next_batch()) for _ in range(4 * micro_steps(cfg, 2)))
    assert results[0]["tokens"] == want_tokens == results[1]["tokens"]
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(find_checkpoint(run_dir)))
    _, make_val_loader = make_loaders(cfg, tok, None, CPU)
    want = evaluate(model, make_val_loader, cfg.eval.batches, CPU, FP32)
    assert results[0]["val_loss"] == pytest.approx(want, rel=1e-6)
    assert (run_dir / "samples.txt").read_text().count("=== step 4 ===") == 1  # written by rank 0 alone
