"""Training wall to wall against nanoGPT's CPU recipe: a plain eager PyTorch loop vs ``scratchlm train``.

    python benchmarks/nanogpt_recipe.py                          # 2000 iterations, 3 alternating rounds
    python benchmarks/nanogpt_recipe.py --iters 200 --rounds 2   # scaled down (eval every 50)

The recipe is nanoGPT's published CPU run of shakespeare_char (its README)::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(a) ``nanogpt``: that run re-written here as a plain eager loop in nanoGPT's own shape and order: its GPT
    (LayerNorm without bias, learned positions, exact GELU, tied head, N(0, 0.02) init with the residual
    projections at 0.02 / sqrt(2 n_layer), SDPA causal attention), its batches (``np.memmap`` re-opened
    per batch, random offsets from ``torch.randint``), AdamW as nanoGPT builds it on a CPU (decay on
    tensors with ndim >= 2, not fused), warmup 100 + cosine to 1e-4 at ``--iters``, grad clip 1.0,
    iterations 0..iters (nanoGPT's loop runs ``max_iters + 1`` steps), ``loss.item()`` and a printed line
    every step (log_interval=1), an evaluation every ``--eval-interval`` iterations (iteration 0 included)
    on ``--eval-iters`` random batches of *each* split, and ``torch.save`` of model + optimizer whenever
    the validation loss improves. Data preparation (nanoGPT's ``prepare.py``) is done before timing.
(b) ``scratchlm``: ``scratchlm train configs/nanogpt-shakespeare-char.yaml`` with ``train.max_steps`` and
    ``eval.interval`` scaled like (a). Its tokenizer and shards are made (cached) before timing, as (a)'s.

Both run as subprocesses, one after the other, in alternating order round by round (the shared machine's
speed drifts within minutes; a ratio is the median of per-round ratios, each from two runs that saw about
the same load). Per run:

- ``wall_to_ckpt_s``: from launching the command to the modification time of its last checkpoint write
  (a: ``ckpt.pt``; b: ``checkpoints/LATEST``); ``wall_to_exit_s``: to the process' exit (b also prints a
  sample and draws plots after its last checkpoint).
- ``step_tokens_per_s``: training tokens / seconds inside optimizer steps (evaluations excluded): (a) times
  its steps itself, (b) from ``tokens_per_s`` in metrics.jsonl.
- ``val_loss_last_eval``: the run's own last evaluation (a: 20 random batches; b: 20 sequential batches);
  ``val_loss_full``: the last checkpoint scored after the run, the same way for both: mean cross-entropy
  over every non-overlapping 64-character window of its validation split (the last 10% of the text).

Ratios (> 1: ScratchLM ahead): ``wall_ratio`` = nanoGPT wall / ScratchLM wall (to the last checkpoint),
``step_ratio`` = ScratchLM step tokens/s / nanoGPT step tokens/s. Writes
benchmarks/results/nanogpt_recipe.{json,md} (``--out DIR`` elsewhere) with the machine and the load
average around each run. The outside check runs nanoGPT's own train.py with the command above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "nanogpt-shakespeare-char.yaml"
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4, warmup=100
)


# ----------------------------------------------------------------------------------------------------------
# (a) nanoGPT's recipe as a plain eager loop (runs in a subprocess: ``--worker nanogpt``)


def nanogpt_prepare(text_path: Path, out: Path) -> None:
    """nanoGPT's data/shakespeare_char/prepare.py: sorted characters, first 90% train, last 10% val, uint16."""
    import numpy as np

    text = text_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    out.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16).tofile(out / "train.bin")
    np.array([stoi[c] for c in text[int(n * 0.9) :]], dtype=np.uint16).tofile(out / "val.bin")
    (out / "meta.json").write_text(json.dumps({"vocab_size": len(chars)}))


