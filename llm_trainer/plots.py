"""PNG plots of training metrics and learning-rate schedules (the library side of ``vis_log`` / ``vis_lr``).

Rendering uses matplotlib's Agg canvas directly (no pyplot, no window, no global backend change).

:func:`plot_metrics` draws one figure of panels from ``metrics.jsonl`` records:

- **raw values** by default; ``smooth=N`` adds a trailing mean over N logged points, drawn over the faint raw line
  and labelled ``smoothed (N)``, so a smoothed curve never reads as the value;
- related series share a panel and panels come in a fixed order (:data:`PANELS`): rewards first, then KL and
  clipping, then lengths, then losses, optimisation and throughput; metrics no rule knows get a panel each;
- series that are constant in every run (``lr`` without a schedule, ``sampling_rounds``…) or an exact copy of
  another (one reward function's ``reward/<name>/mean`` is ``reward/mean``) are not drawn: a line under the panels
  says what they equal; cumulative counters (``tokens_seen``) are not drawn either;
- a figure fits a laptop screen (at most 1360 × 800 pixels for up to 20 panels).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PANELS", "Panel", "moving_average", "metric_series", "numeric_keys", "plan_panels", "metrics_figure",
           "plot_metrics", "plot_lr", "plot_confusion_matrix"]

Runs = Sequence[tuple[str, Sequence[dict[str, Any]]]]
"""(label, records) per run; records as :func:`llm_trainer.metrics.read_metrics` returns them."""

SKIP_KEYS = frozenset({"step", "epoch", "time", "event", "wall_time", "tokens_seen"})
"""Bookkeeping fields: the x axis, clocks and cumulative counters."""

_OTHER = "<metrics no rule matches>"

# (title, regular expression matched against the whole metric name, options). A metric goes to the first panel
# whose expression matches; panels are drawn in this order. Metrics no rule matches get a panel each at _OTHER.
PANELS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("reward", r"(eval_)?reward(/[^/]+)?/mean|(eval_)?reward|eval_reward/[^/]+", {}),
    ("reward std", r"reward(/[^/]+)?/std", {}),
    ("score, return, value", r"score_mean|return_mean|value[/_](mean|error)|non_score_reward", {}),
    ("implicit rewards", r"(eval_)?rewards/(chosen|rejected|margin)", {}),
    ("preference accuracy", r"(eval_)?rewards/accuracy|(eval_)?preference_accuracy", {}),
    # evaluators (llm_trainer.evaluation) log eval/<task>/<metric>; classifiers accuracy and macro-F1
    ("accuracy", r"(eval_)?accuracy|eval_macro_f1|eval/.+/(acc|acc_norm|exact_match)", {}),
    ("eval reward", r"eval/.+/reward", {}),
    ("eval perplexity", r"eval/.+/ppl", {"log": True}),
    ("eval NLL (nats per token), bits per byte", r"eval/.+/(nll|bits_per_byte)", {}),
    ("log-probs", r"(eval_)?logps/.+", {}),
    ("KL", r"kl|approx_kl|kl/.+", {}),
    ("KL coefficient", r"kl_coef", {}),
    ("clip fraction", r"[a-z_]*clip_frac(/.+)?", {}),
    ("policy ratio", r"ratio[/_](mean|max|min)", {}),
    ("|advantage|", r"advantage_abs", {}),
    ("generated vs recomputed log-prob", r"gen_logprob_diff", {}),
    ("entropy", r"entropy", {}),
    ("length (tokens)", r"(completion|prompt)_len", {}),
    ("tokens per step", r"tokens_per_step", {}),
    ("fraction of samples", r"truncated_frac|kept_frac|zero_var_group_frac", {}),
    ("loss", r"(eval_)?loss", {}),
    ("loss terms", r"loss/.+|(policy|value|kd|lm|ptx)_loss", {}),
    (_OTHER, r"(?!)", {}),
    ("learning rate", r"lr|.+/lr", {"sci": True}),
    ("throughput (per second)", r"tokens_per_s|samples_per_s", {"log": True}),
    ("seconds per phase", r"time/.+", {}),
    ("peak memory", r"peak_mem", {"scale": 2.0 ** -30, "unit": "GiB"}),
)
_OTHER_INDEX = [title for title, _, _ in PANELS].index(_OTHER)


@dataclass
class Panel:
    """One axes of the figure: its title, the metrics drawn in it (in order) and drawing options."""

    title: str
    keys: list[str]
    options: dict[str, Any] = field(default_factory=dict)


def moving_average(values: Sequence[float], n: int) -> list[float]:
    """Trailing mean of the last ``n`` finite values at each point (NaN until the first finite value)."""
    out: list[float] = []
    window: list[float] = []
    for x in values:
        if x is not None and math.isfinite(x):
            window.append(x)
            if len(window) > n:
                window.pop(0)
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, sorted by step; a later record of the same step wins."""
    by_step: dict[float, float] = {}
    for r in records:
        v, s = r.get(key), r.get("step")
        if _is_number(v) and _is_number(s):
            by_step[s] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def numeric_keys(runs: Runs, skip: Sequence[str] | frozenset[str] = SKIP_KEYS) -> list[str]:
    """Every numeric metric of the runs, in first-seen order, except ``skip`` (default: the bookkeeping fields)."""
    keys: dict[str, None] = {}
    for _, recs in runs:
        for r in recs:
            for k, v in r.items():
                if k not in skip and _is_number(v):
                    keys.setdefault(k, None)
    return list(keys)


