"""The harness shared by the benchmark scripts: process memory, timing, measured runs in subprocesses, model folders.

* Memory of a CPU run is the process's resident set: ``VmHWM`` (peak, resettable through ``/proc/self/clear_refs``)
  and ``ru_maxrss`` (peak over the process's life). Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (see
  :func:`worker_env`) so that every buffer over 128 KiB is ``mmap``-ed and unmapped on free: freed tensors leave the
  RSS at once and the high-water mark is the true peak of live memory. On CUDA: ``torch.cuda.max_memory_allocated``.
* Times are wall-clock after the device's queued work (:func:`now`); :func:`timed_rounds` interleaves variants
  round by round so that load changes on a shared machine hit all of them alike.
* A measured run is a fresh subprocess (its peak is its own) that prints one ``RESULT {json}`` line
  (:func:`emit_result`); :func:`run_worker` starts it and parses that line.
* :func:`write_model_folder` writes a random-weight HF-format folder (our ``save_pretrained``; ``transformers``
  loads it too) of a named shape (:data:`SHAPES`), built on the meta device so a 0.5B model costs no double RAM.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "RESULT "


# ------------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size now (``VmRSS``)."""
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    """Resident high-water mark since the process started or since the last :func:`reset_hwm` (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


_CLEARED_PEAK = [0]      # the largest high-water mark reset_hwm() cleared in this process


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``); False if refused.
    The mark it clears is remembered for :func:`max_rss_bytes`."""
    _CLEARED_PEAK[0] = max(_CLEARED_PEAK[0], hwm_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    """Peak RSS over the process's whole life. Linux's ``ru_maxrss`` is the same counter as ``VmHWM`` (while no
    thread has exited), so :func:`reset_hwm` clears it too: the marks it cleared are taken into account here."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _CLEARED_PEAK[0], hwm_bytes())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (steadier than wall time on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cuda_peak_bytes() -> int | None:
    """``torch.cuda.max_memory_allocated`` when CUDA is in use, else None."""
    import torch
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


# -------------------------------------------------------------------------------------------------------- time
def sync() -> None:
    """Wait for queued CUDA work (no-op without CUDA)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    """A ``perf_counter`` timestamp taken after the device's queued work finished."""
    sync()
    return time.perf_counter()


def step_intervals(ends: Sequence[float], warmup: int) -> list[float]:
    """Step times from the timestamps at the end of consecutive steps, without the first ``warmup`` steps."""
    return [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0):]


def timed_rounds(fns: Sequence[Callable[[], Any]], repeats: int, sync_fn: Callable[[], None] = sync):
    """Run every function once per round (after one warm-up call each), so that load changes on a shared machine
    hit all alike. Returns per function: wall times, process CPU times, the last result, and on CUDA the most
    memory its calls allocated above what was allocated when they started (``max_memory_allocated`` reset before
    each: its KV cache and activations, not the weights every variant shares; None on CPU)."""
    import torch
    cuda = torch.cuda.is_available()
    results = [f() for f in fns]
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    peaks: list[int | None] = [None] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            sync_fn()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0, c0 = time.perf_counter(), time.process_time()
            results[i] = f()
            sync_fn()
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(time.process_time() - c0)
            if cuda:
                peaks[i] = max(peaks[i] or 0, int(torch.cuda.max_memory_allocated()) - base)
    return walls, cpus, results, peaks


def fmt_range(xs: Sequence[float], fmt: str = ".2f") -> str:
    """``min–max`` of several values, one value when they all print alike."""
    if not xs:
        return "-"
    lo, hi = f"{min(xs):{fmt}}", f"{max(xs):{fmt}}"
    return lo if lo == hi else f"{lo}–{hi}"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------- workers
