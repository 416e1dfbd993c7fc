"""The one training loop. Every trainer (pretrain, SFT, DPO, reward, GRPO, PPO) plugs into `BaseTrainer`.

Life cycle (torchtune's ``setup → train``): ``__init__`` stores the arguments and the trainer's own fields, then
calls :meth:`BaseTrainer.setup`, which builds in a fixed order — backend, tokenizer, model (:meth:`build_model`),
optimizer, backend wrap, frozen models (:meth:`setup_extra_models`), collate, data, schedule, resume, metrics —
each step assigning its attributes explicitly.

A trainer supplies:

* ``build_dataset(files, split)`` and ``build_collate()`` — the data of its stage;
* ``count_units(batch)`` — the loss units (tokens, pairs, sequences) of a micro-batch, countable before the
  forward pass; a dict ``{term: units}`` when the loss has several terms with different units (e.g. GRPO's policy
  loss plus the pretraining-mix LM loss);
* ``compute_loss(model, batch) -> LossOutput`` — the *sum* of the loss over those units (a dict of sums, one per
  term, when ``count_units`` returns a dict), plus metric sums.

The loop divides each term by its units in the whole accumulation window summed over all ranks — once — so
``batch 8 × accumulation 1`` and ``batch 2 × accumulation 4`` give the same update, and 2 ranks give the same update
as one process on the same global batch (backends sum gradients, see ``parallel/base.py``).
RL trainers override ``training_windows()`` to insert a rollout phase that fills a buffer the same loop consumes.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..configs import TrainConfig
from ..data.collate import IGNORE_INDEX
from ..metrics import MetricsLogger, estimate_mfu, peak_flops_for_device, peak_memory_bytes
from ..optim import build_optimizer
from ..scheduler import WarmupCosineScheduler
from .callbacks import Callback, CallbackList
from .callbacks_builtin import reporting_callbacks
from .checkpointing import CheckpointingMixin
from .collective import even_batches, rank_shard
from .images import eval_generation_inputs, pixel_provider
from .summary import format_closing, format_summary
from .setup import (build_backend, build_model, build_tokenizer, check_trainable, export_model, lora_target,
                    resolve_model_config)

MAIN = "main"   # the unit key of a single-term loss


@dataclass
class LossOutput:
    """What ``compute_loss`` returns for one micro-batch.

    ``loss``: the loss summed over the micro-batch's units (what ``count_units`` counted), or a dict of such sums
    keyed like ``count_units``'s dict. ``aux_loss``: an already-averaged extra term (MoE load balancing); the
    loop weights it by the micro-batch's share of the window's main units and logs it separately. ``metrics``:
    sums over the main units (logged as means). ``extra``: plain floats logged as given (averaged over
    micro-batches and ranks)."""

    loss: torch.Tensor | dict[str, torch.Tensor]
    aux_loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


def _terms(x: Any) -> dict[str, Any]:
    return dict(x) if isinstance(x, dict) else {MAIN: x}


def _is_streaming(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


class NonFiniteLossError(FloatingPointError):
    pass


MAX_CONSECUTIVE_SKIPS = 10   # nan_policy='skip' gives up after this many non-finite updates in a row


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class BaseTrainer(CheckpointingMixin):
    """Owns the loop: epochs/steps, accumulation, clipping, schedule, eval, checkpoints, resume, logging."""

    stage: str = "pretrain"
    """The stage name recorded in checkpoints (resuming another stage's checkpoint is refused)."""
    stage_slot: str = "pretrain_config"
    """The `TrainConfig` field holding this trainer's stage config."""
    loss_unit: str = "tokens"

    def __init__(self, *, train_config: TrainConfig, eval_prompts: list[str] | None = None,
                 eval_image_tags: list[Any] | None = None, callbacks: Sequence[Callback] = (),
                 evaluators: Sequence[Callable[["BaseTrainer"], dict[str, float]]] = ()) -> None:
        """``callbacks``: :class:`~.callbacks.Callback` instances hooked into the loop. ``evaluators``: callables
        ``evaluator(trainer) -> {metric: value}`` run at every evaluation (every ``eval_interval`` steps and at the
        end) on every rank (they are collective: split the work over ranks and reduce), e.g. the tasks of
        :mod:`llm_trainer.evaluation`."""
        self.config = train_config
        self.eval_prompts = list(eval_prompts or [])
        self.eval_image_tags = eval_image_tags
        self._callbacks = list(callbacks)
        self.evaluators = list(evaluators)
        self.output_dir = Path(train_config.output_dir)
        self.stage_config = train_config.stage_config(self.stage_slot, type(self).__name__)
        self.grad_accum = train_config.accumulation_steps(self.stage_config)
        self.global_step = 0
        self.epoch = 0
        self.epoch_position = 0          # micro-batches of the current epoch already consumed
        self.tokens_seen = 0
        self.consecutive_skips = 0
        self.resumed_from: Path | None = None
        self.setup()

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything, in order (see the module docstring)."""
        cfg = self.config
        self.backend = build_backend(cfg.ds_config, cfg.dtype, cfg.output_dir)
        self.device = self.backend.device
        self.callbacks = CallbackList(self._callbacks + reporting_callbacks(cfg.report_to, self._callbacks),
                                      self.backend)
        self.prepare_output_dir()
        seed_everything(cfg.seed)                       # identical model init on every rank
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.chat_template, cfg.chat_template_kwargs)
        self.model_config = resolve_model_config(cfg.model_config, cfg.init_weights_path, cfg.loss_config)
        model = self.build_model()
        check_trainable(model)
        self.optimizer = self.build_optimizer(model)
        self.model = self.backend.wrap(model, self.optimizer, micro_batch_size=self.micro_batch_size(),
                                       grad_accum=self.grad_accum, grad_clip=cfg.max_grad_norm)
        self.setup_extra_models()
        self.pixel_provider = pixel_provider(getattr(self.stage_config, "pixel_values_provider", None),
                                             self.model_config)
        self.collate_fn = self.build_collate()
        self.setup_data()
        self.total_steps = self.compute_total_steps()
        self.scheduler = WarmupCosineScheduler(self.optimizer, cfg.optim_config, total_steps=self.total_steps)
        resume_rng = self.maybe_resume()
        seed_everything(cfg.seed + 1000 * (self.backend.rank + 1) + self.global_step)   # dropout/sampling per rank
        if resume_rng is not None:
            self.restore_rng(resume_rng)
        self.metrics = MetricsLogger(self.output_dir, self.backend.is_main, total_steps=self.total_steps,
                                     resume_step=self.global_step if self.resumed_from else None)
        self._peak_flops = peak_flops_for_device(self.device)
        self.metrics.print(format_summary(self))

    # ------------------------------------------------------------------------------------------------ hooks
    def build_model(self) -> torch.nn.Module:
        """The module to train (before the optimizer and the backend see it); trainers add heads here."""
        cfg = self.config
        return build_model(self.model_config, self.backend, weights=cfg.init_weights_path, lora=cfg.lora,
                           gradient_checkpointing=cfg.gradient_checkpointing)

    def micro_batch_size(self) -> int:
        return self.config.batch_size

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters (PPO overrides it: value-model parameter groups)."""
        return build_optimizer(model, self.config.optim_config)

    def setup_extra_models(self) -> None:
        """Reference/teacher models (after the policy is wrapped), built by ``self.backend.frozen_replica``."""

    def build_dataset(self, files: Any, split: str) -> torch.utils.data.Dataset:
        """The dataset of ``files``; ``split`` is 'train' or 'eval' (for messages)."""
        raise NotImplementedError

    def build_collate(self):
        """The collate object of this stage (called once in setup, after the tokenizer)."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict[str, Any]:
        return self.collate_fn(items)

    def count_units(self, batch: dict[str, Any]) -> int | dict[str, int]:
        """Loss tokens of a batch: next-token labels that are not ignored."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens processed by the forward pass (throughput)."""
        mask = batch.get("attention_mask")
        if mask is not None:
            return int(mask.sum())
        ids = batch.get("input_ids")
        return int(ids.numel()) if ids is not None else 0

    def batch_samples(self, batch: dict[str, Any]) -> int:
        ids = batch.get("input_ids")
        return int(ids.shape[0]) if torch.is_tensor(ids) else 0

    # ------------------------------------------------------------------------------------------------- data
    def setup_data(self) -> None:
        from ..data.sampler import ShardedSampler
        cfg = self.config
        if cfg.file_dataset is None:
            raise ValueError(f"TrainConfig.file_dataset: {type(self).__name__} needs training data")
        self.train_dataset = self.build_dataset(cfg.file_dataset, "train")
        self.eval_dataset = self.build_dataset(cfg.eval_file_dataset, "eval") if cfg.eval_file_dataset else None
        if _is_streaming(self.train_dataset):   # .jsonl text tokenised on the fly: no length, no O(1) seek
            self.sampler = None
            return
        if len(self.train_dataset) == 0:
            raise ValueError(f"TrainConfig.file_dataset: no samples in {cfg.file_dataset!r}")
        self.sampler = ShardedSampler(len(self.train_dataset), rank=self.backend.rank,
                                      world_size=self.backend.world_size, seed=cfg.seed,
                                      shuffle=cfg.data_loader_config.shuffle,
                                      drop_last=cfg.data_loader_config.drop_last)

    def micro_batches_per_epoch(self) -> int:
        """This rank's micro-batches per epoch (``drop_last=False``: the last one may be smaller)."""
        n, b = len(self.sampler), self.config.batch_size
        return n // b if self.config.data_loader_config.drop_last else -(-n // b)

    def steps_per_epoch(self) -> int:
        if self.sampler is None:
            return 0                                   # a stream's length is unknown
        micro = self.micro_batches_per_epoch()
        return micro // self.grad_accum if self.config.data_loader_config.drop_last else -(-micro // self.grad_accum)

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

    def _loader(self, dataset, sampler_start: int, epoch: int):
        from ..data.sampler import ShardedSampler
        dl = self.config.data_loader_config
        if _is_streaming(dataset):
            # this rank's shard of the stream, skipping the windows it already trained on (read, not seeked)
            stream = copy.copy(dataset)
            stream.rank, stream.world_size, stream.start = self.backend.rank, self.backend.world_size, sampler_start
            return torch.utils.data.DataLoader(stream, batch_size=self.config.batch_size, collate_fn=self.collate,
                                               num_workers=dl.num_workers, pin_memory=dl.pin_memory, drop_last=True)
        sampler = ShardedSampler(len(dataset), rank=self.backend.rank, world_size=self.backend.world_size,
                                 seed=self.config.seed, shuffle=dl.shuffle, drop_last=dl.drop_last)
        sampler.set_epoch(epoch, start=sampler_start)
        return torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler,
                                           collate_fn=self.collate, num_workers=dl.num_workers,
                                           pin_memory=dl.pin_memory, drop_last=dl.drop_last,
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
            if window and not self.config.data_loader_config.drop_last:    # the epoch's last, shorter window
                self.epoch_position += len(window)
                produced = True
                yield window
                if self.global_step >= self.total_steps:
                    return
            if not produced and self.epoch_position == 0:
                raise ValueError(f"TrainConfig.file_dataset: {self.config.file_dataset!r} gave rank "
                                 f"{self.backend.rank} not one accumulation window (batch_size "
                                 f"{self.config.batch_size} × {k}) in a whole epoch")
            self.epoch += 1
            self.epoch_position = 0

    # ------------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Run until ``max_steps`` / ``n_epochs``; returns the last logged metrics."""
        cfg, callbacks = self.config, self.callbacks
        last: dict[str, Any] = {}
        t_start = t_log = time.monotonic()
        tokens_log, samples_log = 0, 0
        saved = evaluated = -1
        try:
            callbacks("on_train_begin", self)
            for window in self.training_windows():
                callbacks("on_step_begin", self)
                stats = self.train_step(window)
                tokens_log += stats.pop("_tokens")
                samples_log += stats.pop("_samples")
                if stats.pop("_skipped", False):
                    continue
                control = callbacks("on_step_end", self, stats)
                if self.global_step % cfg.log_interval == 0 or self.global_step == self.total_steps:
                    dt = max(time.monotonic() - t_log, 1e-9)
                    tps = tokens_log / dt
                    stats.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=tps,
                                 samples_per_s=samples_log / dt, tokens_seen=self.tokens_seen,
                                 mfu=estimate_mfu(self._flops_per_token(), tps, self._peak_flops),
                                 peak_mem=peak_memory_bytes(self.device))
                    last = self.metrics.log(stats, step=self.global_step, epoch=self._epoch_float()) or stats
                    control = callbacks("on_log", self, last)
                    t_log, tokens_log, samples_log = time.monotonic(), 0, 0
                if control.should_evaluate or (cfg.eval_interval and self.global_step % cfg.eval_interval == 0):
                    last.update(self.evaluate())
                    evaluated = self.global_step
                if control.should_save or (cfg.save_interval and self.global_step % cfg.save_interval == 0):
                    self.save_checkpoint()
                    saved = self.global_step
                callbacks.reset("should_evaluate", "should_save")
                if control.should_stop:
                    self.metrics.print(f"step {self.global_step}: a callback asked to stop training")
                    break
            if cfg.save_interval and saved != self.global_step:
                self.save_checkpoint()
            if evaluated != self.global_step and (self.eval_dataset is not None or self.eval_prompts
                                                  or self.evaluators):
                last.update(self.evaluate())                 # eval_interval=None: only here, at the end
            final = self.export()
            callbacks("on_train_end", self, last)
            self.metrics.print(format_closing(self, last, time.monotonic() - t_start, final))
        finally:
            self.metrics.close()
        return last

    def _global_units(self, window: list[dict[str, Any]]) -> tuple[list[dict[str, float]], dict[str, float]]:
        units = [_terms(self.count_units(b)) for b in window]
        keys = sorted({k for u in units for k in u})
        totals = torch.tensor([float(sum(u.get(k, 0) for u in units)) for k in keys], dtype=torch.float64)
        self.backend.all_reduce(totals)
        return units, dict(zip(keys, totals.tolist()))

    def train_step(self, window: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer update over an accumulation window."""
        backend, model = self.backend, self.model
        model.train()
        units, global_units = self._global_units(window)
        main_units = global_units.get(MAIN, 0.0)
        sums: dict[str, float] = {}
        extras: dict[str, float] = {}
        term_sums = dict.fromkeys(global_units, 0.0)
        aux_sum = 0.0
        tokens = 0
        for i, (batch, n) in enumerate(zip(window, units)):
            batch = self.to_device(batch)
            tokens += self.batch_tokens(batch)
            sync = backend.no_sync() if i < len(window) - 1 else contextlib.nullcontext()
            with sync:
                with backend.autocast():
                    out = self.compute_loss(model, batch)
                terms = _terms(out.loss)
                loss = None
                for key, value in terms.items():
                    part = value.float() / max(global_units.get(key, 0.0), 1.0)
                    loss = part if loss is None else loss + part
                if out.aux_loss is not None:
                    share = n.get(MAIN, 0) / max(main_units, 1.0)
                    loss = loss + out.aux_loss.float() * share
                    aux_sum += float(out.aux_loss.detach()) * n.get(MAIN, 0)
                # agree across ranks *before* backward: a non-finite window is skipped without touching gradients
                # (DeepSpeed cannot discard reduced gradients afterwards)
                flag = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0])
                if float(backend.all_reduce(flag, op="max")[0]) > 0:
                    return self._non_finite(backward_done=i > 0)
                backend.backward(loss)
            for key, value in terms.items():
                term_sums[key] += float(value.detach())
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
            for key, value in out.extra.items():
                extras[key] = extras.get(key, 0.0) + float(value) / len(window)
        return self._finish_step(window, term_sums, global_units, aux_sum, tokens, sums, extras)

    def _finish_step(self, window, term_sums, global_units, aux_sum, tokens, sums, extras) -> dict[str, Any]:
        backend = self.backend
        tkeys, keys, ekeys = sorted(term_sums), sorted(sums), sorted(extras)
        samples = sum(self.batch_samples(b) for b in window)
        packed = torch.tensor([aux_sum, float(tokens), float(samples)] + [term_sums[k] for k in tkeys]
                              + [sums[k] for k in keys] + [extras[k] for k in ekeys], dtype=torch.float64)
        backend.all_reduce(packed)
        values = packed.tolist()
        aux_sum, tokens, samples = values[:3]
        term_vals = dict(zip(tkeys, values[3:3 + len(tkeys)]))
        metric_vals = values[3 + len(tkeys):3 + len(tkeys) + len(keys)]
        extra_vals = values[3 + len(tkeys) + len(keys):]
        self.consecutive_skips = 0
        grad_norm = backend.clip(self.config.max_grad_norm)
        step_norm = backend.step()
        grad_norm = step_norm if grad_norm is None else grad_norm
        backend.zero_grad()
        self.scheduler.step()
        self.global_step += 1
        self.tokens_seen += int(tokens)
        denom = max(global_units.get(MAIN, 0.0), 1.0)
        loss = sum(v / max(global_units[k], 1.0) for k, v in term_vals.items())
        stats: dict[str, Any] = {"loss": loss, "grad_norm": grad_norm}
        if aux_sum:
            stats["aux_loss"] = aux_sum / denom
        stats.update({k: v / denom for k, v in zip(keys, metric_vals)})
        stats.update({k: v / backend.world_size for k, v in zip(ekeys, extra_vals)})
        stats[f"{self.loss_unit}_per_step"] = global_units.get(MAIN, 0.0)
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
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLossError(f"non-finite loss in {MAX_CONSECUTIVE_SKIPS} consecutive updates (last at "
                                     f"{where}): the model has diverged; stopping")
        self.metrics.print(f"{where}: non-finite loss, update skipped")
        return {"_skipped": True, "_tokens": 0, "_samples": 0}

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _epoch_float(self) -> float:
        if self.sampler is None:
            return float(self.epoch)
        return round(self.epoch + self.epoch_position / max(self.micro_batches_per_epoch(), 1), 4)

    def _flops_per_token(self) -> float | None:
        fn = getattr(self.backend.unwrap(self.model), "flops_per_token", None)
        block = self.config.block_size or 512
        return fn(block) if fn is not None else None

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics of ``eval_file_dataset`` and sample generations from ``eval_prompts``."""
        out: dict[str, Any] = {}
        if self.eval_dataset is not None:
            out.update(self.eval_dataset_metrics())
        if self.eval_prompts:
            samples = self.sample_generations()
            if samples:
                out["samples"] = samples
        for evaluator in self.evaluators:
            out.update(evaluator(self))
        if out:
            self.metrics.log(out, step=self.global_step, epoch=self._epoch_float(), progress=False)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in out.items() if isinstance(v, float))
            if shown:
                self.metrics.print(f"step {self.global_step}: {shown}")
        metrics = {k: v for k, v in out.items() if k != "samples"}
        self.callbacks("on_evaluate", self, metrics)
        return metrics

    def eval_items(self, dataset) -> list[int]:
        """This rank's share of ``dataset`` for evaluation: every sample once over all ranks (``eval_batches``
        batches per rank at most)."""
        idx = rank_shard(len(dataset), self.backend)
        if self.config.eval_batches is not None:
            idx = idx[:self.config.eval_batches * self.config.batch_size]
        return idx

    @torch.no_grad()
    def eval_dataset_metrics(self) -> dict[str, float]:
        """Mean loss and perplexity over every sample of ``eval_file_dataset``."""
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        ds = self.eval_dataset
        try:
            for idx, padding in even_batches(self.backend, self.eval_items(ds), self.config.batch_size, 0):
                batch = self.to_device(self.collate([ds[i] for i in idx]))
                with self.backend.autocast():
                    out = self.compute_loss(model, batch)
                if not padding:
                    totals += torch.tensor([float(_terms(out.loss)[MAIN]), float(_terms(self.count_units(batch))[MAIN])],
                                           dtype=torch.float64)
        finally:
            model.train(was_training)
        self.backend.all_reduce(totals)
        loss = float(totals[0] / max(float(totals[1]), 1.0))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 30.0))}

    def format_eval_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def policy_for_generation(self, plain: torch.nn.Module) -> torch.nn.Module:
        """The language model inside the (unwrapped) trained module (PPO: its policy)."""
        return plain

    @torch.no_grad()
    def sample_generations(self) -> list[dict[str, str]]:
        if self.tokenizer is None:
            return []
        from ..generation import generate
        prompts, image_kwargs = eval_generation_inputs(
            self.eval_prompts, self.eval_image_tags, self.model_config, self.tokenizer, self.format_eval_prompt,
            self.pixel_provider)
        with self.backend.gathered_for_generation(self.model) as plain:
            result = generate(self.policy_for_generation(plain), prompts, self.config.eval_config,
                              eos_token_ids=self.stop_token_ids(), pad_token_id=self.pad_token_id(),
                              **{k: v.to(self.device) for k, v in image_kwargs.items()})
        samples = [{"prompt": p, "completion": self.tokenizer.decode(c)}
                   for p, c in zip(self.eval_prompts, result.completions)]
        if self.backend.is_main:
            import json
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
        """The tokenizer's pad (else its EOS); without a tokenizer the model config's pad, else its EOS, else 0."""
        tok = self.tokenizer
        candidates = [tok.pad_token_id, tok.eos_token_id] if tok is not None else \
            [self.model_config.pad_token_id, self.model_config.eos_token_id]
        for v in candidates:
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return 0

    # ------------------------------------------------------------------------------------------------ export
    def export(self) -> Path | None:
        """Write ``output_dir/final``: an HF-format model folder (+ tokenizer) loadable by us and transformers."""
        return export_model(self.backend, self.model, self.output_dir / "final", self.tokenizer,
                            adapters=lora_target, config=self.model_config)

