"""Crash-safe training checkpoints.

Layout of ``output_dir/checkpoint-<step>/``::

    model.safetensors   model weights (tied/shared tensors stored once; aliases in the metadata)
    optimizer.pt        optimizer state dict (torch.save of tensors and plain containers)
    trainer_state.pt    step, scheduler state, data position, RNG states, extra (plain containers only)
    checkpoint.json     written last: format version, step, file list — a directory without it is incomplete
    ...                 anything a backend writes through `write_fn` (e.g. DeepSpeed shards)

Atomicity: everything is written into ``output_dir/.tmp-step-<step>``, each file is fsynced, the directory is
fsynced, and only then renamed to ``checkpoint-<step>`` (and the parent fsynced). A process killed at any point
leaves either the complete new checkpoint or no new checkpoint; `latest_checkpoint` ignores ``.tmp-*`` and
``.trash-*`` directories and anything without ``checkpoint.json``. Old checkpoints are first renamed to
``.trash-*`` and then deleted, so a kill during rotation never leaves a half-deleted ``checkpoint-*``.
Stale temporary directories from a killed run are removed by the next save.

Loading uses ``torch.load(weights_only=True)``; everything we save is of the types it accepts (RNG states are
converted to tensors/ints). Pass ``allow_pickle=True`` only for files you trust that hold other objects.

Multi-process use (one shared directory): rank 0 calls `begin_checkpoint`, all ranks write into the returned
temp dir (barrier), rank 0 calls `commit_checkpoint`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save_file as safetensors_save_file

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "begin_checkpoint", "commit_checkpoint", "capture_rng_states", "restore_rng_states", "save_rng_states",
           "load_rng_states",
           "save_model_state", "load_model_state"]

FORMAT_VERSION = 1
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-step-"
TRASH_PREFIX = ".trash-"
META_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------------------------------------------
# fsync helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


# --------------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and (if initialised) every CUDA device's RNG state, as
    weights_only-loadable values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `capture_rng_states` (missing entries are left alone; CUDA only if available)."""
    if "python" in states:
        p = states["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "numpy" in states:
        n = states["numpy"]
        keys = n["keys"].numpy() if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"])
        np.random.set_state((n["kind"], keys.astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        cuda = list(states["cuda"])
        if len(cuda) != torch.cuda.device_count():
            # different number of visible devices: restore those that exist
            cuda = cuda[: torch.cuda.device_count()]
            for i, s in enumerate(cuda):
                torch.cuda.set_rng_state(s.cpu(), i)
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_rng_states(path: str | os.PathLike) -> None:
    """Write `capture_rng_states()` to ``path`` (fsynced); `load_rng_states` reads it with ``weights_only=True``."""
    with open(path, "wb") as f:
        torch.save(capture_rng_states(), f)
        f.flush()
        os.fsync(f.fileno())


def load_rng_states(path: str | os.PathLike) -> dict[str, Any]:
    """What `save_rng_states` wrote (tensors and plain values only: no unpickling of arbitrary objects)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------------------
# model weights (safetensors, with shared-tensor de-duplication)


def save_model_state(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors` file from a state dict; tensors sharing storage (tied weights) are stored once and the
    other names recorded as aliases in the metadata (restored by `load_model_state`)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.to("cpu").contiguous()
    # partially overlapping views of one storage are still "shared" for safetensors: clone those
    storages: dict[int, str] = {}
    for name, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            tensors[name] = t.clone()
        elif t.numel():
            storages[ptr] = name
    meta = dict(metadata or {})
    meta["format"] = "pt"
    if aliases:
        meta["llm_trainer_aliases"] = json.dumps(aliases)
    safetensors_save_file(tensors, str(path), metadata=meta)


def load_model_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = safetensors_load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, target in json.loads(meta.get("llm_trainer_aliases", "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


# --------------------------------------------------------------------------------------------------------------
# listing


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir` (None if there is none)."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


# --------------------------------------------------------------------------------------------------------------
# saving


def begin_checkpoint(output_dir: str | os.PathLike, step: int) -> Path:
    """Create an empty ``output_dir/.tmp-step-<step>`` (removing leftovers of killed saves) and return it."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():  # leftovers of a killed save or rotation
        if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
    tmp = root / f"{TMP_PREFIX}{step}"
    tmp.mkdir()
    return tmp


def commit_checkpoint(output_dir: str | os.PathLike, step: int, keep_last: int | None = None,
                      meta: dict[str, Any] | None = None) -> Path:
    """fsync the temp dir written since `begin_checkpoint`, write ``checkpoint.json``, rename to
    ``checkpoint-<step>`` (replacing an existing one of the same step) and rotate to the last `keep_last`."""
    root = Path(output_dir)
    tmp = root / f"{TMP_PREFIX}{step}"
    if not tmp.is_dir():
        raise FileNotFoundError(f"commit_checkpoint: {tmp} does not exist (call begin_checkpoint first)")
    _fsync_tree(tmp)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    info = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(), "files": files, **(meta or {})}
    meta_path = tmp / META_FILE
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists():  # re-save of the same step: move the old one aside atomically first
        trash = root / f"{TRASH_PREFIX}{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
        _fsync_dir(root)
    if keep_last is not None:
        rotate_checkpoints(root, keep_last, protect=final)
    return final


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int, protect: Path | None = None) -> None:
    """Delete all but the `keep_last` newest complete checkpoints (never `protect`)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(output_dir)
    ckpts = list_checkpoints(root)
    for _, path in ckpts[: max(0, len(ckpts) - keep_last)]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        trash = root / f"{TRASH_PREFIX}{path.name}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(root)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output_dir: str | os.PathLike, step: int, *,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    scheduler_state: dict[str, Any] | None = None,
                    data_position: dict[str, Any] | None = None,
                    rng_states: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None,
                    keep_last: int | None = None,
                    write_fn: Callable[[Path], None] | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and return its path.

    `rng_states` defaults to `capture_rng_states()` taken now. `extra` holds any other plain state (e.g. a
    GradScaler's state dict, the epoch). `write_fn(tmp_dir)` may add files (e.g. a backend's shards) before
    the commit. `keep_last` keeps only that many newest checkpoints (None → keep all)."""
    tmp = begin_checkpoint(output_dir, step)
    if model_state is not None:
        save_model_state(model_state, tmp / MODEL_FILE)
    if optimizer_state is not None:
        _torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
    state = {
        "step": step,
        "scheduler": scheduler_state,
        "data_position": data_position or {},
        "rng": capture_rng_states() if rng_states is None else rng_states,
        "extra": extra or {},
    }
    _torch_save(state, tmp / STATE_FILE)
    if write_fn is not None:
        write_fn(tmp)
    return commit_checkpoint(output_dir, step, keep_last=keep_last)


# --------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    data_position: dict[str, Any] = field(default_factory=dict)
    rng_states: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _torch_load(path: Path, map_location, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with guidance unless explicitly trusted
        if not allow_pickle:
            raise RuntimeError(
                f"{path}: cannot be loaded with torch.load(weights_only=True) ({e}). It holds objects other than "
                "tensors and plain containers; if you trust the file, pass allow_pickle=True") from e
        return torch.load(path, map_location=map_location, weights_only=False)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    load_model: bool = True, load_optimizer: bool = True,
                    allow_pickle: bool = False) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`. `path` may also be an output dir (→ its latest)."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        latest = latest_checkpoint(path) if path.is_dir() and not _CKPT_RE.match(path.name) else None
        if latest is None:
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META_FILE}) and contains none")
        path = latest
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {meta.get('format_version')} is newer than this "
                           f"llm_trainer supports ({FORMAT_VERSION})")
    model_state = None
    if load_model and (path / MODEL_FILE).is_file():
        model_state = load_model_state(path / MODEL_FILE, device=map_location)
    optimizer_state = None
    if load_optimizer and (path / OPTIMIZER_FILE).is_file():
        optimizer_state = _torch_load(path / OPTIMIZER_FILE, map_location, allow_pickle)
    state = _torch_load(path / STATE_FILE, "cpu", allow_pickle) if (path / STATE_FILE).is_file() else {}
    return Checkpoint(path=path, step=int(state.get("step", meta["step"])), model_state=model_state,
                      optimizer_state=optimizer_state, scheduler_state=state.get("scheduler"),
                      data_position=state.get("data_position") or {}, rng_states=state.get("rng") or {},
                      extra=state.get("extra") or {}, meta=meta)
