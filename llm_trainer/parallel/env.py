"""The distributed launch environment: the ONLY module of llm_trainer that reads the launcher's variables.

Launchers (``torchrun``, the ``deepspeed`` launcher, ``smart_train``/``ddp_train``/``ds_train``) describe the
process to itself through ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR`` /
``MASTER_PORT``.  :func:`read_env` turns them into a validated, immutable :class:`DistEnv`; everything else in the
library receives that object (or a backend built from it) instead of touching ``os.environ``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

__all__ = ["DistEnv", "read_env", "ensure_rendezvous_env", "find_free_port"]

_DEFAULT_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``world_size == 1`` means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE={self.world_size}), got {self.rank}")
        if self.local_world_size < 1 or self.local_world_size > self.world_size:
            raise ValueError(f"LOCAL_WORLD_SIZE must be in [1, WORLD_SIZE={self.world_size}], "
                             f"got {self.local_world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE={self.local_world_size}), "
                             f"got {self.local_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port, got {self.master_port}")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        """Number of nodes, assuming the same number of processes on every node (what torchrun launches)."""
        return max(1, self.world_size // self.local_world_size)


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


BACKEND_ENV = "LLM_TRAINER_BACKEND"


def launcher_backend(environ: Mapping[str, str] | None = None) -> str:
    """The backend a launcher asked for (``ds_train`` → 'deepspeed', ``ddp_train`` → 'ddp'), else 'auto'."""
    env = os.environ if environ is None else environ
    return env.get(BACKEND_ENV, "") or "auto"


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher variables (default: ``os.environ``) into a :class:`DistEnv`.

    Unset variables mean a single-process run. ``LOCAL_RANK`` defaults to ``RANK`` and ``LOCAL_WORLD_SIZE`` to
    ``WORLD_SIZE`` (one node) when a launcher sets only the global pair.
    """
    environ = os.environ if environ is None else environ
    world_size = _int(environ, "WORLD_SIZE", 1)
    rank = _int(environ, "RANK", 0)
    local_rank = _int(environ, "LOCAL_RANK", rank)
    local_world_size = _int(environ, "LOCAL_WORLD_SIZE", world_size)
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=environ.get("MASTER_ADDR") or None,
        master_port=_int(environ, "MASTER_PORT", None),
    )


def find_free_port(host: str = _DEFAULT_ADDR) -> int:
    """An unused TCP port on ``host`` (there is a small race until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_rendezvous_env(env: DistEnv) -> DistEnv:
    """Make ``env://`` initialisation possible for a process no launcher started.

    ``torch.distributed`` and DeepSpeed read the rendezvous variables themselves; a plain ``python train.py`` run
    that still wants a (1-rank) process group, e.g. DeepSpeed on one device, gets them here. Variables already set
    are left alone. Returns the environment as it is now.
    """
    defaults = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr or _DEFAULT_ADDR,
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("MASTER_PORT"):
        if env.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; start it with a launcher "
                               "(smart_train, ddp_train, ds_train or torchrun)")
        os.environ["MASTER_PORT"] = str(env.master_port or find_free_port())
    return read_env()
