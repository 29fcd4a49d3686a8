"""Fine-tuning on a CPU: pretrain a small GPT on the built-in corpus, fine-tune it on Tiny Shakespeare.

    python benchmarks/finetune.py                     # pretrain 300 steps, then fine-tune vs scratch 150 steps
    python benchmarks/finetune.py --pretrain-steps 1000 --steps 300   # a longer look
    python benchmarks/finetune.py --lora-vs-full      # LoRA vs full fine-tuning in the same wall time (~4 min)

No pretrained weights can be downloaded here, so the "pretrained model" is made by ScratchLM itself: a 2-layer
GPT-2 style model (learned positions, LayerNorm, GELU, no biases: the shakespeare-char shape) trained on the
built-in corpus (Python's standard library source). Then, in the same run and with the same tokenizer:

- **fine-tune**: ``scratchlm finetune`` defaults (the ``finetune`` preset: peak lr 1e-4, 10 warmup steps,
  no weight decay, early stopping), starting from the pretrained weights;
- **peer: from scratch**: the same model trained from random weights on the same data for the same number of
  steps with a from-scratch recipe (peak lr 2e-3, 50 warmup steps).

Validation loss (nats per token, mean over the same 10 validation batches of 8x64 tokens of Tiny Shakespeare) is measured
before training (step 0) and every 25 steps; samples from the prompt ``ROMEO:`` are written before and after.
The fine-tuned run is then exported to the HF format and reloaded in transformers (max |logit difference|).
Writes benchmarks/results/finetune.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

MODEL = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.d_model=128",
    "model.context_length=64",
    "model.pos=learned",
    "model.norm=layernorm",
    "model.mlp=gelu",
    "model.bias=false",
]
COMMON = [
    "train.batch_size=8",
    "train.dtype=float32",
    "train.device=cpu",
    "train.progress=false",
    "eval.batches=10",
    "eval.num_samples=0",
]


def val_loss_of(run_dir: Path, data_dir: str, which: str = "latest") -> float:
    """Mean loss of a run's weights over the first 10 sequential validation batches of ``data_dir``."""
    from scratchlm.api import load
    from scratchlm.data.loader import TokenLoader
    from scratchlm.train.evaluate import evaluate

    lm = load(run_dir, which=which, device="cpu")
    T = lm.config.model.context_length

    def loader():
        return TokenLoader(data_dir, split="val", batch_size=8, context_length=T, mode="sequential")

    return evaluate(lm.model, loader, 10, torch.device("cpu"), torch.float32)


def sample(run_dir: Path, which: str = "latest") -> str:
    from scratchlm.api import load

    lm = load(run_dir, which=which, device="cpu")
    return "ROMEO:" + lm.generate("ROMEO:", max_new_tokens=48, temperature=0.8, top_k=50, seed=0)


def train(overrides: list[str]) -> tuple[dict, float]:
    from scratchlm.config import load_config
    from scratchlm.pipeline import run

    cfg = load_config(None, overrides)
    t0 = time.time()
    result = run(cfg, progress=False)
    return result, time.time() - t0


def curve(run_dir: Path) -> list[tuple[int, float]]:
    from scratchlm.train.metrics import read_metrics

    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if r.get("kind") == "eval"]


