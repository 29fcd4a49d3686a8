"""``scratchlm sweep``, ``scratchlm compare`` and ``scratchlm report``: experiments across runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sweep",
        help="a grid of training runs (resumable) and its table and plots",
        description="Train every point of a grid of configs, each in its own run directory under "
        "runs/sweeps/NAME (or --out), then write sweep.md (a table with mean ± std over seeds) and overlay "
        "plots. Run the same command again to continue a killed sweep: finished points are skipped and a "
        "half-finished one resumes from its last checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  scratchlm sweep configs/ablations/heads.yaml\n"
        "  scratchlm sweep configs/shakespeare-char.yaml --vary model.n_head=1,4,8 --vary model.pos=learned,none\n"
        "  scratchlm sweep CONFIG --zip --vary model.n_layer=2,4 --vary model.d_model=256,128 --seeds 3",
    )
    s.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [section.key=value ...]",
        help="the base config (its sweep: section may hold the grid) and overrides applied to every point",
    )
    s.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a key and its values (repeatable; also KEY=[V1, V2]); replaces the config file's values of KEY",
    )
    s.add_argument("--zip", action="store_true", help="pair the i-th values of every key instead of the grid")
    s.add_argument("--seeds", type=int, help="runs per point with seeds train.seed, +1, ... (default 1)")
    s.add_argument("--name", help="the sweep's name (default: the config file's name)")
    s.add_argument("--out", metavar="DIR", help="the sweep's folder (default runs/sweeps/NAME)")
    s.set_defaults(func=run_sweep_cmd, intermixed="args")

    c = sub.add_parser(
        "compare",
        help="overlay the curves of runs and tabulate their evaluations",
        description="Write compare.md (a table of every run's final evaluation), loss.png and "
        "perplexity.png (against steps, tokens and wall time) for the given run directories.",
    )
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `scratchlm train`")
    c.add_argument(
        "--out", metavar="DIR", default="runs/compare", help="output folder (default runs/compare)"
    )
    c.set_defaults(func=run_compare_cmd)

    r = sub.add_parser(
        "report",
        help="a markdown report of one run, with figures",
        description="Write RUN_DIR/report/report.md: why the run stopped, the config (what differs from the "
        "preset), parameters and FLOPs, data, curves, evaluations, inference speed, samples at fixed seeds, "
        "and the environment.",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `scratchlm train`")
    r.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/report)")
    r.add_argument("--device", help="device for the speed measurement and samples (default: auto)")
    r.add_argument("--no-speed", action="store_true", help="skip the inference speed measurement")
    r.set_defaults(func=run_report_cmd)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from scratchlm.cli.train import MAIN_JOB_PRESET, split_args
    from scratchlm.experiments.sweep import file_grid, parse_vary, run_sweep

    config_path, overrides = split_args(args.args)
    if config_path is None and not any(o.startswith("preset=") for o in overrides):
        overrides = [f"preset={MAIN_JOB_PRESET}", *overrides]  # as `scratchlm train` with no config
    grid = file_grid(config_path)
    vary = {k: list(v) for k, v in (grid.get("vary") or {}).items()}
    vary.update(parse_vary(args.vary))
    seeds = args.seeds if args.seeds is not None else int(grid.get("seeds", 1))
    zipped = args.zip or bool(grid.get("zip", False))
    name = args.name or (Path(config_path).stem if config_path else "sweep")
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / name
    result = run_sweep(config_path, overrides, vary, out=out, zipped=zipped, seeds=seeds)
    if result["interrupted"]:
        return 130
    print(f"\n{result['table']}\nsweep table and plots: {out / 'sweep.md'}")
    return 0


def run_compare_cmd(args: argparse.Namespace) -> int:
    from scratchlm.experiments.compare import compare_runs

    result = compare_runs(args.runs, args.out)
    print(result["table"])
    for path in result["figures"]:
        print(path)
    print(Path(args.out) / "compare.md")
    return 0


def run_report_cmd(args: argparse.Namespace) -> int:
    from scratchlm.experiments.report import write_report

    print(write_report(args.run_dir, args.out, device=args.device, speed=not args.no_speed))
    return 0
