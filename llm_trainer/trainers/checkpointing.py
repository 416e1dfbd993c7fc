"""Saving and resuming a training run: what the loop puts into a checkpoint and how it reads it back.

A checkpoint is ``output_dir/checkpoint-<step>/`` (atomic, see :mod:`llm_trainer.checkpoint` for the transaction and
the manifest):

    backend/                  the backend's model + optimizer state (torch: safetensors + optimizer state; DeepSpeed:
                              its shards)
    rng_rank<r>.pt            every RNG of rank r (tensors and plain values: loadable with ``weights_only=True``)
    trainer_state.json        step, epoch, data position, tokens seen, schedule, batch geometry
    <extra>                   trainer-specific state (PPO's KL controller and reward statistics)
    checkpoint.json           the manifest, written last
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt

TRAINER_STATE_FILE = "trainer_state.json"


class CheckpointingMixin:
    """``save_checkpoint`` / ``maybe_resume`` of `BaseTrainer` (uses its backend, scheduler and positions)."""

    def trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "global_step": self.global_step, "epoch": self.epoch,
                "epoch_position": self.epoch_position, "tokens_seen": self.tokens_seen,
                "scheduler": self.scheduler.state_dict(), "batch_size": self.config.batch_size,
                "grad_accum": self.grad_accum, "world_size": self.backend.world_size}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        now = {"batch_size": self.config.batch_size, "grad_accum": self.grad_accum,
               "world_size": self.backend.world_size}
        for key, value in now.items():
            if state.get(key) not in (None, value):
                raise ValueError(f"cannot resume: the checkpoint was written with {key}={state[key]}, this run "
                                 f"uses {value}; the data position would not be the same (start a new output_dir)")
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.epoch_position = int(state["epoch_position"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.scheduler.load_state_dict(state["scheduler"])

    def save_checkpoint(self) -> Path | None:
        """Atomic checkpoint (temp folder, then rename) of model, optimizer, schedule, data position, RNG."""
        backend = self.backend
        tmp = ckpt.begin_checkpoint(self.output_dir, self.global_step) if backend.is_main else None
        tmp = Path(backend.broadcast_object(str(tmp) if tmp else None))
        backend.save(str(tmp / "backend"), client_state={})
        ckpt.save_rng_states(tmp / f"rng_rank{backend.rank}.pt")
        self.save_extra_state(tmp)
        backend.barrier()
        path = None
        if backend.is_main:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(self.trainer_state(), indent=2))
            path = ckpt.commit_checkpoint(self.output_dir, self.global_step,
                                          keep_last=self.config.keep_last_checkpoints, meta={"stage": self.stage})
        backend.barrier()
        return path

    def save_extra_state(self, directory: Path) -> None:
        """Trainers with more state (reward normalisers, KL controllers) write it here."""

    def load_extra_state(self, directory: Path) -> None:
        """Read what :meth:`save_extra_state` wrote."""

    def maybe_resume(self) -> dict | None:
        """Restore the checkpoint ``resume_from`` names (sets ``resumed_from``); returns this rank's saved RNG
        states, restored by the caller once setup is done (None when not resuming or the file is missing)."""
        rf = self.config.resume_from
        if rf is None:
            return None
        path = ckpt.latest_checkpoint(self.output_dir) if rf == "auto" else Path(rf)
        if path is None:
            return None
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from={rf!r}: {path} is not a complete checkpoint "
                                    f"(no {TRAINER_STATE_FILE})")
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
        if state.get("stage") not in (None, self.stage):
            raise ValueError(f"resume_from={rf!r}: {path} is a {state['stage']!r} checkpoint, this is a "
                             f"{self.stage!r} trainer; use a separate output_dir per stage")
        self.backend.load(str(path / "backend"))
        self.load_trainer_state(state)
        self.load_extra_state(path)
        self.resumed_from = path
        rng_file = path / f"rng_rank{self.backend.rank}.pt"
        if not rng_file.is_file():
            warnings.warn(f"{rng_file} is missing: dropout and sampling will not repeat the interrupted run "
                          f"exactly (the resume is not bit-exact)", stacklevel=2)
            return None
        return ckpt.load_rng_states(rng_file)

    def restore_rng(self, states: dict) -> None:
        ckpt.restore_rng_states(states)
