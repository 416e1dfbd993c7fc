"""`vis_log` and `vis_lr`: the console scripts over :mod:`llm_trainer.plots` (argument parsing and input files).

    vis_log RUN/metrics.jsonl [OTHER_RUN ...] [--keys loss lr] [--smooth 20] [--out plots.png | --out DIR]
    vis_lr config.toml --steps 10000 [--out lr.png]     # schedule a config will produce, before training
    vis_lr RUN/metrics.jsonl [--out lr.png]             # the lr a run actually used

Exit codes: 0 success, 1 no data / unreadable input, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["vis_log", "vis_lr"]


def _labels(paths: list[Path]) -> list[str]:
    names = [p.parent.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def _metrics_path(p: Path) -> Path:
    from llm_trainer.metrics import METRICS_FILE

    return p / METRICS_FILE if p.is_dir() else p


def vis_log(argv: Sequence[str] | None = None) -> int:
    """Console script: plot one or more ``metrics.jsonl`` files (runs overlaid) to PNG."""
    from llm_trainer.metrics import read_metrics
    from llm_trainer.plots import numeric_keys, plot_metrics

    ap = argparse.ArgumentParser(
        prog="vis_log", description="Plot metrics.jsonl files (runs overlaid) to PNG: raw values, related metrics "
        "grouped in one panel (rewards first, then KL/clipping, then lengths), constant metrics listed, not drawn.")
    ap.add_argument("files", nargs="+", help="metrics.jsonl files or run directories containing one")
    ap.add_argument("--keys", nargs="+", default=None,
                    help="metrics to plot, a panel each, in this order (default: every numeric one, grouped)")
    ap.add_argument("--smooth", type=int, default=1, metavar="N",
                    help="also draw a trailing mean over N logged points, labelled 'smoothed (N)', over the faint "
                         "raw values (default 1: raw values only)")
    ap.add_argument("--out", default=None,
                    help="a .png file (one figure) or a directory (one PNG per panel); "
                         "default: metrics.png next to the first file")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error(f"--smooth must be >= 1, got {args.smooth}")
    paths = [_metrics_path(Path(f)) for f in args.files]
    runs = []
    for label, path in zip(_labels(paths), paths):
        try:
            recs = read_metrics(path)
        except OSError as e:
            print(f"vis_log: cannot read {path}: {e}", file=sys.stderr)
            return 1
        runs.append((label, recs))
    if not any(recs for _, recs in runs):
        print("vis_log: no metric records found in " + ", ".join(map(str, paths)), file=sys.stderr)
        return 1
    if args.keys:
        available = set(numeric_keys(runs, skip=("step",)))   # asked for by name: counters and clocks too
        missing = [k for k in args.keys if k not in available]
        if missing:
            print(f"vis_log: no values for {missing}; available: {sorted(available)}", file=sys.stderr)
            return 1
    out = Path(args.out) if args.out else paths[0].parent / "metrics.png"
    try:
        written = plot_metrics(runs, out, keys=args.keys, smooth=args.smooth)
    except ValueError as e:
        print(f"vis_log: {e}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


def _find_optim_table(d: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("optim_config", "optim"):
        if isinstance(d.get(key), dict):
            return d[key]
    for v in d.values():
        if isinstance(v, dict):
            found = _find_optim_table(v)
            if found is not None:
                return found
    return None


def _find_key(d: dict[str, Any], key: str) -> Any:
    if key in d and not isinstance(d[key], dict):
        return d[key]
    for v in d.values():
        if isinstance(v, dict):
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def _default_steps(cfg) -> int | None:
    if cfg.cosine_annealing_period is None or not cfg.enable_lr_scheduler:
        return None
    warm = cfg.warmup_iters or 0
    p, mul = cfg.cosine_annealing_period, cfg.cosine_annealing_period_mul
    if mul == 0:
        return warm + int(p * 1.2)
    return warm + int(sum(p * mul ** k for k in range(3)))  # three cycles


def vis_lr(argv: Sequence[str] | None = None) -> int:
    """Console script: plot the lr schedule of a config (TOML/JSON) or the lr column of a metrics.jsonl."""
    from llm_trainer.configs import OptimConfig, load_dict
    from llm_trainer.metrics import read_metrics
    from llm_trainer.plots import metric_series, plot_lr
    from llm_trainer.scheduler import Schedule, lr_at

    ap = argparse.ArgumentParser(
        prog="vis_lr", description="Plot a learning-rate schedule: from a config file (.toml/.json with an "
        "[optim_config]/[optim] table or OptimConfig fields at the top level) or from a run's metrics.jsonl.")
    ap.add_argument("file", help="config .toml/.json, or metrics.jsonl / run directory")
    ap.add_argument("--steps", type=int, default=None,
                    help="total optimizer steps to plot (config input; default: max_steps in the config, or "
                         "warmup + a few cosine cycles)")
    ap.add_argument("--out", default=None, help="output PNG (default: lr.png next to the input)")
    args = ap.parse_args(argv)
    path = Path(args.file)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "lr.png"
    if path.is_dir() or path.suffix.lower() == ".jsonl":
        try:
            steps, lrs = metric_series(read_metrics(_metrics_path(path)), "lr")
        except OSError as e:
            print(f"vis_lr: cannot read {path}: {e}", file=sys.stderr)
            return 1
        if not steps:
            print(f"vis_lr: {path} has no 'lr' values", file=sys.stderr)
            return 1
        print(plot_lr(steps, lrs, out, title=f"learning rate ({path})"))
        return 0
    try:
        data = load_dict(path)
    except (OSError, ValueError) as e:
        print(f"vis_lr: cannot read {path}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - TOML/JSON syntax errors
        print(f"vis_lr: cannot parse {path}: {e}", file=sys.stderr)
        return 1
    table = _find_optim_table(data)
    if table is None:
        table = {k: v for k, v in data.items() if not isinstance(v, dict)}
    try:
        cfg = OptimConfig.from_dict(table)
    except (TypeError, ValueError) as e:
        print(f"vis_lr: invalid optimizer config in {path}: {e}", file=sys.stderr)
        return 1
    total = args.steps or _find_key(data, "max_steps") or _default_steps(cfg)
    if not total:
        print("vis_lr: cannot tell how many steps to plot; pass --steps N", file=sys.stderr)
        return 1
    schedule = Schedule.from_config(cfg, int(total))
    lrs = [lr_at(i, schedule) for i in range(int(total))]
    written = plot_lr(range(int(total)), lrs, out, title=f"learning rate ({path.name}, {total} steps)")
    w = schedule.warmup_iters
    print(f"lr: step 0 = {lrs[0]:.3e}, peak = {max(lrs):.3e}"
          + (f" (step {w})" if 0 < w < total else "") + f", last = {lrs[-1]:.3e}")
    print(written)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(vis_log())
