"""The one training loop. Every trainer (pretrain, SFT, DPO, reward, GRPO, PPO) plugs into `BaseTrainer`.

A trainer supplies:

* ``build_dataset(files)`` and ``collate(items)`` — the data of its stage;
* ``count_units(batch)`` — how many loss units (tokens, pairs, sequences) a micro-batch holds;
* ``compute_loss(model, batch) -> LossOutput`` — the *sum* of the loss over those units, plus metric sums.

The loop normalises every micro-batch loss by the number of units in the whole accumulation window summed over
all ranks, so ``batch 8 × accumulation 1`` and ``batch 2 × accumulation 4`` give the same update, and 2 ranks give
the same update as one process on the same global batch (backends sum gradients, see ``parallel/base.py``).
RL trainers override ``training_windows()`` to insert a rollout phase that fills a buffer the same loop consumes.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..configs import TrainConfig
from ..metrics import MetricsLogger, estimate_mfu, peak_flops_for_device, peak_memory_bytes
from ..optim import build_optimizer
from ..scheduler import WarmupCosineScheduler
from .setup import (build_backend, build_model, build_tokenizer, export_model, resolve_model_config,
                    trainable_parameters)

TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class LossOutput:
    """What ``compute_loss`` returns for one micro-batch.

    ``loss``: the loss summed over the micro-batch's units (what ``count_units`` counted).
    ``aux_loss``: an already-averaged extra term (MoE load balancing); the loop weights it by the micro-batch's
    share of the window's units and logs it separately. ``metrics``: sums over the same units (logged as means).
    ``extra``: plain floats logged as given (averaged over micro-batches and ranks)."""

    loss: torch.Tensor
    aux_loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


def _is_streaming(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


class NonFiniteLossError(FloatingPointError):
    pass


MAX_CONSECUTIVE_SKIPS = 10   # nan_policy='skip' gives up after this many non-finite updates in a row


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class BaseTrainer:
    """Owns the loop: epochs/steps, accumulation, clipping, schedule, eval, checkpoints, resume, logging."""

    stage: str = "pretrain"
    loss_unit: str = "tokens"

    def __init__(self, *, train_config: TrainConfig, eval_prompts: list[str] | None = None,
                 generation_service: Any = None, eval_image_tags: list[Any] | None = None) -> None:
        self.config = cfg = train_config
        self.eval_prompts = list(eval_prompts or [])
        self.eval_image_tags = eval_image_tags
        self.generation_service = generation_service
        self.output_dir = Path(cfg.output_dir)
        self.stage_config = self.get_stage_config()
        self.grad_accum = int(getattr(self.stage_config, "gradient_accumulation_steps", 1) or 1)

        self.backend = build_backend(cfg)
        self.device = self.backend.device
        seed_everything(cfg.seed)                       # identical model init on every rank
        self.tokenizer = build_tokenizer(cfg)
        self.model_config = resolve_model_config(cfg)
        model = build_model(cfg, self.model_config, self.backend)
        model = self.prepare_model(model) or model      # a trainer may wrap the model (reward head)
        self.optimizer = self.build_optimizer(model)
        self.model = self.backend.wrap(model, self.optimizer, micro_batch_size=self.micro_batch_size(),
                                       grad_accum=self.grad_accum, grad_clip=cfg.max_grad_norm)
        self.setup_extra_models()
        self.setup_data()
        self.total_steps = self.compute_total_steps()
        self.scheduler = WarmupCosineScheduler(self.optimizer, cfg.optim_config, total_steps=self.total_steps)
        self.global_step = 0
        self.epoch = 0
        self.epoch_position = 0                          # micro-batches of the current epoch already consumed
        self.tokens_seen = 0
        resumed = self.maybe_resume()
        seed_everything(cfg.seed + 1000 * (self.backend.rank + 1) + self.global_step)   # dropout/sampling per rank
        self._restore_rng_after_setup()
        self.metrics = MetricsLogger(self.output_dir, self.backend.is_main, total_steps=self.total_steps,
                                     report_to=cfg.report_to, run_name=cfg.run_name,
                                     resume_step=self.global_step if resumed else None,
                                     config=_safe_config_dict(cfg))
        self._peak_flops = peak_flops_for_device(self.device)

    # ------------------------------------------------------------------------------------------------ hooks
    def get_stage_config(self) -> Any:
        return None

    def micro_batch_size(self) -> int:
        return self.config.batch_size

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Freeze parts, add heads … before the optimizer is built; may return a module that replaces ``model``."""

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters (PPO overrides it: value-model parameter groups)."""
        return build_optimizer(trainable_parameters(model), self.config.optim_config)

    def setup_extra_models(self) -> None:
        """Reference/value/teacher models (after the policy is wrapped)."""

    def build_dataset(self, files: Any) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count_units(self, batch: dict[str, Any]) -> int:
        """Loss tokens of a batch: next-token labels that are not ignored."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens processed by the forward pass (throughput)."""
        mask = batch.get("attention_mask")
        if mask is not None:
            return int(mask.sum())
        ids = batch.get("input_ids")
        return int(ids.numel()) if ids is not None else 0

    # ------------------------------------------------------------------------------------------------- data
    def setup_data(self) -> None:
        from ..data.sampler import ShardedSampler
        cfg = self.config
        if cfg.file_dataset is None:
            raise ValueError(f"TrainConfig.file_dataset: {type(self).__name__} needs training data")
        self.train_dataset = self.build_dataset(cfg.file_dataset)
        self.eval_dataset = self.build_dataset(cfg.eval_file_dataset) if cfg.eval_file_dataset else None
        dl = cfg.data_loader_config
        if _is_streaming(self.train_dataset):   # .jsonl text tokenised on the fly: no length, no O(1) seek
            self.sampler = None
            return
        if len(self.train_dataset) == 0:
            raise ValueError(f"TrainConfig.file_dataset: no samples in {cfg.file_dataset!r}")
        self.sampler = ShardedSampler(len(self.train_dataset), rank=self.backend.rank,
                                      world_size=self.backend.world_size, seed=cfg.seed, shuffle=dl.shuffle,
                                      drop_last=True)

    def steps_per_epoch(self) -> int:
        if self.sampler is None:
            return 0                                   # a stream's length is unknown
        micro = len(self.sampler) // self.config.batch_size
        return micro // self.grad_accum

    def compute_total_steps(self) -> int:
        if self.sampler is None:
            if not self.config.max_steps:
                raise ValueError(f"TrainConfig.max_steps: {self.config.file_dataset!r} is streamed (tokenised on "
                                 f"the fly) and has no length, so set max_steps — or run prepare_data to get a "
                                 f".npy with epochs, exact resume and balanced ranks")
            return self.config.max_steps
        per_epoch = self.steps_per_epoch()
        if per_epoch == 0:
            raise ValueError(
                f"not enough data for one optimizer step: {len(self.sampler)} samples per rank < batch_size "
                f"{self.config.batch_size} × gradient_accumulation_steps {self.grad_accum}")
        total = per_epoch * self.config.n_epochs
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def _loader(self, dataset, sampler_start: int, epoch: int, shuffle: bool = True):
        from ..data.sampler import ShardedSampler
        dl = self.config.data_loader_config
        if _is_streaming(dataset):
            # this rank's shard of the stream, skipping the windows it already trained on (read, not seeked)
            stream = copy.copy(dataset)
            stream.rank, stream.world_size, stream.start = self.backend.rank, self.backend.world_size, sampler_start
            return torch.utils.data.DataLoader(stream, batch_size=self.config.batch_size, collate_fn=self.collate,
                                               num_workers=dl.num_workers, pin_memory=dl.pin_memory, drop_last=True)
        sampler = ShardedSampler(len(dataset), rank=self.backend.rank, world_size=self.backend.world_size,
                                 seed=self.config.seed, shuffle=shuffle and dl.shuffle, drop_last=True)
        sampler.set_epoch(epoch, start=sampler_start)
        return torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler,
                                           collate_fn=self.collate, num_workers=dl.num_workers,
                                           pin_memory=dl.pin_memory, drop_last=True,
                                           # its own generator: creating an iterator must not consume the global
                                           # RNG that dropout uses, or a resumed run would diverge
                                           generator=torch.Generator().manual_seed(self.config.seed + epoch))

    def training_windows(self) -> Iterator[list[dict[str, Any]]]:
        """Yield accumulation windows (lists of micro-batches) until ``total_steps``; keeps the data position."""
        k = self.grad_accum
        while self.global_step < self.total_steps:
            loader = self._loader(self.train_dataset, self.epoch_position * self.config.batch_size, self.epoch)
            window: list[dict[str, Any]] = []
            produced = False
            for batch in loader:
                window.append(batch)
                if len(window) == k:
                    self.epoch_position += k
                    produced = True
                    yield window
                    window = []
                    if self.global_step >= self.total_steps:
                        return
            if not produced and self.epoch_position == 0:
                raise ValueError(f"TrainConfig.file_dataset: {self.config.file_dataset!r} gave rank "
                                 f"{self.backend.rank} not one accumulation window (batch_size "
                                 f"{self.config.batch_size} × {k}) in a whole epoch")
            self.epoch += 1
            self.epoch_position = 0
            self.on_epoch_end()

    def on_epoch_end(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Run until ``max_steps`` / ``n_epochs``; returns the last logged metrics."""
        cfg = self.config
        last: dict[str, Any] = {}
        t_log, tokens_log, samples_log = time.monotonic(), 0, 0
        try:
            for window in self.training_windows():
                stats = self.train_step(window)
                tokens_log += stats.pop("_tokens")
                samples_log += stats.pop("_samples")
                if stats.pop("_skipped", False):
                    continue
                if self.global_step % cfg.log_interval == 0 or self.global_step == self.total_steps:
                    dt = max(time.monotonic() - t_log, 1e-9)
                    tps = tokens_log / dt
                    stats.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=tps,
                                 samples_per_s=samples_log / dt, tokens_seen=self.tokens_seen,
                                 mfu=estimate_mfu(self._flops_per_token(), tps, self._peak_flops),
                                 peak_mem=peak_memory_bytes(self.device))
                    last = self.metrics.log(stats, step=self.global_step, epoch=self._epoch_float()) or stats
                    t_log, tokens_log, samples_log = time.monotonic(), 0, 0
                if cfg.eval_interval and self.global_step % cfg.eval_interval == 0:
                    last.update(self.evaluate())
                if cfg.save_interval and self.global_step % cfg.save_interval == 0:
                    self.save_checkpoint()
            if cfg.save_interval and self.global_step % cfg.save_interval != 0:
                self.save_checkpoint()
            if cfg.eval_interval and self.global_step % cfg.eval_interval != 0:
                last.update(self.evaluate())
            self.export()
        finally:
            self.metrics.close()
        return last

    def train_step(self, window: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer update over an accumulation window."""
        backend, model = self.backend, self.model
        model.train()
        units = [self.count_units(b) for b in window]
        totals = torch.tensor([float(sum(units))], dtype=torch.float64)
        backend.all_reduce(totals)
        global_units = float(totals[0])
        sums: dict[str, float] = {}
        extras: dict[str, float] = {}
        loss_sum = aux_sum = 0.0
        tokens = 0
        for i, (batch, n) in enumerate(zip(window, units)):
            batch = self.to_device(batch)
            tokens += self.batch_tokens(batch)
            sync = backend.no_sync() if i < len(window) - 1 else contextlib.nullcontext()
            with sync:
                with backend.autocast():
                    out = self.compute_loss(model, batch)
                loss = out.loss.float()
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss.float() * n
                    aux_sum += float(out.aux_loss.detach()) * n
                # agree across ranks *before* backward: a non-finite window is skipped without touching gradients
                # (DeepSpeed cannot discard reduced gradients afterwards)
                flag = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0])
                if float(backend.all_reduce(flag, op="max")[0]) > 0:
                    return self._non_finite(backward_done=i > 0)
                backend.backward(loss / max(global_units, 1.0))
            loss_sum += float(out.loss.detach())
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
            for key, value in out.extra.items():
                extras[key] = extras.get(key, 0.0) + float(value) / len(window)

        keys = sorted(sums)
        ekeys = sorted(extras)
        samples = sum(self._batch_samples(b) for b in window)
        packed = torch.tensor([loss_sum, aux_sum, float(tokens), float(samples)]
                              + [sums[k] for k in keys] + [extras[k] for k in ekeys], dtype=torch.float64)
        backend.all_reduce(packed)
        loss_sum, aux_sum, tokens, samples = packed[:4].tolist()
        self._consecutive_skips = 0
        grad_norm = backend.clip(self.config.max_grad_norm)
        step_norm = backend.step()
        grad_norm = step_norm if grad_norm is None else grad_norm
        backend.zero_grad()
        self.scheduler.step()
        self.global_step += 1
        self.tokens_seen += int(tokens)
        denom = max(global_units, 1.0)
        stats: dict[str, Any] = {"loss": loss_sum / denom, "grad_norm": grad_norm}
        if aux_sum:
            stats["aux_loss"] = aux_sum / denom
        for j, key in enumerate(keys):
            stats[key] = packed[4 + j].item() / denom
        for j, key in enumerate(ekeys):
            stats[key] = packed[4 + len(keys) + j].item() / backend.world_size
        stats[f"{self.loss_unit}_per_step"] = global_units
        stats["_tokens"], stats["_samples"] = int(tokens), int(samples)
        return stats

    def _non_finite(self, backward_done: bool) -> dict[str, Any]:
        """A micro-batch's loss is NaN/inf on some rank: stop with a clear error, or (``nan_policy='skip'``) drop
        the window's update. Every rank reaches this together (the check is all-reduced)."""
        where = (f"step {self.global_step + 1} (epoch {self.epoch}, samples from position "
                 f"{self.epoch_position * self.config.batch_size} of the epoch)")
        if self.config.nan_policy == "stop":
            raise NonFiniteLossError(f"non-finite loss at {where}: stopping. Lower the learning rate, check the "
                                     f"data, or set TrainConfig.nan_policy='skip' to skip such updates")
        if backward_done and not self.backend.can_discard_gradients:
            raise NonFiniteLossError(f"non-finite loss at {where} after earlier micro-batches of the window were "
                                     f"already reduced; {type(self.backend).__name__} cannot discard them")
        self.backend.zero_grad()
        self._consecutive_skips = getattr(self, "_consecutive_skips", 0) + 1
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(f"non-finite loss in {MAX_CONSECUTIVE_SKIPS} consecutive updates (last at "
                                     f"{where}): the model has diverged; stopping")
        self.metrics.print(f"{where}: non-finite loss, update skipped")
        return {"_skipped": True, "_tokens": 0, "_samples": 0}

    def _batch_samples(self, batch: dict[str, Any]) -> int:
        for key in ("input_ids", "prompt_ids", "chosen_input_ids"):
            if key in batch and torch.is_tensor(batch[key]):
                return int(batch[key].shape[0])
        return 0

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _epoch_float(self) -> float:
        if self.sampler is None:
            return float(self.epoch)
        per_epoch = max(self.steps_per_epoch(), 1)
        return round(self.epoch + self.epoch_position / (per_epoch * self.grad_accum), 4)

    def _flops_per_token(self) -> float | None:
        fn = getattr(self.backend.unwrap(self.model), "flops_per_token", None)
        block = self.config.block_size or 512
        return fn(block) if fn is not None else None

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Eval loss/perplexity on ``eval_file_dataset`` and sample generations from ``eval_prompts``."""
        out: dict[str, Any] = {}
        if self.eval_dataset is not None:
            out.update(self.eval_loss())
        if self.eval_prompts:
            samples = self.sample_generations()
            if samples:
                out["samples"] = samples
        if out:
            self.metrics.log(out, step=self.global_step, epoch=self._epoch_float(), progress=False)
            if "eval_loss" in out:
                self.metrics.print(f"step {self.global_step}: eval_loss {out['eval_loss']:.4f} "
                                   f"ppl {out['eval_ppl']:.2f}")
        return {k: v for k, v in out.items() if k != "samples"}

    @torch.no_grad()
    def eval_loss(self) -> dict[str, float]:
        model = self.model
        was_training = model.training
        model.eval()
        loader = self._loader(self.eval_dataset, 0, 0, shuffle=False)
        totals = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(loader):
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            batch = self.to_device(batch)
            with self.backend.autocast():
                out = self.compute_loss(model, batch)
            totals += torch.tensor([float(out.loss), float(self.count_units(batch))], dtype=torch.float64)
        self.backend.all_reduce(totals)
        model.train(was_training)
        loss = float(totals[0] / max(float(totals[1]), 1.0))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 30.0))}

    def format_eval_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    @torch.no_grad()
    def sample_generations(self) -> list[dict[str, str]]:
        if self.tokenizer is None:
            return []
        from ..generation import generate
        from .images import eval_generation_inputs
        prompts, image_kwargs = eval_generation_inputs(self)   # VLM: expanded image tokens + pixel_values
        with self.backend.gathered_for_generation(self.model) as model:
            result = generate(model, prompts, self.config.eval_config,
                              eos_token_ids=self.stop_token_ids(), pad_token_id=self.pad_token_id(),
                              **{k: v.to(self.device) for k, v in image_kwargs.items()})
        samples = [{"prompt": p, "completion": self.tokenizer.decode(c)}
                   for p, c in zip(self.eval_prompts, result.completions)]
        if self.backend.is_main:
            with open(self.output_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps({"step": self.global_step, **s}, ensure_ascii=False) + "\n")
        return samples

    def stop_token_ids(self) -> list[int]:
        """EOS and the chat template's end-of-turn token (chat prompts end a reply with e.g. ``<|im_end|>``);
        the model config's eos when there is no tokenizer."""
        ids: list[int] = []
        if self.tokenizer is not None:
            candidates = [self.tokenizer.eos_token_id]
            try:
                candidates += list(self.tokenizer.stop_token_ids or [])
            except (KeyError, ValueError, AttributeError, TypeError):     # no / unknown chat template
                pass
            ids = [int(i) for i in dict.fromkeys(c for c in candidates if c is not None)]
        if not ids:
            eos = getattr(self.model_config, "eos_token_id", None)
            ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return ids

    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None and tok is not None:
            pad = tok.eos_token_id
        return 0 if pad is None else int(pad)

    # ------------------------------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "global_step": self.global_step, "epoch": self.epoch,
                "epoch_position": self.epoch_position, "tokens_seen": self.tokens_seen,
                "scheduler": self.scheduler.state_dict(), "batch_size": self.config.batch_size,
                "grad_accum": self.grad_accum, "world_size": self.backend.world_size}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        for key in ("batch_size", "grad_accum", "world_size"):
            now = {"batch_size": self.config.batch_size, "grad_accum": self.grad_accum,
                   "world_size": self.backend.world_size}[key]
            if state.get(key) not in (None, now):
                raise ValueError(f"cannot resume: the checkpoint was written with {key}={state[key]}, this run "
                                 f"uses {now}; the data position would not be the same (start a new output_dir)")
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
        rng = ckpt.capture_rng_states()
        torch.save(rng, tmp / f"rng_rank{backend.rank}.pt")
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
        pass

    def maybe_resume(self) -> bool:
        rf = self.config.resume_from
        if rf is None:
            return False
        path = ckpt.latest_checkpoint(self.output_dir) if rf == "auto" else Path(rf)
        if path is None:
            return False
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
        rng_file = path / f"rng_rank{self.backend.rank}.pt"
        self._resume_rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
        return True

    def _restore_rng_after_setup(self) -> None:
        if getattr(self, "_resume_rng", None) is not None:
            ckpt.restore_rng_states(self._resume_rng)
            self._resume_rng = None

    # ------------------------------------------------------------------------------------------------ export
    def export(self) -> Path | None:
        """Write ``output_dir/final``: an HF-format model folder (+ tokenizer) loadable by us and transformers."""
        return export_model(self.backend, self.model, self.model_config, self.tokenizer,
                            self.output_dir / "final")


def _safe_config_dict(cfg: TrainConfig) -> dict | None:
    try:
        return cfg.to_dict()
    except Exception:  # noqa: BLE001 - configs holding callables/datasets are logged without them
        return None