def _constant_value(runs: Runs, key: str) -> float | None:
    """The value of ``key`` when it was logged at least twice and every finite value in every run is the same
    (within 1e-9 relative), else None (a value logged once is a point worth drawing, not a constant)."""
    finite = [v for _, recs in runs for v in metric_series(recs, key)[1] if math.isfinite(v)]
    if len(finite) < 2:
        return None
    lo, hi = min(finite), max(finite)
    return lo if hi - lo <= 1e-9 * max(1.0, abs(hi)) else None


def _omitted(runs: Runs, keys: list[str]) -> dict[str, str]:
    """Metrics not worth a line, with what they equal: constant ones (``"= 0.002"``), ones that are an exact copy of
    another metric in every run that logs them (``"= reward/mean"``: one reward function's mean is the total) and
    ones with no finite value. Of two copies the one of the earlier panel is kept, then the name with fewer ``/``
    parts."""
    omitted: dict[str, str] = {}
    kept: dict[str, list[tuple]] = {}
    for k in sorted(keys, key=lambda k: (_panel_index(k), k.count("/"))):  # stable: else first-seen order
        value = _constant_value(runs, k)
        series = [tuple(map(tuple, metric_series(recs, k))) for _, recs in runs]
        original = next((j for j, other in kept.items()
                         if all(not s[0] or s == o for s, o in zip(series, other))), None)
        if value is not None:
            omitted[k] = f"= {value:.4g}"
        elif not any(math.isfinite(v) for s in series for v in s[1]):
            omitted[k] = "= nan"
        elif original is not None:
            omitted[k] = f"= {original}"
        else:
            kept[k] = series
    return {k: omitted[k] for k in keys if k in omitted}


def _panel_index(key: str) -> int:
    """Position in :data:`PANELS` of the rule ``key`` matches (the place of unmatched metrics if none does)."""
    return next((i for i, (_, pattern, _) in enumerate(PANELS) if re.fullmatch(pattern, key)), _OTHER_INDEX)


def plan_panels(runs: Runs, keys: Sequence[str] | None = None) -> tuple[list[Panel], dict[str, str]]:
    """Which panels to draw, in order, and the metrics left out (name → what it equals, see :func:`_omitted`).

    With explicit ``keys`` every key gets its own panel, in the order given, and nothing is left out. Otherwise
    metrics are grouped by :data:`PANELS` and constant or duplicate ones are left out."""
    if keys:
        return [_single(k) for k in keys], {}
    available = numeric_keys(runs)
    if not available:
        raise ValueError("no numeric metrics to plot")
    omitted = _omitted(runs, available)
    if all(k in omitted for k in available):
        omitted = {}  # nothing varies: then the constants are what there is to see
    groups: dict[str, Panel] = {title: Panel(title, [], dict(opts)) for title, _, opts in PANELS}
    for k in available:
        if k in omitted:
            continue
        i = _panel_index(k)
        if i == _OTHER_INDEX:
            groups[f"{_OTHER}{k}"] = Panel(k, [k])
        else:
            groups[PANELS[i][0]].keys.append(k)
    order = {title: i for i, (title, _, _) in enumerate(PANELS)}
    ranked = sorted(groups.items(), key=lambda kv: order.get(kv[0], _OTHER_INDEX))  # stable: others in key order
    panels = [p if len(p.keys) > 1 else _single(p.keys[0]) for _, p in ranked if p.keys]
    return panels, omitted


def _single(key: str) -> Panel:
    """A one-metric panel, titled by the metric's own name (what ``--keys`` takes) and its unit."""
    i = _panel_index(key)
    options = {} if i == _OTHER_INDEX else dict(PANELS[i][2])
    return Panel(key + (f" ({options['unit']})" if "unit" in options else ""), [key], options)


def _grid(n_panels: int) -> tuple[int, int, tuple[float, float]]:
    """(rows, columns, figure size in inches): four columns (five beyond 16 panels), rows no taller than 3 in and
    a figure of at most 8 in (800 px at the 100 dpi we save with) up to 20 panels; more grow it downwards."""
    ncols = max(1, min(4 if n_panels <= 16 else 5, n_panels))
    nrows = math.ceil(n_panels / ncols)
    width = {1: 7.0, 2: 11.0, 3: 13.6}.get(ncols, 13.6)
    row_h = max(1.9, min(3.0, 7.7 / nrows))
    return nrows, ncols, (width, row_h * nrows + 0.3)


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_LINESTYLES = ("-", "--", ":", "-.")


