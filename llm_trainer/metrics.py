"""Training metrics: ``metrics.jsonl`` and a console progress bar. (TensorBoard / Weights & Biases reporting are
callbacks: :mod:`llm_trainer.trainers.callbacks_builtin`.)

``metrics.jsonl`` holds one JSON object per line. Training records have ``step`` (optimizer steps done),
``epoch``, ``time`` (seconds since the logger started) and whatever the trainer logs — by convention ``loss``,
``aux_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``samples_per_s``, ``mfu``, ``peak_mem`` (bytes),
``eval_loss``, ``eval_ppl``. Non-finite floats are written as ``NaN``/``Infinity`` (Python's json reads them).
When a run resumes from step N the logger appends ``{"event": "resume", "step": N}``; `read_metrics` then drops
the earlier records with ``step > N`` (they belong to the part of the killed run that the resume repeats).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsLogger", "ProgressBar", "read_metrics", "estimate_mfu", "peak_flops_for_device",
           "peak_memory_bytes", "format_si", "format_duration"]

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------------------
# helpers


def estimate_mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak.

    `flops_per_token` must count forward + backward (≈ 6·N + attention for training; e.g.
    ``model.flops_per_token(seq_len)``); `tokens_per_s` is per device when `peak_flops` is per device.
    Returns None when the peak is unknown (e.g. CPU)."""
    if not peak_flops or peak_flops <= 0:
        return None
    return float(flops_per_token) * float(tokens_per_s) / float(peak_flops)


# dense bf16/fp16 tensor-core peak FLOP/s (no sparsity), by substring of torch.cuda.get_device_name()
_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
               ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("V100", 125e12), ("4090", 165e12),
               ("3090", 71e12), ("T4", 65e12))


def peak_flops_for_device(device: Any = None) -> float | None:
    """Peak bf16 FLOP/s of a known CUDA GPU (None for CPU/unknown devices; H100 figure is SXM)."""
    import torch

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return None


def peak_memory_bytes(device: Any = None) -> int | None:
    """Peak allocated memory: CUDA allocator peak on a GPU, else the process's max RSS (Linux/macOS)."""
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except Exception:  # noqa: BLE001 - not available on this platform
        return None


def format_si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _to_python(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item) and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_to_python(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_python(x) for k, x in v.items()}
    return str(v)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of the ``metrics.jsonl`` inside a directory), resume-aware:
    a ``{"event": "resume", "step": N}`` marker discards earlier records with ``step > N``. Unparseable lines
    (e.g. a line cut by a crash) are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("event") == "resume":
                n = rec.get("step", 0)
                records = [r for r in records if not (isinstance(r.get("step"), (int, float)) and r["step"] > n)]
                continue
            if "event" in rec:
                continue
            records.append(rec)
    return records


# --------------------------------------------------------------------------------------------------------------
# progress bar


class ProgressBar:
    """A dependency-free progress display. On a TTY it redraws one line (``\\r``) at most every
    `min_interval` seconds; otherwise (files, CI logs) each `update` prints one plain line, at most every
    `line_interval` seconds (the last step is always printed)."""

    def __init__(self, total: int | None, stream: TextIO | None = None, is_tty: bool | None = None,
                 start_step: int = 0, width: int = 24, min_interval: float = 0.1, line_interval: float = 0.0):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        if is_tty is None:
            isatty = getattr(self.stream, "isatty", None)
            is_tty = bool(isatty and isatty())
        self.is_tty = is_tty
        self.start_step = start_step
        self.width = width
        self.min_interval = min_interval
        self.line_interval = line_interval
        self.t0 = time.monotonic()
        self._last_draw = -math.inf
        self._drawn = False
        self.evaluation: dict[str, float] = {}      # the latest evaluation's metrics, shown until the next one

    def remember_evaluation(self, metrics: dict[str, Any]) -> None:
        """Keep the scalar ``eval*`` metrics of an evaluation to show on every later line."""
        self.evaluation = {k: float(v) for k, v in metrics.items() if k.startswith("eval")
                           and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if not self.total or done <= 0:
            return math.nan
        return (time.monotonic() - self.t0) / done * max(0, self.total - step)

    def render(self, step: int, metrics: dict[str, Any]) -> str:
        parts = []
        if self.total:
            frac = min(1.0, max(0.0, step / self.total))
            filled = int(round(frac * self.width))
            bar = "█" * filled + "░" * (self.width - filled) if self.is_tty else ""
            parts.append(f"step {step}/{self.total}" + (f" {bar}" if bar else "") + f" {frac * 100:3.0f}%")
        else:
            parts.append(f"step {step}")
        for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}")):
            v = metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{key} " + fmt.format(v))
        shown = {**self.evaluation, **{k: v for k, v in metrics.items() if k in self.evaluation}}
        for key in list(shown)[:3]:                 # the latest evaluation (eval_loss, eval_reward, eval/...)
            parts.append(f"{key} {shown[key]:.4g}")
        tps = metrics.get("tokens_per_s")
        if isinstance(tps, (int, float)) and not isinstance(tps, bool):
            parts.append(f"tok/s {format_si(float(tps))}")
        if self.total:
            parts.append(f"ETA {format_duration(self.eta(step))}")
        return " | ".join(parts)

    def update(self, step: int, metrics: dict[str, Any] | None = None, force: bool = False) -> None:
        now = time.monotonic()
        last = self.total is not None and step >= self.total
        interval = self.min_interval if self.is_tty else self.line_interval
        if not (force or last) and now - self._last_draw < interval:
            return
        self._last_draw = now
        text = self.render(step, metrics or {})
        if self.is_tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
            if last:
                self.stream.write("\n")
                self._drawn = False
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self.is_tty and self._drawn:
            self.stream.write("\r\x1b[2K")
        self.stream.write(message.rstrip("\n") + "\n")
        self.stream.flush()
        self._drawn = False

    def close(self) -> None:
        if self.is_tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# --------------------------------------------------------------------------------------------------------------
# logger


class MetricsLogger:
    """Writes metrics on the main process (every call is a no-op elsewhere).

    ``log(metrics, step, epoch=None)`` appends one record to ``output_dir/metrics.jsonl`` (flushed) and updates the
    progress bar. `resume_step` marks a resume (see module docstring).
    """

    def __init__(self, output_dir: str | os.PathLike, is_main: bool = True, *, total_steps: int | None = None,
                 console: bool = True, stream: TextIO | None = None, is_tty: bool | None = None,
                 resume_step: int | None = None, filename: str = METRICS_FILE):
        self.is_main = is_main
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / filename
        self.t0 = time.monotonic()
        self._file = None
        self.progress: ProgressBar | None = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if resume_step is not None:
            self._write({"event": "resume", "step": int(resume_step), "wall_time": time.time()})
        if console:
            self.progress = ProgressBar(total_steps, stream=stream, is_tty=is_tty, start_step=resume_step or 0)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log(self, metrics: dict[str, Any], step: int, epoch: int | float | None = None,
            progress: bool = True) -> dict[str, Any] | None:
        """Record `metrics` at optimizer step `step`; returns the record written (None off the main rank)."""
        if not self.is_main:
            return None
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = epoch
        record["time"] = round(time.monotonic() - self.t0, 3)
        record.update({str(k): _to_python(v) for k, v in metrics.items() if v is not None})
        self._write(record)
        if self.progress is not None:
            if progress:
                self.progress.update(int(step), record)
            else:                                   # an evaluation: shown on the bar's following lines
                self.progress.remember_evaluation(record)
        return record

    def print(self, message: str) -> None:
        """A console message (main rank) that does not break the progress bar."""
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
