"""Hugging Face-format folders: `config.json` (+ `generation_config.json`) and one or many `*.safetensors`
(sharded ones listed in `model.safetensors.index.json`). No dependency on `transformers`.

Loading is strict: unknown architecture, missing tensor, unexpected tensor or shape mismatch raise errors naming
the key and file. Tolerated on purpose (HF does the same): `lm_head.weight` in a tied checkpoint and legacy
`rotary_emb.inv_freq` buffers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """`5GB` → 5·10⁹, `100MiB` → 100·2²⁰; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse max_shard_size {size!r} (use e.g. 5GB, 500MB, 2GiB or an int of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ---------------------------------------------------------------------------------------------------- reading
def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{INDEX_FILE} in {path} lists {f.name}, which does not exist")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found {[f.name for f in found]})")


def _ignored(key: str, config: ModelConfig) -> bool:
    return key.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and key == "lm_head.weight")


def _param_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def load_hf_state_dict(model: nn.Module, path: str | Path) -> None:
    """Copy every tensor of the HF folder `path` into `model`, one tensor at a time (lazy `safe_open`).

    All file headers are checked first (missing / unexpected keys, shapes), so nothing is written on error.
    Tensors are cast to each parameter's dtype. ZeRO-3 partitioned parameters (`ds_id`) are gathered one at a
    time with `deepspeed.zero.GatheredParameters(modifier_rank=0)`; every rank must call this function.
    """
    path = Path(path)
    targets = dict(model.state_dict(keep_vars=True))
    found: dict[str, Path] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if _ignored(key, model.config):
                    continue
                if key not in targets:
                    raise KeyError(f"unexpected tensor {key!r} in {f} (no such parameter in the model)")
                if key in found:
                    raise KeyError(f"tensor {key!r} appears in both {found[key]} and {f}")
                shape = tuple(fh.get_slice(key).get_shape())
                want = _param_shape(targets[key])
                if shape != want:
                    raise ValueError(f"shape mismatch for {key!r} in {f}: checkpoint {shape}, model expects {want}")
                found[key] = f
    missing = [k for k in targets if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KeyError(f"missing tensor {missing[0]!r}{more} in checkpoint folder {path}")

    by_file: dict[Path, list[str]] = {}
    for key, f in found.items():
        by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for key in keys:
                _copy_into(targets[key], fh.get_tensor(key))


@torch.no_grad()
def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        import deepspeed
        import torch.distributed as dist

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if not dist.is_initialized() or dist.get_rank() == 0:
                param.data.copy_(value.to(param.dtype))
        return
    param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def read_config(path: str | Path) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))


# ---------------------------------------------------------------------------------------------------- writing
def current_umask() -> int:
    """The process's file-mode creation mask: read from ``/proc/self/status`` where Linux has it (the mask is never
    changed, not even briefly); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` gives: ``0o666 & ~umask``. The ``safetensors`` writer
    creates its files owner-only (0600), which would lock the group and others out of a shared model folder."""
    os.chmod(path, 0o666 & ~current_umask())


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `model` as a HF folder. `state_dict` overrides the model's own (e.g. a gathered ZeRO-3 one).

    Files are written into a temporary sibling folder first. A new `path` is created by one rename; into an
    existing folder each file is moved by an atomic `os.replace` (other files such as tokenizers are kept and
    stale weight files of an earlier save are removed).
    """
    path = Path(path)
    config = model.config
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if not _ignored(k, config)}
    shards = _shards(tensors, parse_size(max_shard_size))
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            set_default_file_mode(tmp / name)
        written = list(names)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
            written.append(INDEX_FILE)
        hf = config.to_hf_dict()
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        written.append("config.json")
        gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(config, k) is not None}
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
            written.append("generation_config.json")

        if not path.exists():
            os.replace(tmp, path)
            return
        for name in written:  # weights first, then the index/config that point at them
            os.replace(tmp / name, path / name)
        stale = [f for f in path.glob("*.safetensors") if f.name not in written]
        if n == 1 and (path / INDEX_FILE).exists():
            stale.append(path / INDEX_FILE)
        for f in stale:
            f.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