def _draw_panel(ax, runs: Runs, panel: Panel, smooth: int) -> None:
    from matplotlib.ticker import MaxNLocator

    scale = panel.options.get("scale", 1.0)
    many_runs = len(runs) > 1
    shown: list[float] = []
    at: set[float] = set()
    for r, (label, recs) in enumerate(runs):
        for s, key in enumerate(panel.keys):
            steps, values = metric_series(recs, key)
            if not steps:
                continue
            values = [v * scale for v in values]
            shown += [v for v in values if math.isfinite(v)]
            at.update(steps)
            color = f"C{(r if many_runs else s) % 10}"
            style = _LINESTYLES[s % len(_LINESTYLES)] if many_runs else "-"
            name = " · ".join(x for x in (label if many_runs else "", key if len(panel.keys) > 1 else "") if x)
            marker = "o" if len(values) <= 20 else None
            if smooth > 1 and len(values) > smooth:
                ax.plot(steps, values, color=color, linestyle=style, alpha=0.3, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), color=color, linestyle=style, linewidth=1.6,
                        label=f"{name + ' ' if name else ''}smoothed ({smooth})")
            else:
                ax.plot(steps, values, color=color, linestyle=style, linewidth=1.3, marker=marker, markersize=2.5,
                        label=name or None)
    ax.set_title(panel.title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if panel.options.get("log") and shown and min(shown) > 0:
        ax.set_yscale("log")
    elif panel.options.get("sci"):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    if shown and max(shown) - min(shown) <= 1e-9 * max(1.0, abs(max(shown))):  # one constant series asked for
        mid = (max(shown) + min(shown)) / 2
        pad = abs(mid) * 0.1 or 1.0
        ax.set_ylim(mid - pad, mid + pad)
    if len(at) == 1:  # one logged step: a readable axis around it
        ax.set_xlim(min(at) - 1, min(at) + 1)
    if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize=7, framealpha=0.6)


def _footer(omitted: dict[str, str]) -> str:
    items = [f"{k} {v}" for k, v in omitted.items()]
    lines, line = [], "not drawn (constant, or a copy of another series): "
    for item in items:
        if len(line) + len(item) > 180:
            lines.append(line.rstrip(", "))
            line = "    "
        line += item + ", "
    lines.append(line.rstrip(", "))
    return "\n".join(lines)


def metrics_figure(runs: Runs, keys: Sequence[str] | None = None, smooth: int = 1):
    """The figure :func:`plot_metrics` saves, to inspect or save elsewhere. Each axes' title is its panel's."""
    panels, omitted = plan_panels(runs, keys)
    nrows, ncols, size = _grid(len(panels))
    fig = _new_figure(size)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        _draw_panel(ax, runs, panel, smooth)
        if i >= len(panels) - ncols:
            ax.set_xlabel("step", fontsize=8)
    if omitted:
        fig.supxlabel(_footer(omitted), fontsize=7, color="0.35")
    return fig


def plot_metrics(runs: Runs, out: str | Path, keys: Sequence[str] | None = None, smooth: int = 1) -> list[Path]:
    """Plot `runs` ((label, records) pairs, overlaid). `out` ending in ``.png`` → one figure with every panel;
    otherwise a directory with one ``<panel>.png`` per panel. Returns the files written."""
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (1 = raw values only), got {smooth}")
    out = Path(out)
    if out.suffix.lower() == ".png":
        fig = metrics_figure(runs, keys, smooth)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        return [out]
    panels, _ = plan_panels(runs, keys)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        fig = _new_figure((8.0, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        _draw_panel(ax, runs, panel, smooth)
        ax.set_xlabel("step")
        path = out / (re.sub(r"[^A-Za-z0-9._-]+", "_", panel.title).strip("_") + ".png")
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def plot_lr(steps: Sequence[float], lrs: Sequence[float], out: str | Path, title: str = "learning rate") -> Path:
    """One panel of a learning-rate curve, saved to `out`."""
    fig = _new_figure((8.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
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


def plot_confusion_matrix(matrix: Sequence[Sequence[float]], labels: Sequence[str], out: str | Path,
                          title: str = "confusion matrix") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG: counts in the cells, shaded by the share
    of each true class."""
    k = len(matrix)
    fig = _new_figure((min(3.0 + 0.6 * k, 12.0), min(2.6 + 0.6 * k, 11.0)))
    ax = fig.add_subplot(1, 1, 1)
    rows = [max(sum(r), 1) for r in matrix]
    ax.imshow([[v / n for v in r] for r, n in zip(matrix, rows)], cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            share = matrix[i][j] / rows[i]
            ax.text(j, i, f"{int(matrix[i][j])}", ha="center", va="center", fontsize=8,
                    color="white" if share > 0.6 else "black")
    ax.set_xticks(range(k), [str(n) for n in labels], rotation=45 if k > 4 else 0, fontsize=8)
    ax.set_yticks(range(k), [str(n) for n in labels], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