def worker_env(threads: int | None = None, static_mmap: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a measured subprocess: this checkout first on ``PYTHONPATH``, glibc's static mmap
    threshold unless ``static_mmap=False`` (freed large buffers leave the RSS), progress bars off, and ``threads``
    OpenMP threads."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if static_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def emit_result(obj: dict) -> None:
    """Print the one line :func:`run_worker` reads back."""
    print(RESULT_PREFIX + json.dumps(obj), flush=True)


class WorkerError(RuntimeError):
    """A measured subprocess failed or printed no result."""


def run_worker(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` (a worker that ends with :func:`emit_result`) and return its result; raises
    :class:`WorkerError` with the tail of its output when it fails, prints nothing or runs past ``timeout``."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env or worker_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise WorkerError(f"timed out after {timeout:.0f} s: {' '.join(cmd[-6:])}") from e
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise WorkerError(f"exit {proc.returncode}: {' '.join(cmd[-6:])}\n{proc.stdout[-2000:]}\n"
                          f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def alternate(items: Sequence[Any], round_: int) -> list[Any]:
    """``items`` in order on even rounds, reversed on odd ones (a load trend then favours none of them)."""
    return list(items) if round_ % 2 == 0 else list(items)[::-1]


# ----------------------------------------------------------------------------------------------- model folders
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, architecture="qwen2",
                  bos_token_id=151643, eos_token_id=151643)
"""Qwen2.5-0.5B's configuration (494M parameters with tied embeddings)."""


def _qwen2_shape(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                architecture="qwen2", bos_token_id=None, eos_token_id=1, pad_token_id=0)


SHAPES: dict[str, dict] = {
    "tiny": _qwen2_shape(256, 32, 64, 2, 4, 2),            # tests / smoke runs
    "20M": _qwen2_shape(32768, 384, 1024, 6, 6, 2),        # 22.0M
    "125M": _qwen2_shape(32768, 768, 2816, 12, 12, 4),     # 121.9M
    "350M": _qwen2_shape(32768, 1024, 3584, 24, 16, 4),    # 361M
    "0.5B": QWEN25_05B,                                    # 494.0M
}
"""Named Qwen2-architecture shapes (tied embeddings, qkv bias). The small ones use a 32k vocabulary, token id 1 as
EOS and 0 as padding, and allow 8192 positions."""


def write_model_folder(folder: str | os.PathLike, shape: str | dict, dtype: str = "bf16", seed: int = 0) -> Path:
    """A random-weight HF-format folder of ``shape`` (a :data:`SHAPES` name or ``ModelConfig`` keyword arguments),
    written with our ``save_pretrained`` in ``dtype`` ('bf16' halves the file; loaders cast to what they train in).
    Built on the meta device and initialised once in place. Reused when ``folder/config.json`` exists."""
    import torch

    from llm_trainer.model import LlmModel, ModelConfig
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlmModel(ModelConfig(**(SHAPES[shape] if isinstance(shape, str) else shape)))
    model = model.to_empty(device="cpu").to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    model.init_weights()
    model.save_pretrained(folder)
    return folder


def shape_parameters(shape: str | dict) -> int:
    """Parameter count of a shape (built on the meta device: no memory)."""
    import torch

    from llm_trainer.model import LlmModel, ModelConfig
    with torch.device("meta"):
        return LlmModel(ModelConfig(**(SHAPES[shape] if isinstance(shape, str) else shape))).num_parameters()


def word_tokenizer(vocab: int):
    """A ``transformers`` tokenizer for the trl side: word ``w<i>`` is token ``i + 2``, ``<pad>`` 0, ``</s>`` 1
    (EOS), split on whitespace — so token ids written as words reach trl unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    v = {"<pad>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab - 2)}}
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def as_words(ids: Sequence[int]) -> str:
    """Token ids as the words of :func:`word_tokenizer`."""
    return " ".join(f"w{i - 2}" for i in ids)


def machine_line() -> str:
    """Torch version, device, CPU count and load: the first line of every report."""
    import torch
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {dev}, {os.cpu_count()} CPUs, load average {load:.1f}, "
            f"{time.strftime('%Y-%m-%d')}")