def nanogpt_model(vocab_size: int):
    """nanoGPT's model.py (bias=False, dropout 0), shortened: returns the GPT module."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    L, H, C, T = NANOGPT["n_layer"], NANOGPT["n_head"], NANOGPT["n_embd"], NANOGPT["block_size"]

    class LayerNorm(nn.Module):  # LayerNorm with an optional bias (here: none)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(C))

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)

        def forward(self, x):
            B, Tx, _ = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, Tx, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, Tx, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = LayerNorm(), Attention(), LayerNorm()
            self.c_fc, self.gelu = nn.Linear(C, 4 * C, bias=False), nn.GELU()
            self.mlp_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab_size, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f, self.lm_head = LayerNorm(), nn.Linear(C, vocab_size, bias=False)
            self.wte.weight = self.lm_head.weight  # weight tying
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
            for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
                if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * L))

        def forward(self, idx, targets):
            pos = torch.arange(idx.size(1), dtype=torch.long)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )

    return GPT()


def nanogpt_worker(args: argparse.Namespace) -> None:
    """nanoGPT's train.py main loop on ``args.data_dir``; writes ``args.run_dir/{ckpt.pt,summary.json}``."""
    import numpy as np
    import torch

    started = time.time()
    torch.manual_seed(args.seed)
    T, B, it_max = NANOGPT["block_size"], NANOGPT["batch_size"], args.iters
    data_dir, out = Path(args.data_dir), Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)

    def get_batch(split):
        data = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    model = nanogpt_model(vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=NANOGPT["lr"], betas=(0.9, 0.99))  # nanoGPT: fused on CUDA only

    def get_lr(it):
        lr, min_lr, warmup = NANOGPT["lr"], NANOGPT["min_lr"], NANOGPT["warmup"]
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > it_max:
            return min_lr
        ratio = (it - warmup) / (it_max - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_loss():
        out_losses = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
            out_losses[split] = losses.mean().item()
        model.train()
        return out_losses

    X, Y = get_batch("train")
    best_val, it, last_val = 1e9, 0, None
    step_time, eval_time, ckpt_time, steps = 0.0, 0.0, 0.0, 0
    first_step = None
    t0 = time.time()
    while True:
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % args.eval_interval == 0:
            te = time.perf_counter()
            losses = estimate_loss()
            last_val = losses["val"]
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            eval_time += time.perf_counter() - te
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    tc = time.perf_counter()
                    checkpoint = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "model_args": dict(NANOGPT, vocab_size=vocab),
                        "iter_num": it,
                        "best_val_loss": best_val,
                    }
                    torch.save(checkpoint, out / "ckpt.pt")
                    ckpt_time += time.perf_counter() - tc
        ts = time.perf_counter()
        _, loss = model(X, Y)
        X, Y = get_batch("train")  # the next batch while... (nanoGPT's order; synchronous on a CPU)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lossf = loss.item()
        dt = time.perf_counter() - ts
        step_time += dt
        steps += 1
        first_step = first_step if first_step is not None else dt
        t1 = time.time()
        print(f"iter {it}: loss {lossf:.4f}, time {(t1 - t0) * 1000:.2f}ms")
        t0 = t1
        it += 1
        if it > it_max:
            break
    summary = {
        "steps": steps,
        "tokens": steps * B * T,
        "step_time_s": step_time,
        "first_step_s": first_step,
        "eval_time_s": eval_time,
        "ckpt_time_s": ckpt_time,
        "val_loss_last_eval": last_val,
        "process_s": time.time() - started,
        "threads": torch.get_num_threads(),
    }
    (out / "summary.json").write_text(json.dumps(summary))


# ----------------------------------------------------------------------------------------------------------
# scoring (after the timed runs, the same for both)


def full_val_loss(model, val, T: int = 64, batch: int = 16) -> float:
    """Mean cross-entropy of ``model`` over every non-overlapping window of the 1-D id tensor ``val``."""
    import torch

    n = (len(val) - 1) // T
    x, y = val[: n * T].view(n, T), val[1 : n * T + 1].view(n, T)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, batch):
            total += model(x[i : i + batch], y[i : i + batch])[1].item() * y[i : i + batch].numel()
    return total / y.numel()


def score_nanogpt(run_dir: Path, data_dir: Path) -> float:
    import numpy as np
    import torch

    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model = nanogpt_model(ckpt["model_args"]["vocab_size"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    val = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64))
    return full_val_loss(model, val)


