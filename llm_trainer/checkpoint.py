"""Crash-safe, verifiable training checkpoints — the one checkpoint format of llm_trainer.

A checkpoint is a folder ``output_dir/checkpoint-<step>/`` holding what its writer puts there (the training loop's
layout is described in ``trainers/checkpointing.py``) plus ``checkpoint.json``, the manifest, written last: format
version, step, and every file's size and SHA-256. A folder without a manifest is incomplete and never used.

Atomic: everything is written into ``output_dir/.tmp-step-<step>``, each file and directory is fsynced, the
manifest is written, and only then the folder is renamed to ``checkpoint-<step>`` (and the parent fsynced). A process
killed at any point leaves either the complete new checkpoint or no new checkpoint; old checkpoints are renamed to
``.trash-*`` before they are deleted, so a kill during rotation never leaves a half-deleted ``checkpoint-*``.
:func:`clean_partial` removes the leftovers of killed saves (the loop calls it at start-up and before each save).

Verifiable: :func:`verify_checkpoint` re-hashes the files against the manifest (truncation, a flipped bit, a missing
file); :func:`resumable_checkpoint` returns the newest intact checkpoint of a folder and what was wrong with the
newer ones it skipped.

Disk space: :func:`begin_checkpoint` refuses to start when the disk has less free room than ``needed_bytes`` (the loop
passes the size of the previous checkpoint), raising :class:`CheckpointSpaceError` that names the folder, the bytes
needed and the bytes free; a save that still hits ENOSPC is aborted (:func:`abort_checkpoint`) and the last good
checkpoint stays as it was.

Loading uses ``torch.load(weights_only=True)``: everything saved here is tensors and plain containers (RNG states are
converted to tensors/ints), so nothing is unpickled.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save_file as safetensors_save_file

__all__ = ["latest_checkpoint", "list_checkpoints", "resumable_checkpoint", "verify_checkpoint", "read_manifest",
           "begin_checkpoint", "commit_checkpoint", "abort_checkpoint", "clean_partial", "rotate_checkpoints",
           "save_checkpoint", "checkpoint_size", "CheckpointError", "CheckpointSpaceError", "capture_rng_states",
           "restore_rng_states", "save_rng_states", "load_rng_states", "save_model_state", "load_model_state",
           "save_tensor_state", "load_tensor_state"]

FORMAT_VERSION = 2
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-step-"
TRASH_PREFIX = ".trash-"
META_FILE = "checkpoint.json"
SPACE_MARGIN = 1.1          # free space asked for: the previous checkpoint's size + 10%
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (the message names the folder and what is wrong)."""


class CheckpointSpaceError(CheckpointError):
    """Not enough free disk space for the next checkpoint."""




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


def save_tensor_state(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of tensors and plain containers (e.g. an optimizer state dict), fsynced."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_tensor_state(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """What :func:`save_tensor_state` wrote, with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------------------------------------------
# listing and verification


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` (those with a manifest) as (step, path), oldest first."""
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
    """The complete checkpoint with the highest step in ``output_dir`` (None if there is none); not verified."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def checkpoint_size(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of a checkpoint folder; :class:`CheckpointError` if missing or unreadable."""
    meta = Path(path) / META_FILE
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint: no {META_FILE}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta} is unreadable: {e}") from None
    if not isinstance(info, dict) or "step" not in info:
        raise CheckpointError(f"{meta} is not a checkpoint manifest")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {info.get('format_version')} is newer than this "
                              f"llm_trainer supports ({FORMAT_VERSION})")
    return info


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty: intact): a missing or unreadable manifest, a missing
    file, a size or SHA-256 that differs from the manifest (truncation, a flipped bit)."""
    path = Path(path)
    try:
        info = read_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    files = info.get("files", {})
    if isinstance(files, list):                       # format 1 (no checksums): existence only
        return [f"{path / f}: missing" for f in files if not (path / f).is_file()]
    problems = []
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        elif _sha256(f) != want["sha256"]:
            problems.append(f"{f}: SHA-256 differs from the manifest (corrupted)")
    return problems


def resumable_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest checkpoint of ``output_dir`` that verifies, and ``(path, problems)`` of each newer one skipped."""
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


# --------------------------------------------------------------------------------------------------------------
# saving


def clean_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary and trash folders killed saves and rotations left behind; returns what was removed."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def begin_checkpoint(output_dir: str | os.PathLike, step: int, needed_bytes: int | None = None) -> Path:
    """Create an empty ``output_dir/.tmp-step-<step>`` (removing leftovers of killed saves) and return it.
    ``needed_bytes``: refuse with :class:`CheckpointSpaceError` unless that much (+10%) is free on the disk."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_partial(root)
    if needed_bytes:
        free = shutil.disk_usage(root).free
        want = int(needed_bytes * SPACE_MARGIN)
        if free < want:
            raise CheckpointSpaceError(
                f"not enough disk space for checkpoint-{step} in {root}: about {want:,} bytes needed (the previous "
                f"checkpoint took {needed_bytes:,}), {free:,} free. Free some space, point output_dir elsewhere, or "
                f"lower keep_last_checkpoints; the last checkpoint is intact")
    tmp = root / f"{TMP_PREFIX}{step}"
    tmp.mkdir()
    return tmp


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is "no space left on device" — also from writers such as safetensors
    that do not raise OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def abort_checkpoint(tmp: str | os.PathLike, error: BaseException | None = None) -> None:
    """Remove a half-written temporary checkpoint folder; when ``error`` is a full disk, raise
    :class:`CheckpointSpaceError` naming the folder and the bytes it had written."""
    tmp = Path(tmp)
    written = checkpoint_size(tmp) if tmp.is_dir() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    if is_disk_full(error):
        free = shutil.disk_usage(tmp.parent).free
        raise CheckpointSpaceError(f"the disk of {tmp.parent} filled up while writing {tmp.name} ({written:,} bytes "
                                   f"written, {free:,} free); the partial checkpoint was removed and the last "
                                   f"checkpoint is intact") from error


def commit_checkpoint(output_dir: str | os.PathLike, step: int, keep_last: int | None = None,
                      meta: dict[str, Any] | None = None) -> Path:
    """fsync the temp dir written since :func:`begin_checkpoint`, write the manifest (sizes and SHA-256 of every
    file), rename to ``checkpoint-<step>`` (replacing an existing one of the same step) and rotate to the last
    ``keep_last``."""
    root = Path(output_dir)
    tmp = root / f"{TMP_PREFIX}{step}"
    if not tmp.is_dir():
        raise FileNotFoundError(f"commit_checkpoint: {tmp} does not exist (call begin_checkpoint first)")
    _fsync_tree(tmp)
    files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    info = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(), "files": files, **(meta or {})}
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
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
    """Delete all but the ``keep_last`` newest complete checkpoints (never ``protect``)."""
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


def save_checkpoint(output_dir: str | os.PathLike, step: int, write: Callable[[Path], None], *,
                    keep_last: int | None = None, meta: dict[str, Any] | None = None,
                    needed_bytes: int | None = None) -> Path:
    """One process's atomic save: :func:`begin_checkpoint`, ``write(tmp_dir)``, :func:`commit_checkpoint`. A write
    that raises leaves no temporary folder behind (ENOSPC becomes :class:`CheckpointSpaceError`)."""
    tmp = begin_checkpoint(output_dir, step, needed_bytes)
    try:
        write(tmp)
    except BaseException as e:
        abort_checkpoint(tmp, e)
        raise
    return commit_checkpoint(output_dir, step, keep_last=keep_last, meta=meta)
