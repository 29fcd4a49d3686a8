"""Training telemetry: console progress bar, metrics.jsonl, TensorBoard, PNG plots.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "loss", "lr", "grad_norm",
"tokens", "tokens_per_s", "mfu", "time"}`` every ``train.log_interval`` steps and ``{"kind": "eval", "step",
"val_loss", "val_ppl", "val_bpb"?, "val_acc_top1", "val_acc_top5", "train_loss"?, "train_ppl"?,
"epoch"?, "val_bleu"?, "val_chrf"?, "tokens", "time"}`` at each evaluation (``train/validation.py``),
and ``{"kind": "stop", "step", "reason", "detail"}`` when the run ends (train/stopping.py). It is the
single source for the plots; TensorBoard files (``train.tensorboard``) carry the same scalars.

MFU (model FLOPs utilisation) = ``flops_per_token * tokens_per_s / peak_flops``, where ``flops_per_token`` is
the model's forward+backward count (6N + attention, PaLM appendix B) and the peak is the device's dense
bf16/fp16 tensor-core figure from :data:`PEAK_FLOPS` (fp32: the TF32 figure). CPUs have no reliable
published peak, so MFU is reported as ``n/a`` there unless ``SCRATCHLM_PEAK_FLOPS`` gives one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from scratchlm import fileio

# dense (no sparsity) peak FLOP/s by device-name substring: (bf16/fp16, fp32 via TF32)
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),  # SXM
    "A100": (312e12, 156e12),
    "A10G": (125e12, 62.5e12),
    "L4": (121e12, 60e12),
    "L40S": (362e12, 183e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of ``device`` at ``dtype`` from :data:`PEAK_FLOPS`, or None when unknown (CPU, MPS).

    ``SCRATCHLM_PEAK_FLOPS`` (a number, e.g. ``2e12``) overrides the table, e.g. for a CPU's nominal peak.
    """
    if os.environ.get("SCRATCHLM_PEAK_FLOPS"):
        return float(os.environ["SCRATCHLM_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, fp32) in PEAK_FLOPS.items():
        if key in name:
            return fp32 if dtype == torch.float32 else half
    return None


class MetricsLogger:
    """Writes records to metrics.jsonl (+ TensorBoard) and drives the tqdm progress bar.

    ``enabled=False`` (every rank but 0 of a multi-process run) makes every method a no-op. With
    ``max_time`` (a run whose schedule follows the wall clock) the bar counts training seconds, not steps.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_steps: int,
        start_step: int,
        progress: bool,
        tensorboard: bool,
        enabled: bool = True,
        max_time: float | None = None,
        start_time: float = 0.0,
    ):
        self.enabled = enabled
        if not enabled:
            return
        from scratchlm.console import is_terminal

        # a bar only for a person at a terminal; in a log file one plain line per log interval instead
        progress = progress and is_terminal()
        self.progress, self.max_steps, self.max_time = progress, max_steps, max_time
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard") if tensorboard else None
        from tqdm.auto import tqdm

        by_time = max_time is not None
        self.bar = tqdm(
            total=round(max_time) if by_time else max_steps,
            initial=min(round(start_time), round(max_time)) if by_time else start_step,
            disable=not progress,
            unit="s" if by_time else "step",
            # seconds of training out of max_time (the step count is in the loss line)
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
            if by_time
            else None,
            dynamic_ncols=True,
            leave=True,
            mininterval=0.1,
        )

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (needs ``kind`` and ``step``) and show it on the bar."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, int | float) and v is not None:
                    self.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])
        if record["kind"] == "train":
            mfu = record.get("mfu")
            line = (
                f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm {record['grad_norm']:.2f} "
                f"tok/s {record['tokens_per_s']:,.0f} mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
            )
            if self.progress:  # a bar of seconds does not show the step: the line does
                self.bar.set_postfix_str(
                    f"step {record['step']} {line}" if self.max_time else line, refresh=False
                )
            else:  # no bar to carry it: one line per log interval
                of = (
                    f" ({record['time']:.0f}/{self.max_time:.0f} s)"
                    if self.max_time
                    else f"/{self.max_steps}"
                )
                self.bar.write(f"step {record['step']}{of}: {line}")
        elif record["kind"] == "eval":
            self.bar.write(eval_line(record))
        elif record["kind"] == "stop":
            self.bar.write(f"stopped: {record['detail']}")

    def advance(self, elapsed: float) -> None:
        """One more step done, ``elapsed`` training seconds so far (the bar's position when it counts time)."""
        if not self.enabled:
            return
        if self.max_time is None:
            self.bar.update(1)
        else:
            self.bar.update(min(round(elapsed), self.bar.total) - self.bar.n)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def start_line(
    cfg: Any,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    run_dir: Path,
    tokens_per_step: int,
) -> str:
    """The one line training starts with (the resolved config is for ``--dry-run`` and ``--verbose``):
    ``training: preset cpu-small | 1,382,528 parameters (...) | 2,048 tokens/step x 100,000 steps = 204.8M
    tokens, or 300 s | cpu, bfloat16 autocast | run dir runs/default``."""
    from scratchlm.model import describe_params

    tc = cfg.train
    up_to = "up to " if cfg.model.arch == "seq2seq" and cfg.data.batch_tokens else ""  # padded token batches
    budget = (
        f"{up_to}{tokens_per_step:,} tokens/step x {tc.max_steps:,} steps = "
        f"{up_to}{_si(tokens_per_step * tc.max_steps)} tokens"
    )
    if tc.max_time:
        budget += f", or {tc.max_time:g} s"
    precision = "float32" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')} autocast"
    return " | ".join(
        [
            f"training: preset {cfg.preset or '(none)'}",
            f"parameters {describe_params(model)}",
            budget,
            f"{device}, {precision}",
            f"run dir {run_dir}",
        ]
    )


def _si(n: float) -> str:
    """1234567 -> '1.23M' (tokens)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:,.0f}"


def format_eval(record: dict[str, Any]) -> str:
    """``val loss 1.8123, ppl 6.12, bpb 1.021, acc top-1 45.2% top-5 71.0%`` (the keys present)."""
    parts = [f"val loss {record['val_loss']:.4f}", f"ppl {record['val_ppl']:.2f}"]
    if record.get("val_bpb") is not None:
        parts.append(f"bpb {record['val_bpb']:.3f}")
    if record.get("val_acc_top1") is not None:
        parts.append(
            f"acc top-1 {100 * record['val_acc_top1']:.1f}% top-5 {100 * record['val_acc_top5']:.1f}%"
        )
    for key, name in (("val_bleu", "BLEU"), ("val_chrf", "chrF")):
        if record.get(key) is not None:
            parts.append(f"{name} {record[key]:.2f}")
    return ", ".join(parts)


def eval_line(record: dict[str, Any]) -> str:
    """The console line of an evaluation: ``step 500 (epoch 3): train loss 2.1 ppl 8.2 | val loss ...``."""
    head = f"step {record['step']}" + (f" (epoch {record['epoch']})" if "epoch" in record else "")
    parts = []
    if "train_loss" in record:
        parts.append(f"train loss {record['train_loss']:.4f} ppl {record['train_ppl']:.2f}")
    return f"{head}: " + " | ".join([*parts, format_eval(record)])


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from scratchlm.errors import ConfigError

        raise ConfigError(
            "train.tensorboard=true needs tensorboard: pip install 'scratchlm[tensorboard]' "
            "(or set train.tensorboard=false)"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


# fields a reader may do arithmetic on, and the text fields: a record holding another type there (an edited
# or damaged file, a record of another tool) has that field dropped, so every reader (plot, report,
# compare, sweep) sees it as missing, never as a KeyError or a TypeError
NUMBER_FIELDS = (
    "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "time", "epoch", "train_loss", "train_ppl",
    "val_loss", "val_ppl", "val_bpb", "val_acc_top1", "val_acc_top5", "val_bleu", "val_chrf",
)  # fmt: skip
TEXT_FIELDS = ("kind", "reason", "detail")


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without the known fields whose value has the wrong type (None stays: "not measured")."""
    bad = [k for k in NUMBER_FIELDS if k in record and record[k] is not None and not _is_number(record[k])]
    bad += [k for k in TEXT_FIELDS if k in record and not isinstance(record[k], str)]
    return {k: v for k, v in record.items() if k not in bad} if bad else record


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the records that have both ``x`` and ``key`` (a record logged without one is skipped)."""
    pairs = [(r[x], r[key]) for r in records if r.get(x) is not None and r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` with an integer ``step`` (a torn last line from a crash, or
    a damaged one, is skipped; a known field of the wrong type is dropped from its record, see _clean)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is a 5,000-digit number
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(_clean(record))
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume from ``step``: drop records logged after it (the resumed run logs them again), and the stop
    record at ``step`` (the resumed run ends with its own: one per run, however often it is resumed)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [
        r
        for r in read_metrics(run_dir)
        if r["step"] < step or (r["step"] == step and r.get("kind") != "stop")
    ]
    fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write plots/{loss,perplexity,lr,throughput}.png from metrics.jsonl and, when the run scored
    translations, bleu.png; returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from scratchlm.errors import ConfigError

        raise ConfigError("plots need matplotlib: pip install 'scratchlm[viz]'") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        from scratchlm.errors import CheckpointError

        raise CheckpointError(
            f"{run_dir / 'metrics.jsonl'} is missing or empty; nothing to plot (train first)"
        )
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    paths = []

    def figure(name: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax)
        ax.set_title(f"{run_dir.name}: {name.removesuffix('.png')}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / name
        with fileio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)

    def loss(ax):
        ax.plot(*series(train, "loss"), label="train", lw=1)
        if evals:
            ax.plot(*series(evals, "val_loss"), "o-", label="val")
        finite = [v for v in series(train, "loss")[1] if math.isfinite(v)]
        if finite:
            ax.set_ylim(top=min(max(finite), 2 * sorted(finite)[len(finite) // 2] + 1))
        ax.set_ylabel("loss (nats/token)")
        if ax.get_legend_handles_labels()[0]:  # (nothing to label when the records lack the values)
            ax.legend()

    def perplexity(ax):
        for records, key, style, label in ((train, "loss", "-", "train"), (evals, "val_loss", "o-", "val")):
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, [math.exp(min(v, 50.0)) for v in values], style, label=label, lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity exp(loss) (log scale)")
        if ax.get_legend_handles_labels()[0]:  # (nothing to label when the records lack the values)
            ax.legend()

    figure("loss.png", loss)
    figure("perplexity.png", perplexity)
    bleu = [r for r in evals if "val_bleu" in r]
    if bleu:

        def bleu_curve(ax):
            ax.plot(*series(bleu, "val_bleu"), "o-", label="sacreBLEU")
            ax.plot(*series(bleu, "val_chrf"), "s--", label="chrF")
            ax.set_ylabel("score (0-100), greedy, validation subset")
            ax.set_title("validation BLEU and chrF")
            ax.legend()

        figure("bleu.png", bleu_curve)
    figure(
        "lr.png",
        lambda ax: (
            ax.plot(*series(train, "lr")),
            ax.set_ylabel("learning rate"),
        ),
    )
    figure(
        "throughput.png",
        lambda ax: (
            ax.plot(*series(train, "tokens_per_s")),
            ax.set_ylabel("tokens / s"),
        ),
    )
    return paths