def score_scratchlm(run_dir: Path) -> float:
    import numpy as np
    import torch

    from scratchlm.config import load_run_config
    from scratchlm.model import build_model
    from scratchlm.train.checkpoint import find_checkpoint, load_model_state

    cfg = load_run_config(run_dir)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(find_checkpoint(run_dir, "latest")))
    model.eval()
    meta = json.loads((Path(cfg.data.data_dir) / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    val = np.concatenate(
        [np.fromfile(p, dtype=dtype) for p in sorted(Path(cfg.data.data_dir).glob("val_*.bin"))]
    )
    return full_val_loss(model, torch.from_numpy(val.astype(np.int64)), cfg.model.context_length)


def scratchlm_step_stats(run_dir: Path) -> dict:
    """Training tokens and seconds inside steps from metrics.jsonl (each train record covers the steps since
    the previous one at ``tokens_per_s``), the last evaluation's val loss and the loop's elapsed time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    seconds, prev_tokens = 0.0, 0
    for r in train:
        seconds += (r["tokens"] - prev_tokens) / r["tokens_per_s"]
        prev_tokens = r["tokens"]
    return {
        "steps": train[-1]["step"] if train else 0,
        "tokens": prev_tokens,
        "step_time_s": seconds,
        "first_step_s": train[0]["tokens"] / train[0]["tokens_per_s"] if train else None,
        "loop_elapsed_s": max([r.get("time", 0.0) for r in records if "time" in r], default=None),
        "val_loss_last_eval": evals[-1]["val_loss"] if evals else None,
    }


# ----------------------------------------------------------------------------------------------------------
# the benchmark


def machine() -> dict:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
    }


def timed(cmd: list[str], env: dict, log: Path, ckpt_file: Path) -> dict:
    """Run ``cmd``; seconds to its exit and to ``ckpt_file``'s last modification, load averages around it."""
    load_before = os.getloadavg()[0]
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    if not ckpt_file.exists():
        sys.exit(f"error: {' '.join(cmd)} wrote no checkpoint {ckpt_file}; see {log}")
    return {
        "wall_to_ckpt_s": ckpt_file.stat().st_mtime - start,
        "wall_to_exit_s": end - start,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0],
    }


def run_nanogpt(args, work: Path, data_dir: Path, env: dict, tag: str, peer: str = "nanogpt") -> dict:
    run_dir = work / f"{peer}-{tag}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "nanogpt", "--data-dir", str(data_dir)]
    cmd += ["--run-dir", str(run_dir), "--iters", str(args.iters), "--eval-interval", str(args.eval_interval)]
    cmd += ["--eval-iters", str(args.eval_iters), "--seed", str(args.seed)]
    row = {"peer": peer, **timed(cmd, env, work / f"{peer}-{tag}.log", run_dir / "ckpt.pt")}
    row.update(json.loads((run_dir / "summary.json").read_text()))
    row["val_loss_full"] = score_nanogpt(run_dir, data_dir)
    return row


def profile_step(out: Path, steps: int = 20, timed: int = 100, warmup: int = 30) -> dict[str, float]:
    """Where one ScratchLM training step of this recipe goes, by operator (torch.profiler's self CPU time):
    the matrix products (mm/addmm/bmm: the floor both sides share, as nanoGPT runs the same shapes), the
    attention kernel, GELU, LayerNorm, AdamW and the rest. Random tokens, the config's model, optimizer and
    clipping; fp32 on torch's default threads. Returns {where: ms per step} (the table's rows)."""
    import torch
    from torch.profiler import profile

    from scratchlm.config import load_config
    from scratchlm.model import build_model
    from scratchlm.train.optim import build_optimizers

    cfg = load_config(CONFIG, [f"data.source={DATA}"])
    cfg.model.vocab_size = 65  # Tiny Shakespeare's characters
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizers = build_optimizers(model, cfg.train)
    B, T = cfg.train.batch_size, cfg.model.context_length
    x, y = torch.randint(0, 65, (B, T)), torch.randint(0, 65, (B, T))

    def step() -> None:
        _, loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    ms = (time.perf_counter() - start) * 1000 / timed
    with profile() as prof:
        for _ in range(steps):
            step()
    per_op = {e.key: e.self_cpu_time_total / steps / 1000 for e in prof.key_averages()}  # ms per step
    total = sum(per_op.values())
    groups = {
        "matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
        "attention (SDPA, forward + backward)": tuple(k for k in per_op if "scaled_dot_product" in k),
        "GELU (exact, forward + backward)": ("aten::gelu", "aten::gelu_backward"),
        "LayerNorm (forward + backward)": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
        "AdamW (fused)": ("aten::_fused_adamw_",),
    }
    rows = [(name, sum(per_op.get(k, 0.0) for k in keys)) for name, keys in groups.items()]
    rows.append(("the rest (elementwise, clipping, autograd, views)", total - sum(ms_ for _, ms_ in rows)))
    n_mm = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    gflop = 6 * n_mm * B * T / 1e9  # forward + backward of every matrix product but attention's
    mm_ms = rows[0][1]
    lines = [
        "# ScratchLM's training step on nanoGPT's CPU recipe, by operator",
        "",
        "Command: `python benchmarks/nanogpt_recipe.py --profile-step`  ",
        f"Machine: {machine()['cpu']}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; load average (1 min) {os.getloadavg()[0]:.1f}  ",
        f"Step: batch {B} x {T}, {cfg.model.n_layer} layers x {cfg.model.d_model}, fp32, forward + backward + "
        f"clipping + AdamW; {ms:.1f} ms per step timed over {timed} steps, profiled over {steps}.",
        "",
        "| where | ms per step | share |",
        "|---|---:|---:|",
        *(f"| {name} | {t:.1f} | {t / total:.0%} |" for name, t in rows),
        f"| **profiled total** | **{total:.1f}** | |",
        "",
        f"The matrix products do {gflop:.2f} GFLOP a step: {gflop / mm_ms * 1e3:.0f} GFLOP/s. nanoGPT's loop "
        "runs the same products, so they bound both; a step cannot be faster than them.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return dict(rows)


def scratchlm_overrides(args, run_dir: Path) -> list[str]:
    return [
        f"train.max_steps={args.iters}",
        f"eval.interval={args.eval_interval}",
        f"eval.batches={args.eval_iters}",
        f"data.source={args.data}",
        f"train.run_dir={run_dir}",
        "train.progress=false",
        f"train.seed={args.seed}",
        *args.scratchlm_override,
    ]


def run_scratchlm(args, work: Path, env: dict, tag: str) -> dict:
    run_dir = work / f"scratchlm-{tag}"
    cmd = [sys.executable, "-m", "scratchlm", "train", str(CONFIG), *scratchlm_overrides(args, run_dir)]
    row = {
        "peer": "scratchlm",
        **timed(cmd, env, work / f"scratchlm-{tag}.log", run_dir / "checkpoints" / "LATEST"),
    }
    row.update(scratchlm_step_stats(run_dir))
    note = [x for x in (work / f"scratchlm-{tag}.log").read_text().splitlines() if x.startswith("threads: ")]
    row["threads"] = int(note[0].split()[1]) if note else int(env.get("OMP_NUM_THREADS") or default_threads())
    row["val_loss_full"] = score_scratchlm(run_dir)
    return row


def default_threads() -> int:
    import torch

    return torch.get_num_threads()


def prepare_scratchlm(args, env: dict) -> None:
    """Train the char tokenizer and write the shards into the benchmark's cache (untimed, like prepare.py)."""
    os.environ["SCRATCHLM_CACHE"] = env["SCRATCHLM_CACHE"]
    from scratchlm.config import load_config
    from scratchlm.pipeline import get_shards, get_tokenizer, training_sources

    cfg = load_config(CONFIG, scratchlm_overrides(args, Path(env["SCRATCHLM_CACHE"]) / "unused"))
    sources = training_sources(cfg)
    get_shards(cfg, get_tokenizer(cfg, sources, progress=False), sources, progress=False)


def summarize(rows: list[dict], rounds: int) -> dict:
    def med(peer, key):
        vals = [r[key] for r in rows if r["peer"] == peer and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    wall, exit_, step = [], [], []
    for r in range(rounds):
        a = next(x for x in rows if x["round"] == r and x["peer"] == "nanogpt")
        b = next(x for x in rows if x["round"] == r and x["peer"] == "scratchlm")
        wall.append(a["wall_to_ckpt_s"] / b["wall_to_ckpt_s"])
        exit_.append(a["wall_to_exit_s"] / b["wall_to_exit_s"])
        step.append((b["tokens"] / b["step_time_s"]) / (a["tokens"] / a["step_time_s"]))
    same = []  # against the nanoGPT loop on 1 thread (--one-thread-peer), when ScratchLM also used 1
    for r in range(rounds):
        a = [x for x in rows if x["round"] == r and x["peer"] == "nanogpt_1thread"]
        b = next(x for x in rows if x["round"] == r and x["peer"] == "scratchlm")
        if a:
            same.append(a[0]["wall_to_ckpt_s"] / b["wall_to_ckpt_s"])
    extra = (
        {"wall_ratio_vs_1thread": statistics.median(same), "wall_ratio_vs_1thread_rounds": same}
        if same
        else {}
    )
    return {
        **extra,
        "wall_ratio": statistics.median(wall),
        "wall_ratio_rounds": wall,
        "exit_ratio": statistics.median(exit_),
        "step_ratio": statistics.median(step),
        "step_ratio_rounds": step,
        **{
            f"{peer}_{key}": med(peer, key)
            for peer in ("nanogpt", "scratchlm", "nanogpt_1thread")
            for key in ("wall_to_ckpt_s", "wall_to_exit_s", "val_loss_full", "val_loss_last_eval")
        },
    }


def write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "nanogpt_recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    s, m = result["summary"], result["machine"]
    lines = [
        "# Training wall to wall: nanoGPT's CPU recipe, plain eager PyTorch vs `scratchlm train`",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}  ",
        f"Load average (1 min) around the runs: {result['load_avg_min']:.1f} to {result['load_avg_max']:.1f}"
        f" on {m['cores']} cores. {result['load_note']}",
        "",
        f"Recipe: {result['iters']} iterations, batch 12 x 64, 4 layers x 128, AdamW 1e-3 warmup + cosine, "
        f"evaluation every {result['eval_interval']} on {result['eval_iters']} batches, a checkpoint at each "
        "improving evaluation. ScratchLM: `scratchlm train configs/nanogpt-shakespeare-char.yaml` + "
        f"`{' '.join(result['scratchlm_overrides'])}`.",
        "",
        f"**Wall to wall (to the last checkpoint): ScratchLM {s['wall_ratio']:.2f}x nanoGPT** "
        f"(per round: {', '.join(f'{x:.2f}' for x in s['wall_ratio_rounds'])}; to process exit "
        f"{s['exit_ratio']:.2f}x). **Per step: {s['step_ratio']:.2f}x** "
        f"(per round: {', '.join(f'{x:.2f}' for x in s['step_ratio_rounds'])}). > 1 = ScratchLM faster."
        + (
            f" Against the nanoGPT loop on 1 thread (nanogpt_1thread): {s['wall_ratio_vs_1thread']:.2f}x "
            "wall to wall."
            if "wall_ratio_vs_1thread" in s
            else ""
        ),
        "",
        "| round | run | wall to last ckpt (s) | wall to exit (s) | step tokens/s | first step (s) | steps "
        "| val loss (last eval) | val loss (whole val split) | threads | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['round']} | {r['peer']} | {r['wall_to_ckpt_s']:.1f} | {r['wall_to_exit_s']:.1f} "
            f"| {r['tokens'] / r['step_time_s']:,.0f} | {r['first_step_s'] or 0:.2f} | {r['steps']} "
            f"| {r['val_loss_last_eval']:.4f} | {r['val_loss_full']:.4f} | {r.get('threads', '?')} "
            f"| {r['load_avg_before']:.1f} / {r['load_avg_after']:.1f} |"
        )
    lines += ["", result["notes"], ""]
    (out / "nanogpt_recipe.md").write_text("\n".join(lines))


NOTES = (
    "Notes: the two val losses of the last evaluation are estimated differently (nanoGPT: 20 random "
    "batches; ScratchLM: 20 fixed sequential batches); compare the whole-split column, scored the same way "
    "after the runs. nanoGPT evaluates both splits (20 batches each) and at iteration 0 and runs "
    "iters + 1 steps; ScratchLM evaluates the validation split only (its train loss is the running mean of "
    "the steps) and runs iters steps. ScratchLM's 'threads' is its run's thread count (train.threads: "
    "torch's default unless the config says otherwise, docs/training.md#cpu-threads); nanoGPT uses torch's "
    "default (one per core)."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--iters", type=int, default=2000, help="nanoGPT max_iters / lr_decay_iters (train.max_steps)"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs both)")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20, help="batches per split and evaluation")
    p.add_argument("--data", type=Path, default=DATA, help="the text (Tiny Shakespeare)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument(
        "--one-thread-peer",
        action="store_true",
        help="also run the nanoGPT loop with OMP_NUM_THREADS=1 (separates the thread count from the rest)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1337,
        help="torch seed of both runs (nanoGPT's and ScratchLM's default: 1337); another seed measures how "
        "far the validation losses move from seed to seed",
    )
    p.add_argument("--scratchlm-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--profile-step",
        action="store_true",
        help="instead of the runs: profile ScratchLM's training step on this recipe (torch.profiler, by "
        "operator) and write nanogpt_step_profile.md",
    )
    p.add_argument("--worker", choices=["nanogpt"], help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "nanogpt":
        nanogpt_worker(args)
        return 0
    if args.profile_step:
        profile_step(args.out / "nanogpt_step_profile.md")
        return 0
    if not args.data.is_file():
        sys.exit(f"error: {args.data} not found; pass --data PATH to Tiny Shakespeare (../shared/data)")
    args.data = args.data.resolve()
    with tempfile.TemporaryDirectory(prefix="nanogpt_recipe_") as tmp:
        work = Path(tmp)
        env = dict(os.environ, SCRATCHLM_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
        nanogpt_prepare(args.data, work / "nanogpt-data")
        prepare_scratchlm(args, env)
        rows = []
        for r in range(args.rounds):
            order = ("nanogpt", "scratchlm") if r % 2 == 0 else ("scratchlm", "nanogpt")
            if args.one_thread_peer:
                order = (*order, "nanogpt_1thread") if r % 2 == 0 else ("nanogpt_1thread", *order)
            for peer in order:
                if peer == "nanogpt_1thread":
                    env1 = dict(env, OMP_NUM_THREADS="1")
                    row = run_nanogpt(args, work, work / "nanogpt-data", env1, str(r), peer)
                elif peer == "nanogpt":
                    row = run_nanogpt(args, work, work / "nanogpt-data", env, str(r))
                else:
                    row = run_scratchlm(args, work, env, str(r))
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), flush=True)
    loads = [x for r in rows for x in (r["load_avg_before"], r["load_avg_after"])]
    cores = os.cpu_count() or 1
    own = max(r["threads"] for r in rows)  # each run alone keeps this many cores busy: its own load
    under_load = max(loads) > own + 0.5 * cores
    result = {
        "benchmark": "nanogpt_recipe",
        "command": "python benchmarks/nanogpt_recipe.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "iters": args.iters,
        "rounds": args.rounds,
        "eval_interval": args.eval_interval,
        "eval_iters": args.eval_iters,
        "scratchlm_overrides": [o for o in scratchlm_overrides(args, Path("RUN")) if "run_dir" not in o],
        "load_avg_min": min(loads),
        "load_avg_max": max(loads),
        "measured_under_load": under_load,
        "load_note": (
            "Measured under load (other jobs shared the cores): absolute times are not this machine's "
            "speed and even ratios are noisy."
            if under_load
            else f"The machine was otherwise idle (the load averages count the runs' own {own} threads)."
        ),
        "summary": summarize(rows, args.rounds),
        "runs": rows,
        "notes": NOTES,
    }
    write_results(args.out, result)
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
