"""Saving and resuming a training run: what the loop puts into a checkpoint and how it reads it back.

A checkpoint is ``output_dir/checkpoint-<step>/`` (atomic and verified, see :mod:`llm_trainer.checkpoint` for the
transaction and the manifest of sizes and SHA-256 sums)::

    backend/                  the backend's model + optimizer state (torch: safetensors + tensor state; DeepSpeed:
                              its shards)
    rng_rank<r>.pt            every RNG of rank r (tensors and plain values: loadable with ``weights_only=True``)
    trainer_state.json        step, epoch, data position, tokens seen, schedule, batch geometry
    <extra>                   trainer-specific state (PPO's KL controller and reward statistics)
    checkpoint.json           the manifest, written last

Start-up rules: leftovers of killed saves are removed; a fresh run (``resume_from=None``) into a folder that holds
an earlier run is refused unless ``overwrite_output_dir=True``; ``resume_from='auto'`` takes the newest checkpoint
that verifies and warns about each newer one it skips; an explicit checkpoint path that does not verify raises.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..metrics import METRICS_FILE

TRAINER_STATE_FILE = "trainer_state.json"
RUN_FILES = (METRICS_FILE, "samples.jsonl")


class CheckpointingMixin:
    """Output folder, ``save_checkpoint`` and ``maybe_resume`` of `BaseTrainer` (uses its backend, scheduler and
    data positions)."""

    # ------------------------------------------------------------------------------------------ output dir
    def prepare_output_dir(self) -> None:
        """Remove partial saves; refuse (or, with ``overwrite_output_dir``, clear) an earlier run's checkpoints and
        metrics when this run starts fresh. Collective."""
        cfg, out = self.config, self.output_dir
        if self.backend.is_main and out.is_dir():
            for p in ckpt.clean_partial(out):
                warnings.warn(f"removed {p}, the partial checkpoint of an interrupted save", stacklevel=2)
            earlier = [p for _, p in ckpt.list_checkpoints(out)] + [out / f for f in RUN_FILES if (out / f).exists()]
            if cfg.resume_from is None and earlier:
                if not cfg.overwrite_output_dir:
                    raise FileExistsError(
                        f"{out} holds an earlier run ({', '.join(p.name for p in earlier[:4])}"
                        f"{', ...' if len(earlier) > 4 else ''}); a fresh run would mix its metrics and its checkpoint "
                        f"rotation would delete the new checkpoints. Set TrainConfig.resume_from='auto' to continue "
                        f"it, overwrite_output_dir=True to start over, or choose another output_dir")
                for p in earlier:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.backend.barrier()

    # --------------------------------------------------------------------------------------------- saving
    def trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "global_step": self.global_step, "epoch": self.epoch,
                "epoch_position": self.epoch_position, "tokens_seen": self.tokens_seen,
                "scheduler": self.scheduler.state_dict(), "batch_size": self.config.batch_size,
                "grad_accum": self.grad_accum, "world_size": self.backend.world_size}

    def save_checkpoint(self) -> Path | None:
        """Atomic checkpoint (temp folder, then rename) of model, optimizer, schedule, data position, RNG. Refused
        before it starts when the disk lacks the room the previous checkpoint took; a save that fails on any rank
        (e.g. the disk filled up) is removed and the last good checkpoint stays. Collective."""
        backend = self.backend
        tmp = None
        if backend.is_main:
            previous = ckpt.latest_checkpoint(self.output_dir)
            needed = ckpt.checkpoint_size(previous) if previous is not None else None
            tmp = ckpt.begin_checkpoint(self.output_dir, self.global_step, needed_bytes=needed)
        tmp = Path(backend.broadcast_object(str(tmp) if tmp else None))
        error: BaseException | None = None
        try:
            backend.save(str(tmp / "backend"), client_state={})
            ckpt.save_rng_states(tmp / f"rng_rank{backend.rank}.pt")
            self.save_extra_state(tmp)
            if backend.is_main:
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(self.trainer_state(), indent=2))
        except Exception as e:  # noqa: BLE001 - every rank must learn that the save failed
            error = e
        failed = torch.tensor([0.0 if error is None else 1.0])
        if float(backend.all_reduce(failed, "max")[0]) > 0:
            if backend.is_main:
                ckpt.abort_checkpoint(tmp, error)
            raise ckpt.CheckpointError(f"saving {tmp.name} failed on a rank ({error or 'see that rank'}); the "
                                       f"partial checkpoint was removed, the last checkpoint is intact") from error
        path = None
        if backend.is_main:
            path = ckpt.commit_checkpoint(self.output_dir, self.global_step,
                                          keep_last=self.config.keep_last_checkpoints, meta={"stage": self.stage})
        backend.barrier()
        self.callbacks("on_save", self, path)
        return path

    def save_extra_state(self, directory: Path) -> None:
        """Trainers with more state (reward normalisers, KL controllers) write it here."""

    def load_extra_state(self, directory: Path) -> None:
        """Read what :meth:`save_extra_state` wrote."""

    # -------------------------------------------------------------------------------------------- resuming
    def _checkpoint_to_resume(self) -> Path | None:
        """Chosen (and verified) by the main rank; every rank gets its choice, or its error."""
        found: tuple[str | None, str | None] = (None, None)
        if self.backend.is_main:
            try:
                path = self._verified_checkpoint()
                found = (str(path) if path is not None else None, None)
            except ckpt.CheckpointError as e:
                found = (None, str(e))
        path, error = self.backend.broadcast_object(found)
        if error is not None:
            raise ckpt.CheckpointError(error)
        return Path(path) if path is not None else None

    def _verified_checkpoint(self) -> Path | None:
        rf = self.config.resume_from
        if rf == "auto":
            path, skipped = ckpt.resumable_checkpoint(self.output_dir)
            for bad, problems in skipped:
                warnings.warn(f"skipping {bad}: {'; '.join(problems[:3])}; resuming from "
                              f"{path.name if path else 'scratch'} instead", stacklevel=3)
            return path
        path = Path(rf)
        problems = ckpt.verify_checkpoint(path)
        if problems:
            raise ckpt.CheckpointError(f"resume_from={rf!r} is not an intact checkpoint: {'; '.join(problems)} "
                                       f"(resume_from='auto' falls back to the newest intact one)")
        return path

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        now = {"batch_size": self.config.batch_size, "world_size": self.backend.world_size,
               "grad_accum": self.grad_accum}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) not in (None, v)}
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.epoch_position = int(state["epoch_position"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.scheduler.load_state_dict(state["scheduler"])
        if changed:
            self._reshard(state, changed)

    def _reshard(self, state: dict[str, Any], changed: dict[str, tuple]) -> None:
        what = ", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items())
        if not self.config.reshard_on_resume:
            raise ValueError(f"cannot resume exactly: the checkpoint was written with another geometry ({what}); "
                             f"set TrainConfig.reshard_on_resume=True to continue from the same global sample "
                             f"position (up to one global batch is seen twice), or start a new output_dir")
        if not self.backend.can_load_other_world_size and "world_size" in changed:
            raise ValueError(f"cannot resume on another world size ({what}): {type(self.backend).__name__} "
                             f"checkpoints are partitioned per rank; resume with the original world size")
        consumed = self.epoch_position * int(state["batch_size"]) * int(state["world_size"])
        per_position = self.config.batch_size * self.backend.world_size
        self.epoch_position = consumed // per_position
        warnings.warn(f"re-sharded the data position ({what}): {consumed:,} samples of epoch {self.epoch} were "
                      f"consumed, this run continues at sample {self.epoch_position * per_position:,}; dropout and "
                      f"sampling RNGs restart", stacklevel=3)

    def maybe_resume(self) -> dict | None:
        """Restore the checkpoint ``resume_from`` names (sets ``resumed_from``); returns this rank's saved RNG
        states, restored by the caller once setup is done (None when not resuming, re-sharded, or missing)."""
        if self.config.resume_from is None:
            return None
        path = self._checkpoint_to_resume()
        if path is None:
            return None
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
        if state.get("stage") not in (None, self.stage):
            raise ValueError(f"resume_from={self.config.resume_from!r}: {path} is a {state['stage']!r} checkpoint, "
                             f"this is a {self.stage!r} trainer; use a separate output_dir per stage")
        self.backend.load(str(path / "backend"))
        self.load_trainer_state(state)
        self.load_extra_state(path)
        self.resumed_from = path
        if state.get("world_size", self.backend.world_size) != self.backend.world_size:
            return None
        rng_file = path / f"rng_rank{self.backend.rank}.pt"
        if not rng_file.is_file():
            warnings.warn(f"{rng_file} is missing: dropout and sampling will not repeat the interrupted run "
                          f"exactly (the resume is not bit-exact)", stacklevel=2)
            return None
        return ckpt.load_rng_states(rng_file)

    def restore_rng(self, states: dict) -> None:
        ckpt.restore_rng_states(states)