def export_check(run_dir: Path, out: Path) -> float | None:
    """Export the run to the HF format and return max |logits(transformers) - logits(ScratchLM)|."""
    try:
        import transformers
    except ImportError:
        return None
    from scratchlm.api import load
    from scratchlm.model.hf import export_hf

    lm = load(run_dir, which="latest", device="cpu")
    export_hf(lm.model, out, tokenizer=lm.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.tensor([lm.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")])
    with torch.no_grad():
        return (hf(idx).logits - lm.model(idx)[0]).abs().max().item()


def plot(rows: dict, before: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in rows.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o", markersize=3, label=name)
    ax.axhline(before, color="grey", linestyle=":", label=f"pretrained, before fine-tuning ({before:.2f})")
    ax.set_xlabel("optimizer step on Tiny Shakespeare")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from shakespeare_quality import machine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning (and from-scratch) steps")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default="finetune", help="results file stem")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scratchlm-finetune-") as tmp:
        tmp = Path(tmp)
        pre, pre_wall = train(
            [
                *MODEL,
                *COMMON,
                "tokenizer.vocab_size=1024",
                f"train.run_dir={tmp / 'pretrained'}",
                f"train.max_steps={args.pretrain_steps}",
                "train.lr=2e-3",
                "train.min_lr=2e-4",
                "train.warmup_steps=50",
                f"eval.interval={args.pretrain_steps}",
            ]
        )
        pretrained = Path(pre["run_dir"])
        shared = ["data.source=" + args.data, f"train.max_steps={args.steps}", "eval.interval=25"]
        ft, ft_wall = train(
            [
                "preset=finetune",
                *COMMON,
                *shared,
                f"train.init_from={pretrained}",
                f"train.run_dir={tmp / 'finetuned'}",
                "train.early_stopping_patience=None",  # the comparison runs the same number of steps
            ]
        )
        finetuned = Path(ft["run_dir"])
        from scratchlm.config import load_run_config

        data_dir = load_run_config(finetuned).data.data_dir
        sc, sc_wall = train(
            [
                *MODEL,
                *COMMON,
                *shared,
                f"tokenizer.path={pretrained / 'tokenizer.json'}",
                f"train.run_dir={tmp / 'scratch'}",
                "train.lr=2e-3",
                "train.min_lr=2e-4",
                "train.warmup_steps=50",
            ]
        )
        scratch = Path(sc["run_dir"])
        before = val_loss_of(pretrained, data_dir)
        samples = {"pretrained (before)": sample(pretrained), "fine-tuned": sample(finetuned)}
        samples["from scratch"] = sample(scratch)
        max_diff = export_check(finetuned, tmp / "hf")
        rows = {
            f"fine-tuned from the pretrained model ({args.steps} steps, finetune preset)": curve(finetuned),
            f"from scratch ({args.steps} steps, lr 2e-3)": curve(scratch),
        }
        scratch_curve = curve(scratch)
        report = {
            "benchmark": "finetune",
            "machine": machine(),
            "pretrain": {"steps": pre["step"], "val_loss_builtin": pre["val_loss"], "wall_s": pre_wall},
            "val_loss_before": before,
            "finetuned": {
                "val_loss_after": ft["val_loss"],
                "best_val_loss": ft["best_val_loss"],
                "steps": ft["step"],
                "wall_s": ft_wall,
                "curve": curve(finetuned),
            },
            "scratch": {
                "val_loss_after": sc["val_loss"],
                "best_val_loss": sc["best_val_loss"],
                "steps": sc["step"],
                "wall_s": sc_wall,
                "curve": scratch_curve,
            },
            "export_max_abs_logit_diff": max_diff,
            "samples": samples,
            "command": "python benchmarks/finetune.py"
            + (
                ""
                if (args.pretrain_steps, args.steps) == (300, 150)
                else f" --pretrain-steps {args.pretrain_steps} --steps {args.steps}"
            ),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"Tiny Shakespeare: fine-tuning a 2-layer GPT pretrained {args.pretrain_steps} steps on the built-in "
        f"corpus\nvs the same model from scratch ({report['machine']['cpu'][:40]}, "
        f"{report['machine']['cores']} cores)"
    )
    plot(rows, before, RESULTS / f"{args.out}.png", title)
    m = report["machine"]
    lines = [
        "# Fine-tuning on a CPU: built-in corpus -> Tiny Shakespeare",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average {m['load_avg_1m']:.1f} "
        "(a shared machine: wall times are noisy)",
        "",
        f"Pretrained model: 2 layers, 4 heads, d_model 128, context 64, GPT-2 style without biases, BPE 1024; "
        f"{pre['step']} steps of 8x64 tokens on the built-in corpus (val loss there {pre['val_loss']:.3f}).",
        "",
        "| run | val loss before | val loss after | best val loss | steps | wall (s) |",
        "|---|---|---|---|---|---|",
        f"| fine-tuned (`scratchlm finetune` defaults) | {before:.3f} | {ft['val_loss']:.3f} | "
        f"{ft['best_val_loss']:.3f} | {ft['step']} | {ft_wall:.0f} |",
        f"| from scratch (lr 2e-3, same model and tokenizer) | - | {sc['val_loss']:.3f} | "
        f"{sc['best_val_loss']:.3f} | {sc['step']} | {sc_wall:.0f} |",
        "",
        f"Validation loss: nats per token over the same 10 batches of 8x64 tokens of the Tiny Shakespeare "
        f"validation split. Export check: the fine-tuned run exported to the HF format and reloaded in "
        f"transformers gives logits within {max_diff:.1e} of ScratchLM's."
        if max_diff is not None
        else "",
        "",
        f"![validation loss]({args.out}.png)",
        "",
        "Samples (prompt `ROMEO:`, temperature 0.8, top-k 50, seed 0):",
        "",
    ]
    for name, text in samples.items():
        lines += [f"**{name}**", "", "```", text.strip(), "```", ""]
    md = RESULTS / f"{args.out}.md"
    kept = _lora_block(md.read_text()) if md.is_file() else ""  # the LoRA section has its own command
    md.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------------------------------------
# LoRA vs full fine-tuning (python benchmarks/finetune.py --lora-vs-full)

LORA_BEGIN, LORA_END = "<!-- lora-vs-full -->", "<!-- /lora-vs-full -->"
MEM_MODEL = [
    "model.n_layer=8",
    "model.n_head=8",
    "model.d_model=512",
    "model.context_length=64",
    "model.pos=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.tie_embeddings=false",
]
LORA_MODEL = [  # small enough for tens of steps per minute on 2 shared CPU cores
    "model.n_layer=4",
    "model.n_head=4",
    "model.d_model=128",
    "model.context_length=64",
    "model.pos=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.tie_embeddings=false",
]
METHODS = {
    "full fine-tuning (`scratchlm finetune`)": [],
    "LoRA r=8, q and v (`scratchlm finetune --lora`)": ["train.lora.rank=8", "train.lr=2e-4"],
    "LoRA r=8, every attention and MLP projection": [
        "train.lora.rank=8",
        "train.lr=2e-4",
        "train.lora.targets=*.attn.*,*.mlp.*",
    ],
}


def _lora_block(text: str) -> str:
    if LORA_BEGIN not in text or LORA_END not in text:
        return ""
    return text[text.index(LORA_BEGIN) : text.index(LORA_END) + len(LORA_END)] + "\n"


def child(overrides: list[str]) -> dict:
    """Run one training in this process (``--child``): the run's summary and this process's peak memory."""
    import resource

    from scratchlm.config import load_config
    from scratchlm.pipeline import run

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run(load_config(None, overrides), progress=False)
    return {
        **{k: result[k] for k in ("run_dir", "step", "tokens", "wall_time", "val_loss")},
        "tokens_per_s": result["tokens"] / result["wall_time"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def parameter_counts(overrides: list[str]) -> tuple[int, int]:
    """(trainable, total) parameters of the model these overrides train (adapters included)."""
    from scratchlm.config import load_config
    from scratchlm.model import build_model
    from scratchlm.train.adapters import add_lora, trainable_parameters

    cfg = load_config(None, overrides)
    if cfg.train.init_from:
        from scratchlm.train.init_from import apply_init_from

        cfg, _ = apply_init_from(cfg)
    model = build_model(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 1024))
    if cfg.train.lora.rank:
        add_lora(model, cfg.train.lora)
    return trainable_parameters(model)


def run_child(overrides: list[str]) -> dict:
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(overrides)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def lora_vs_full(args: argparse.Namespace) -> int:
    """Pretrain a 4-layer Llama-style model on Python source for ``--pretrain-seconds``, then fine-tune it
    on Tiny Shakespeare for ``--seconds`` of training each way (each in its own process, so peak RSS is
    that method's); validation loss of each over the same 10 batches."""
    from scratchlm.corpus import stdlib_root
    from scratchlm.tokenizer import train_bpe_from_iterator
    from shakespeare_quality import machine

    with tempfile.TemporaryDirectory(prefix="scratchlm-lora-") as tmp:
        tmp = Path(tmp)
        files = sorted(p for p in stdlib_root().glob("*.py") if not p.name.startswith("test"))
        code = "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)[:1_000_000]
        (tmp / "code.txt").write_text(code, encoding="utf-8")
        poems = Path(args.data).read_text(encoding="utf-8")
        tok = train_bpe_from_iterator(
            [code[:200_000], poems[:200_000]], 1024, special_tokens=["<|endoftext|>"], progress=False
        )
        tok.save(tmp / "tokenizer.json")
        pre, pre_wall = train(
            [
                *LORA_MODEL,
                *COMMON,
                f"tokenizer.path={tmp / 'tokenizer.json'}",
                f"data.source={tmp / 'code.txt'}",
                f"train.run_dir={tmp / 'pretrained'}",
                "train.max_steps=100000",
                f"train.max_time={args.pretrain_seconds}",
                "train.lr=2e-3",
                "train.min_lr=2e-4",
                "train.warmup_steps=20",
                "eval.interval=100000",
            ]
        )
        shared = [
            "preset=finetune",
            *COMMON,
            f"train.init_from={tmp / 'pretrained'}",
            f"data.source={args.data}",
            "train.max_steps=100000",
            f"train.max_time={args.seconds}",
            "train.early_stopping_patience=None",
            "eval.interval=100000",  # one evaluation, at the end
        ]
        rows = {}
        data_dir = None
        for i, (name, extra) in enumerate(METHODS.items()):
            overrides = [*shared, f"train.run_dir={tmp / f'ft{i}'}", *extra]
            rows[name] = run_child(overrides)
            rows[name]["trainable_params"], rows[name]["total_params"] = parameter_counts(overrides)
            from scratchlm.config import load_run_config

            data_dir = load_run_config(rows[name]["run_dir"]).data.data_dir
            rows[name]["val_loss_10"] = val_loss_of(Path(rows[name]["run_dir"]), data_dir)
            print(name, rows[name], flush=True)
        before = val_loss_of(Path(pre["run_dir"]), data_dir)
        # memory and speed on a larger model, where weights, gradients and AdamW moments dominate memory:
        # 4 steps each from random weights (the base's values change neither)
        big = [*MEM_MODEL, *COMMON, "train.batch_size=4", f"tokenizer.path={tmp / 'tokenizer.json'}"]
        big += [f"data.source={args.data}", "train.max_steps=4", "eval.interval=100000", "eval.batches=1"]
        memory = {}
        for i, (name, extra) in enumerate(METHODS.items()):
            overrides = [*big, f"train.run_dir={tmp / f'mem{i}'}", *extra]
            memory[name] = run_child(overrides)
            memory[name]["trainable_params"], memory[name]["total_params"] = parameter_counts(overrides)
            print(name, memory[name], flush=True)
    m = machine()
    report = {
        "benchmark": "finetune_lora",
        "machine": m,
        "command": "python benchmarks/finetune.py --lora-vs-full"
        + (
            ""
            if (args.seconds, args.pretrain_seconds) == (45, 40)
            else f" --seconds {args.seconds} --pretrain-seconds {args.pretrain_seconds}"
        ),
        "pretrain": {"steps": pre["step"], "wall_s": pre_wall, "val_loss_code": pre["val_loss"]},
        "val_loss_before": before,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "run_dir"} for k, v in rows.items()},
        "memory_runs": {k: {kk: vv for kk, vv in v.items() if kk != "run_dir"} for k, v in memory.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune_lora.json").write_text(json.dumps(report, indent=2) + "\n")
    gpu = any(r["peak_gpu_mb"] for r in memory.values())
    lines = [
        LORA_BEGIN,
        "## LoRA vs full fine-tuning, same model, data and wall time",
        "",
        f"Command: `{report['command']}` (figures: finetune_lora.json)  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average {m['load_avg_1m']:.1f} at the "
        "end: the machine is shared with other jobs, so tokens/s and what fits in the time budget are noisy "
        "(compare the rows with each other, not with other tables).",
        "",
        "Model: Llama style, 4 layers, 4 heads, d_model 128, context 64, BPE 1024, "
        f"{next(iter(rows.values()))['total_params'] / 1e6:.1f}M parameters, pretrained for "
        f"{args.pretrain_seconds:g} s ({pre['step']} steps of 8x64 tokens) on 1 MB of Python standard-library "
        f"source; then fine-tuned on Tiny Shakespeare for {args.seconds:g} s of training each way "
        "(`train.max_time`), each method in its own process, the ScratchLM defaults of each: the `finetune` "
        "preset (AdamW, peak lr 1e-4, 10 warmup steps), and `--lora` (the same with lr 2e-4).",
        "",
        "| method | trainable params | tokens/s | steps | val loss |",
        "|---|---|---|---|---|",
        f"| pretrained, before fine-tuning | - | - | - | {before:.3f} |",
    ]
    for name, r in rows.items():
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} ({share:.2f}%) | {r['tokens_per_s']:,.0f} | {r['step']} | "
            f"{r['val_loss_10']:.3f} |"
        )
    first = next(iter(memory.values()))
    lines += [
        "",
        f"Memory and speed, on a larger model where the weights dominate memory: Llama style, 8 layers, 8 heads, "
        f"d_model 512, context 64, {first['total_params'] / 1e6:.1f}M parameters, batch 4x64, 4 steps each "
        "from random weights, each method in its own process:",
        "",
        "| method | trainable params | peak RSS (MB) | " + ("peak GPU (MB) | " if gpu else "") + "tokens/s |",
        "|---|---|---|" + ("---|" if gpu else "") + "---|",
    ]
    for name, r in memory.items():
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} ({share:.2f}%) | {r['peak_rss_mb']:.0f} | "
            + (f"{r['peak_gpu_mb']:.0f} | " if gpu else "")
            + f"{r['tokens_per_s']:,.0f} |"
        )
    lines += [
        "",
        "Validation loss: nats per token over the same 10 batches of 8x64 tokens of the Tiny Shakespeare "
        "validation split (the LoRA runs merged into their base). Peak RSS is the whole fine-tuning process "
        "(Python, torch, data, evaluation included), so the difference between rows is what the method "
        "changes: gradients and AdamW moments for every weight (full) or for the adapters only (LoRA).",
        LORA_END,
        "",
    ]
    md = RESULTS / "finetune.md"
    text = md.read_text() if md.is_file() else ""
    block = _lora_block(text)
    md.write_text(
        text.replace(block, "\n".join(lines)) if block else text.rstrip("\n") + "\n\n" + "\n".join(lines)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    if "--lora-vs-full" in sys.argv:
        q = argparse.ArgumentParser(description="LoRA vs full fine-tuning in the same wall time")
        q.add_argument("--lora-vs-full", action="store_true")
        q.add_argument("--seconds", type=float, default=45, help="training seconds of each fine-tuning")
        q.add_argument("--pretrain-seconds", type=float, default=40)
        q.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
        sys.exit(lora_vs_full(q.parse_args()))
    sys.exit(main())
