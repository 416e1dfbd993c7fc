"""`vis_log` and `vis_lr`: PNG plots of training metrics and learning-rate schedules.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no window, no global backend change).

    vis_log RUN/metrics.jsonl [OTHER_RUN ...] [--keys loss lr] [--ema 0.9] [--out plots.png | --out DIR]
    vis_lr config.toml --steps 10000 [--out lr.png]     # schedule a config will produce, before training
    vis_lr RUN/metrics.jsonl [--out lr.png]             # the lr a run actually used

Exit codes: 0 success, 1 no data / unreadable input, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["vis_log", "vis_lr", "ema", "plot_metrics", "plot_lr"]

_SKIP_KEYS = {"step", "epoch", "time", "event", "wall_time"}


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average ``s_t = alpha·s_{t-1} + (1 − alpha)·x_t``, bias-corrected (as TensorBoard's
    smoothing), skipping non-finite values (they keep the previous average)."""
    out, s, w = [], 0.0, 0.0
    for x in values:
        if x is not None and math.isfinite(x):
            s = alpha * s + (1 - alpha) * x
            w = alpha * w + (1 - alpha)
        out.append(s / w if w > 0 else math.nan)
    return out


def _figure(n_panels: int, ncols: int = 2, panel_size=(6.0, 3.6)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _numeric_keys(runs: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    keys: list[str] = []
    for _, recs in runs:
        for r in recs:
            for k, v in r.items():
                if k not in _SKIP_KEYS and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    return keys


def _series(recs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    by_step: dict[float, float] = {}
    for r in recs:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(s, (int, float)):
            by_step[s] = float(v)  # a later record of the same step wins
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plot_key(ax, runs, key: str, alpha: float) -> bool:
    any_data = False
    finite: list[float] = []
    for i, (label, recs) in enumerate(runs):
        steps, values = _series(recs, key)
        if not steps:
            continue
        any_data = True
        finite += [v for v in values if math.isfinite(v)]
        color = f"C{i % 10}"
        smooth = "loss" in key and not key.startswith("eval") and alpha > 0 and len(values) > 2
        marker = "o" if len(values) <= 20 else None
        if smooth:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, ema(values, alpha), color=color, linewidth=1.6, label=f"{label} (EMA {alpha:g})")
        else:
            ax.plot(steps, values, color=color, linewidth=1.4, marker=marker, markersize=3, label=label)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)
    if finite and max(finite) - min(finite) <= 1e-9 * max(1.0, abs(max(finite))):  # constant: avoid noise axis
        mid = (max(finite) + min(finite)) / 2
        pad = abs(mid) * 0.1 or 1.0
        ax.set_ylim(mid - pad, mid + pad)
    if key == "lr" or key.endswith("/lr"):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if any_data:
        ax.legend(fontsize=8)
    return any_data


def plot_metrics(runs: list[tuple[str, list[dict[str, Any]]]], out: str | Path, keys: list[str] | None = None,
                 alpha: float = 0.9) -> list[Path]:
    """Plot `runs` ((label, records) pairs). `out` ending in ``.png`` → one figure with a panel per key;
    otherwise a directory with ``<key>.png`` per key. Returns the files written."""
    keys = keys or _numeric_keys(runs)
    if not keys:
        raise ValueError("no numeric metrics to plot")
    out = Path(out)
    written: list[Path] = []
    if out.suffix.lower() == ".png":
        fig, axes = _figure(len(keys))
        for ax, key in zip(axes, keys):
            _plot_key(ax, runs, key, alpha)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        written.append(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for key in keys:
            fig, (ax,) = _figure(1, panel_size=(8.0, 4.5))
            _plot_key(ax, runs, key, alpha)
            path = out / (key.replace("/", "_").replace("\\", "_") + ".png")
            fig.savefig(path, dpi=100)
            written.append(path)
    return written


def plot_lr(steps: Sequence[float], lrs: Sequence[float], out: str | Path, title: str = "learning rate") -> Path:
    fig, (ax,) = _figure(1, panel_size=(8.0, 4.0))
    ax.plot(list(steps), list(lrs), linewidth=1.6)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


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

    ap = argparse.ArgumentParser(prog="vis_log", description="Plot metrics.jsonl files (runs overlaid) to PNG.")
    ap.add_argument("files", nargs="+", help="metrics.jsonl files or run directories containing one")
    ap.add_argument("--keys", nargs="+", default=None, help="metrics to plot (default: every numeric one)")
    ap.add_argument("--ema", type=float, default=0.9,
                    help="EMA smoothing of training loss keys (raw values drawn faintly), in [0, 1) (0 = off)")
    ap.add_argument("--out", default=None,
                    help="a .png file (one figure, a panel per metric) or a directory (one PNG per metric); "
                         "default: metrics.png next to the first file")
    args = ap.parse_args(argv)
    if not 0.0 <= args.ema < 1.0:
        ap.error(f"--ema must be in [0, 1), got {args.ema}")
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
        available = set(_numeric_keys(runs))
        missing = [k for k in args.keys if k not in available]
        if missing:
            print(f"vis_log: no values for {missing}; available: {sorted(available)}", file=sys.stderr)
            return 1
    out = Path(args.out) if args.out else paths[0].parent / "metrics.png"
    try:
        written = plot_metrics(runs, out, keys=args.keys, alpha=args.ema)
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
            steps, lrs = _series(read_metrics(_metrics_path(path)), "lr")
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
