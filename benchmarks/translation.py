"""Multi30k translation recipes end to end: train, average, translate test_2016_flickr, score with sacrebleu.

    python benchmarks/translation.py --device cuda     # configs/multi30k-{en-de,de-en}.yaml, 150 s of training each, <= 8 min in all
    python benchmarks/translation.py --device cpu      # configs/multi30k-*-cpu.yaml, 30 min of training each
    python benchmarks/translation.py --quick           # tiny settings, minutes on a CPU: checks the script

For each direction (En->De, De->En), in its own try/except so one failure still reports the other:

1. tokenizer: one joint byte-level BPE trained on the training split only (train.de + train.en), shared by
   both directions (the pipeline's cache);
2. train: the recipe's config, bounded by its ``train.max_time``, BLEU on a validation subset at each
   evaluation (best/ follows it), the last K checkpoints averaged at the end (``train.average_last``);
3. choose: best/ or averaged/, by greedy BLEU on the whole validation split (the test set is never used
   to choose);
4. test: greedy and beam-search translations of test_2016_flickr (raw cased text) scored by sacreBLEU and
   chrF (sacrebleu's defaults; signatures in the JSON).

Every stage runs under a hard wall-clock budget (SIGALRM), prints its progress, and the results are written
after each stage to ``benchmarks/results/translation.{json,md}`` (``translation_quick.*`` with --quick), and
also under ``$OUT`` when that variable is set. The peer is the published from-scratch state of the art on
raw, cased Multi30k test2016 (the issue's goals: En->De >= 38 sacreBLEU with beam search, >= 34 greedy,
De->En >= 40 with beam search).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DIRECTIONS = {"en-de": ("en", "de"), "de-en": ("de", "en")}
GOALS = {"en-de": {"beam": 38.0, "greedy": 34.0}, "de-en": {"beam": 40.0}}
HAVE_SACREBLEU = importlib.util.find_spec("sacrebleu") is not None


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: float, stage: str):
    """Raise StageTimeout when the block runs longer than ``seconds`` of wall time (main thread only)."""

    def fire(signum, frame):
        raise StageTimeout(f"stage '{stage}' ran over its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def log(msg: str) -> None:
    print(f"[translation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_data(arg: str | None) -> Path:
    """The Multi30k directory: --data, $SCRATCHLM_SHARED_DATA/multi30k, ../shared/data, ./shared/data."""
    candidates = [Path(arg)] if arg else []
    if os.environ.get("SCRATCHLM_SHARED_DATA"):
        candidates.append(Path(os.environ["SCRATCHLM_SHARED_DATA"]) / "multi30k")
    candidates += [
        REPO.parent / "shared" / "data" / "multi30k",
        REPO / "shared" / "data" / "multi30k",
        REPO / ".gpu_data" / "multi30k",
    ]
    for c in candidates:
        if (c / "train.de").is_file() and (c / "test_2016_flickr.en").is_file():
            return c.resolve()
    sys.exit(f"error: Multi30k not found in {', '.join(map(str, candidates))}; pass --data DIR")


def machine(device: str) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = dict(
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count(),
        load_average_at_start=[round(x, 2) for x in os.getloadavg()],
        torch=torch.__version__,
        python=platform.python_version(),
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Report:
    """Results of one recipe (gpu | cpu | quick), merged into the JSON file and rendered as markdown."""

    def __init__(self, name: str, command: str, device: str, quick: bool):
        self.stem = "translation_quick" if quick else "translation"
        self.json_path = RESULTS / f"{self.stem}.json"
        self.all = {}
        if self.json_path.is_file():
            with contextlib.suppress(ValueError):
                self.all = json.loads(self.json_path.read_text())
        self.name, self.mine = name, set()  # mine: the directions this process runs
        self.all.setdefault("recipes", {})[name] = self.data = {
            "command": command,
            "machine": machine(device),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "directions": {},
        }

    def direction(self, d: str) -> dict:
        if d not in self.mine:  # a fresh record, not one left in the file by an earlier run
            self.mine.add(d)
            self.data["directions"][d] = {"stages": {}}
        return self.data["directions"][d]

    def write(self) -> None:
        """Merge this recipe's directions into the file as it is now (another process may run the other
        direction of the same recipe) and write the JSON and markdown, atomically."""
        self.data["machine"]["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        RESULTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError, ValueError):
            on_disk = json.loads(self.json_path.read_text())
            mine = on_disk.setdefault("recipes", {}).get(self.name, {})
            others = {d: r for d, r in mine.get("directions", {}).items() if d not in self.mine}
            self.data["directions"] = {**others, **{d: self.data["directions"][d] for d in self.mine}}
            on_disk["recipes"][self.name] = self.data
            self.all = on_disk
        text = json.dumps(self.all, indent=1) + "\n"
        md = render(self.all)
        for folder in [RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
            folder.mkdir(parents=True, exist_ok=True)
            for name, content in ((f"{self.stem}.json", text), (f"{self.stem}.md", md)):
                tmp = folder / (name + ".tmp")
                tmp.write_text(content, encoding="utf-8")
                tmp.replace(folder / name)


def fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(all_results: dict) -> str:
    lines = [
        "# Multi30k translation: sacreBLEU and chrF on test_2016_flickr",
        "",
        "Raw cased text, sacrebleu defaults (13a tokenization; signatures in translation.json). Produced by "
        "`python benchmarks/translation.py --device cuda` (GPU recipe: configs/multi30k-{en-de,de-en}.yaml) "
        "and `--device cpu` (CPU recipe: configs/multi30k-*-cpu.yaml). The checkpoint (best/ by validation "
        "BLEU, or the average of the last ones) is chosen on the validation split; the test set is scored "
        "once. Goals: En->De >= 38 (beam) and >= 34 (greedy), De->En >= 40 (beam).",
        "",
        "| recipe | direction | BLEU beam | BLEU greedy | chrF beam | chrF greedy | checkpoint | "
        "val BLEU (greedy) | train time (s) | steps | epochs | target tok/s | total time (s) | status |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rec in all_results.get("recipes", {}).items():
        for d, r in rec["directions"].items():
            t = r.get("test", {})
            tr = r.get("train", {})
            lines.append(
                f"| {name} | {d} | {fmt(t.get('beam', {}).get('bleu'))} | {fmt(t.get('greedy', {}).get('bleu'))} "
                f"| {fmt(t.get('beam', {}).get('chrf'))} | {fmt(t.get('greedy', {}).get('chrf'))} "
                f"| {r.get('checkpoint', '-')} | {fmt(r.get('val_bleu_chosen'))} | {fmt(tr.get('wall_time'), 0)} "
                f"| {tr.get('steps', '-')} | {tr.get('epochs', '-')} | {fmt(tr.get('tokens_per_s'), 0)} "
                f"| {fmt(r.get('total_seconds'), 0)} | {r.get('status', 'running')} |"
            )
    lines += ["", "## Machines and stage times", ""]
    for name, rec in all_results.get("recipes", {}).items():
        m = rec["machine"]
        lines.append(
            f"- **{name}**: `{rec['command']}` started {rec['started']}; {m.get('gpu', m['cpu'])} "
            f"({m['cores']} CPU cores, load average {m['load_average_at_start']} at start, "
            f"{m.get('load_average_now')} at the last write), torch {m['torch']}"
        )
        for d, r in rec["directions"].items():
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items())
            lines.append(f"  - {d}: {stages}" + (f"; error: {r['error']}" if r.get("error") else ""))
    return "\n".join(lines) + "\n"


def lm_dtype(lm) -> torch.dtype:
    from scratchlm.device import resolve_dtype

    return resolve_dtype(lm.config.train.dtype, lm.device)


def reference_loss(*args):
    from scratchlm.eval.translation import reference_loss as loss

    return loss(*args)


def translate_and_score(lm, pairs, *, beams: int, length_penalty: float = 1.0) -> dict:
    """Translations of the sources (greedy or beam) and, when sacrebleu is importable, their scores."""
    from scratchlm.device import autocast
    from scratchlm.inference.translate import translate_texts

    with autocast(lm.device, lm_dtype(lm)):
        hyps = translate_texts(
            lm.model,
            lm.tokenizer,
            [s for s, _ in pairs],
            beam_size=beams,
            length_penalty=length_penalty,
            batch_size=200 if beams == 1 else 64,
        )
    out = {"hypotheses": hyps, "sentences": len(pairs)}
    if HAVE_SACREBLEU:
        from scratchlm.eval.bleu import corpus_scores

        out.update(corpus_scores(hyps, [t for _, t in pairs]))
    return out


def rescore(folder: Path, data: Path, stem: str) -> int:
    """Score translation files written by a run whose machine lacked sacrebleu (``--rescore $OUT/hyps``)."""
    from scratchlm.data.pairs import load_pairs
    from scratchlm.eval.bleu import corpus_scores

    path = RESULTS / f"{stem}.json"
    results = json.loads(path.read_text())
    for name, rec in results.get("recipes", {}).items():
        for d, r in rec["directions"].items():
            src, tgt = DIRECTIONS[d]
            for search, t in r.get("test", {}).items():
                f = folder / t.get("hypotheses_file", "-")
                if f.is_file():
                    hyps = f.read_text(encoding="utf-8").splitlines()
                    refs = [b for _, b in load_pairs(data / "test_2016_flickr", src, tgt)][: len(hyps)]
                    t.update(corpus_scores(hyps, refs))
                    log(f"{name} {d} {search}: BLEU {t['bleu']:.2f} chrF {t['chrf']:.2f}")
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(results))
    return 0


def partial_train(run_dir: Path) -> dict:
    """What a run that did not finish logged: steps, training seconds, target tokens/s, last eval."""
    from scratchlm.train.metrics import read_metrics

    try:
        records = read_metrics(run_dir)
    except Exception:  # noqa: BLE001 (no metrics at all: nothing to add)
        return {}
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return {}
    out = {"steps": train[-1]["step"], "wall_time": train[-1]["time"], "tokens": train[-1]["tokens"]}
    out["tokens_per_s"] = train[-1]["tokens"] / max(train[-1]["time"], 1e-9)
    if evals:
        out.update(
            epochs=evals[-1].get("epoch"), val_loss=evals[-1]["val_loss"], val_bleu=evals[-1].get("val_bleu")
        )
    return out


def train_summary(run_dir: Path, summary: dict) -> dict:
    from scratchlm.train.metrics import read_metrics

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train" and r["step"] > 1]
    evals = [r for r in records if r.get("kind") == "eval"]
    return {
        "steps": summary["step"],
        "wall_time": summary["wall_time"],
        "tokens": summary["tokens"],
        "stopped_reason": summary["stopped_reason"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
        "epochs": evals[-1].get("epoch") if evals else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_bleu_during_training": max((r.get("val_bleu", 0) for r in evals), default=None),
    }


def run_direction(args, report: Report, d: str, data: Path, tokenizer_path: Path | None) -> None:
    from scratchlm.api import load
    from scratchlm.config import load_config
    from scratchlm.data.pairs import load_pairs
    from scratchlm.pipeline import run

    src, tgt = DIRECTIONS[d]
    rec = report.direction(d)
    start = time.perf_counter()
    config = (
        REPO
        / "configs"
        / (f"multi30k-{d}.yaml" if args.device.startswith("cuda") else f"multi30k-{d}-cpu.yaml")
    )
    run_dir = REPO / "benchmarks" / "runs" / f"{report.name}-{d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"data.source={data / 'train'}",
        f"data.val_source={data / 'val'}",
        f"train.run_dir={run_dir}",
        f"train.device={args.device}",
        "train.resume=never",
    ]
    if tokenizer_path is not None:
        overrides.append(f"tokenizer.path={tokenizer_path}")
    if args.train_seconds:
        overrides.append(f"train.max_time={args.train_seconds}")
    if not HAVE_SACREBLEU:  # train without BLEU; the translations are saved for --rescore
        overrides += ["eval.bleu_sentences=0", "eval.metric=loss"]
    if args.quick:
        overrides += [
            "model.n_layer=1",
            "model.d_model=64",
            "model.n_head=2",
            "model.d_ff=128",
            "data.batch_tokens=2000",
            "train.ckpt_interval=10",
            "eval.interval=20",
            "eval.bleu_sentences=30",
            "eval.batches=2",
            "train.dtype=float32",
            "eval.num_samples=0",
        ]
    cfg = load_config(config, overrides)
    rec["config"] = str(config.relative_to(REPO))
    max_time = cfg.train.max_time or 600
    log(f"{d}: training {config.name} for up to {max_time:.0f} s on {args.device} -> {run_dir}")
    t = time.perf_counter()
    with budget(max_time + args.slack, f"{d} train"):
        summary = run(cfg, progress=False)
    rec["stages"]["train"] = time.perf_counter() - t
    rec["train"] = train_summary(run_dir, summary)
    log(f"{d}: trained {summary['step']} steps in {summary['wall_time']:.0f} s; {rec['train']}")
    report.write()

    val = load_pairs(data / "val", src, tgt)[: args.val_sentences]
    test = load_pairs(data / "test_2016_flickr", src, tgt)[: args.test_sentences]
    t = time.perf_counter()
    choices = {}
    with budget(args.eval_budget, f"{d} choose checkpoint"):
        for which in ("best", "averaged"):
            if which == "averaged" and not (run_dir / "averaged").is_dir():
                continue
            lm = load(run_dir, which=which, device=args.device)
            if HAVE_SACREBLEU:  # by greedy BLEU on the validation split
                choices[which] = translate_and_score(lm, val, beams=1)["bleu"]
            else:  # by validation loss (negated: higher is better)
                choices[which] = -reference_loss(lm.model, lm.tokenizer, val, lm_dtype(lm))[0]
            log(
                f"{d}: {'validation BLEU' if HAVE_SACREBLEU else '-validation loss'} of {which}: {choices[which]:.2f}"
            )
    rec["val_bleu" if HAVE_SACREBLEU else "neg_val_loss"] = choices
    chosen = max(choices, key=choices.get)
    rec["checkpoint"] = chosen
    if HAVE_SACREBLEU:
        rec["val_bleu_chosen"] = choices[chosen]
    rec["stages"]["choose"] = time.perf_counter() - t
    report.write()

    lm = load(run_dir, which=chosen, device=args.device)
    rec["test"] = {}
    for search, beams in (("greedy", 1), ("beam", args.beams)):
        t = time.perf_counter()
        with budget(args.eval_budget, f"{d} test {search}"):
            r = translate_and_score(lm, test, beams=beams, length_penalty=args.length_penalty)
        rec["stages"][f"test_{search}"] = time.perf_counter() - t
        hyps = "".join(h + "\n" for h in r.pop("hypotheses"))
        name = f"{report.name}-{d}.test_2016_flickr.{search}.{tgt}"
        (run_dir / name).write_text(hyps, encoding="utf-8")
        if os.environ.get("OUT"):  # the translations come back too: they can be rescored anywhere
            (Path(os.environ["OUT"]) / "hyps").mkdir(parents=True, exist_ok=True)
            (Path(os.environ["OUT"]) / "hyps" / name).write_text(hyps, encoding="utf-8")
        rec["test"][search] = {**r, "beams": beams, "hypotheses_file": name}
        log(
            f"{d}: test_2016_flickr {search}: BLEU {fmt(r.get('bleu'), 2)} chrF {fmt(r.get('chrf'), 2)} ({len(test)} sentences)"
        )
        report.write()
    rec["goals"] = GOALS[d]
    rec["total_seconds"] = time.perf_counter() - start
    rec["status"] = "ok"
    report.write()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cuda (GPU recipe) | cpu (CPU recipe)")
    p.add_argument("--quick", action="store_true", help="tiny model and data subsets: checks the script")
    p.add_argument("--directions", default="en-de,de-en", help="comma-separated: en-de, de-en")
    p.add_argument("--data", help="Multi30k directory (default: ../shared/data/multi30k)")
    p.add_argument("--train-seconds", type=float, help="override the recipes' train.max_time")
    p.add_argument("--beams", type=int, default=4, help="beam size of the beam-search scores (default 4)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam length penalty (default 1.0)")
    p.add_argument("--test-sentences", type=int, help="score only the first N test sentences")
    p.add_argument("--val-sentences", type=int, help="choose the checkpoint on the first N validation pairs")
    p.add_argument("--eval-budget", type=float, help="seconds allowed per translation stage")
    p.add_argument(
        "--slack",
        type=float,
        help="seconds allowed beyond train.max_time for setup and the final evaluation (60 GPU, 900 CPU)",
    )
    p.add_argument(
        "--rescore", metavar="DIR", help="only score the translation files in DIR (e.g. $OUT/hyps)"
    )
    args = p.parse_args()
    if args.rescore:
        return rescore(
            Path(args.rescore), find_data(args.data), "translation_quick" if args.quick else "translation"
        )
    if args.quick:  # code paths, not timings: generous budgets for a loaded machine
        args.train_seconds = args.train_seconds or 15
        args.test_sentences = args.test_sentences or 40
        args.val_sentences = args.val_sentences or 40
        args.slack = max(args.slack or 0.0, 300.0)
    if args.slack is None:
        args.slack = 60.0 if args.device.startswith("cuda") else 900.0
    if args.eval_budget is None:
        args.eval_budget = 90.0 if args.device.startswith("cuda") else 1200.0
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        sys.exit(f"error: unknown direction {bad[0]}; use en-de and/or de-en")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    os.environ.setdefault("SCRATCHLM_CACHE", str(REPO / "benchmarks" / "runs" / "cache"))
    data = find_data(args.data)
    name = "quick" if args.quick else ("gpu" if args.device.startswith("cuda") else "cpu")
    report = Report(
        name, "python benchmarks/translation.py " + " ".join(sys.argv[1:]), args.device, args.quick
    )
    report.write()
    if not HAVE_SACREBLEU:
        log(
            "warning: sacrebleu is not installed here: no BLEU during training, checkpoints chosen by validation "
            "loss; translations saved (under $OUT/hyps too) for `benchmarks/translation.py --rescore DIR`"
        )
    log(f"Multi30k from {data}; recipe {name}; directions {directions}; results -> {report.json_path}")
    tokenizer_path = None
    t = time.perf_counter()
    try:  # one joint BPE on the training split, shared by both directions
        from scratchlm.config import load_config
        from scratchlm.pipeline import _seq2seq_tokenizer

        suffix = "" if args.device.startswith("cuda") else "-cpu"
        cfg = load_config(
            REPO / "configs" / f"multi30k-de-en{suffix}.yaml", [f"data.source={data / 'train'}"]
        )
        with budget(300, "tokenizer"):
            tok = _seq2seq_tokenizer(cfg, progress=False)
        tokenizer_path = REPO / "benchmarks" / "runs" / f"{name}-tokenizer.json"
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(tokenizer_path)
        log(f"tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - t:.0f} s -> {tokenizer_path}")
    except Exception as e:  # each direction then trains (or reuses) its own
        log(f"tokenizer stage failed ({e}); each direction makes its own")
    report.data["tokenizer_seconds"] = time.perf_counter() - t
    failures = 0
    for d in directions:
        try:
            run_direction(args, report, d, data, tokenizer_path)
        except BaseException as e:  # noqa: BLE001 (report it, go on with the other direction)
            if isinstance(e, KeyboardInterrupt):
                raise
            failures += 1
            rec = report.direction(d)
            rec["status"], rec["error"] = "failed", f"{type(e).__name__}: {e}"
            if "train" not in rec:  # what the unfinished training logged
                rec["train"] = partial_train(REPO / "benchmarks" / "runs" / f"{report.name}-{d}")
            log(f"{d}: FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            report.write()
    log(f"done; {report.json_path} and {report.json_path.with_suffix('.md')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
