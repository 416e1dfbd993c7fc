"""`DPOTrainer`: direct preference optimisation and its variants on the shared loop.

Loss types (``DPOConfig.loss_type``, maths in :mod:`llm_trainer.losses.preference`): ``dpo`` (+ conservative DPO via
``loss_label_smoothing``), ``robust``, ``hinge``, ``ipo`` (length-averaged log-ratios), ``orpo`` and ``simpo``
(length-averaged log-probs, no reference model). Optional NLL term on the chosen responses (``nll_loss_coef``; ORPO
includes it with coefficient 1 by definition when the field is left at None).

Per micro-batch: chosen and rejected rows are concatenated (``DPOCollate``: rows ``0..B-1`` chosen, ``B..2B-1``
rejected) and scored by ONE policy forward pass; per-sequence log-probs are sums over the response tokens (labels
!= -100) and the lengths come with them, so each loss can sum or average as it requires. The token log-probs are
computed from the final hidden states in chunks over the response tokens only (no ``[2B, S, V]`` logits tensor),
except under ZeRO-3, where the head weight is only gathered inside the model's forward, so the logits path is used.

The loss unit is the *pair*: ``compute_loss`` returns the sum over pairs and metric sums, and the loop divides by the
pairs of the whole accumulation window on all ranks.

Reference model (never a random one):

* default: a frozen copy of the initial policy (taken before the optimizer and the backend see the model);
* ``DPOConfig.ref_model_weights_path``: a model loaded from those weights;
* LoRA (``TrainConfig.lora``): the policy itself with adapters disabled (``lora_disabled``) — no second copy;
* ``precompute_ref_log_probs``: one reference pass over the train (and eval) data before training, stored per pair
  by dataset index, after which the reference model is freed;
* ``orpo`` / ``simpo``: none is built;
* ZeRO-3: the reference is built partitioned (``backend.model_init_context``) and wrapped by
  ``deepspeed.initialize`` without an optimizer (a ZeRO-3 inference engine); its weights are copied from the
  partitioned policy parameter by parameter (gathered one at a time).

Bad pairs — no trained response token on one side (e.g. an empty response, or one cut off by ``block_size``) or
chosen identical to rejected — raise :class:`~llm_trainer.data.formats.DataError` naming the file and record, or
are skipped and counted with ``DPOConfig.skip_bad_pairs=True`` (``trainer.skipped_pairs``).
"""
from __future__ import annotations

import copy
import gc
import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..configs import DPOConfig
from ..data.collate import IGNORE_INDEX, DPOCollate
from ..data.formats import DataError
from ..losses import chunked_token_logps, preference_loss, token_logps
from .images import attach_pixel_values, expand_items, pixel_provider
from .base import BaseTrainer, LossOutput
from .lm import model_inputs
from .setup import build_model, frozen_copy, resolve_model_config

__all__ = ["DPOTrainer", "PairDataset", "validate_pairs", "record_location"]


# ------------------------------------------------------------------------------------------------------ data
def record_location(dataset: Any, i: int) -> tuple[str | None, int]:
    """``(file, record)`` of item ``i`` of a pair dataset: the file it came from and its record number there."""
    locate = getattr(dataset, "locate", None)
    if locate is not None and hasattr(dataset, "files"):
        f, j = locate(i)
        return str(dataset.files[f]), int(j)
    return getattr(dataset, "path", None), int(i)


def _trained(labels: torch.Tensor) -> int:
    """Response tokens that get a log-prob: labels after the first position that are not ignored."""
    return int((torch.as_tensor(labels)[1:] != IGNORE_INDEX).sum())


def pair_problem(item: dict) -> str | None:
    """Why a pair cannot be trained on, or None."""
    nc, nr = _trained(item["chosen_labels"]), _trained(item["rejected_labels"])
    if nc == 0 or nr == 0:
        side = "chosen and rejected" if nc == nr == 0 else ("chosen" if nc == 0 else "rejected")
        return (f"empty response: the {side} sequence has no trained token (empty response, prompt-only "
                f"sequence, or a response cut off by block_size)")
    ci, ri = torch.as_tensor(item["chosen_input_ids"]), torch.as_tensor(item["rejected_input_ids"])
    if ci.shape == ri.shape and bool(torch.equal(ci, ri)) and \
            torch.equal(torch.as_tensor(item["chosen_labels"]), torch.as_tensor(item["rejected_labels"])):
        return "chosen and rejected are identical (no preference to learn)"
    return None


def validate_pairs(dataset: Any, *, skip: bool, name: str = "train", transform=None,
                   flag: str = "DPOConfig.skip_bad_pairs") -> tuple[np.ndarray, list[tuple[str | None, int, str]]]:
    """Check every pair once. Returns ``(kept indices, bad pairs as (file, record, reason))``; raises
    :class:`DataError` for the first bad pair (with the total count) unless ``skip``."""
    keep: list[int] = []
    bad: list[tuple[str | None, int, str]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if transform is not None:
            item = transform(item)
        why = pair_problem(item)
        if why is None:
            keep.append(i)
        else:
            bad.append((*record_location(dataset, i), why))
    if bad and not skip:
        file, record, why = bad[0]
        more = f" ({len(bad)} bad pairs in the {name} data; records: " \
               f"{', '.join(str(b[1]) for b in bad[:10])}{', ...' if len(bad) > 10 else ''})" if len(bad) > 1 else ""
        raise DataError(f"{why}{more}; fix the data or set {flag}=True to skip such pairs", file=file,
                        record=record)
    return np.asarray(keep, dtype=np.int64), bad


class PairDataset(Dataset):
    """The pairs of ``base`` that passed validation. Items gain ``"index"`` (the pair's index in ``base``) and, once
    the reference pass has run, ``"ref_logps"`` ``[2]`` (reference log-probs of chosen and rejected)."""

    def __init__(self, base: Any, keep: Sequence[int] | np.ndarray, train_prompt: bool = False):
        self.base = base
        self.keep = np.asarray(keep, dtype=np.int64)
        self.train_prompt = train_prompt
        self.ref_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keep)

    def transform(self, item: dict) -> dict:
        if self.train_prompt:  # mask_prompt=False: the prompt tokens count in the log-probs too
            item = {**item, "chosen_labels": torch.as_tensor(item["chosen_input_ids"]).clone(),
                    "rejected_labels": torch.as_tensor(item["rejected_input_ids"]).clone()}
        return item

    def __getitem__(self, i: int) -> dict:
        j = int(self.keep[i])
        item = self.transform(dict(self.base[j]))
        item["index"] = j
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item


class PairCollate:
    """``DPOCollate`` (``[2B, L]``: chosen rows then rejected rows) plus ``index`` ``[B]`` and, when the items carry
    them, ``ref_logps`` ``[B, 2]``. Picklable (DataLoader workers)."""

    def __init__(self, pad_token_id: int):
        self.inner = DPOCollate(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        out = self.inner(items)
        out["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
        if "ref_logps" in items[0]:
            out["ref_logps"] = torch.stack([torch.as_tensor(it["ref_logps"], dtype=torch.float32) for it in items])
        if "margin" in items[0]:
            out["margin"] = torch.tensor([float(it["margin"]) for it in items], dtype=torch.float32)
        return out


def open_pair_dataset(files: Any, block_size: int | None, vocab_size: int | None):
    """A dataset object (anything with ``__getitem__`` returning pair dicts, e.g. a list) is used as given;
    paths go through ``open_dataset('dpo', ...)``."""
    if isinstance(files, Dataset) or (isinstance(files, (list, tuple)) and files and isinstance(files[0], dict)):
        return files
    from ..data.datasets import open_dataset
    return open_dataset("dpo", files, block_size, vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------------- trainer
class DPOTrainer(BaseTrainer):
    """``DPOTrainer(train_config=TrainConfig(..., dpo_config=DPOConfig(...)), eval_prompts=[...]).train()``."""

    stage = "dpo"
    loss_unit = "pairs"
    logps_chunk_size = 4096  # response tokens projected onto the vocabulary at a time

    def get_stage_config(self) -> DPOConfig:
        return self.config.dpo_config or DPOConfig()

    # ---------------------------------------------------------------------------------------- models
    @property
    def _zero3(self) -> bool:
        return getattr(self.backend, "name", "") == "deepspeed" and getattr(self.backend, "stage", 0) == 3

    @property
    def nll_coef(self) -> float:
        sc = self.stage_config
        if sc.nll_loss_coef is not None:
            return float(sc.nll_loss_coef)
        return 1.0 if sc.loss_type == "orpo" else 0.0   # ORPO = L_SFT + lambda L_OR (Hong et al. 2024, eq. 6)

    def prepare_model(self, model: torch.nn.Module) -> None:
        from ..model.lora import has_lora
        sc = self.stage_config
        self.ref_model: torch.nn.Module | None = None
        self._ref_init: torch.nn.Module | None = None
        if not sc.needs_reference:
            self.ref_kind = "none"
        elif sc.ref_model_weights_path is not None:
            self.ref_kind = "weights"
        elif has_lora(model):
            self.ref_kind = "lora"
        else:
            self.ref_kind = "copy"
            if not self._zero3:   # the initial policy, before the optimizer or the backend touch it
                self._ref_init = self._freeze(frozen_copy(model))

    @staticmethod
    def _freeze(ref: torch.nn.Module) -> torch.nn.Module:
        ref.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        if hasattr(ref, "set_gradient_checkpointing"):
            ref.set_gradient_checkpointing(False)
        return ref

    def setup_extra_models(self) -> None:
        kind = self.ref_kind
        if kind in ("none", "lora"):
            return
        policy = self.backend.unwrap(self.model)
        if kind == "copy" and not self._zero3:
            ref, self._ref_init = self._ref_init, None
        else:
            ref_cfg = copy.copy(self.config)
            ref_cfg.lora, ref_cfg.gradient_checkpointing = None, False
            ref_cfg.init_weights_path = self.stage_config.ref_model_weights_path if kind == "weights" \
                else self.config.init_weights_path
            ref = build_model(ref_cfg, resolve_model_config(ref_cfg) if kind == "weights" else self.model_config,
                              self.backend)
            if kind == "copy":
                self._copy_partitioned(policy, ref)
        ref = self._freeze(ref)
        if self._zero3:
            ref = self._zero3_inference_engine(ref)
        else:
            dtype = next(policy.parameters()).dtype
            ref = ref.to(device=self.device, dtype=dtype if dtype.is_floating_point else None)
        self.ref_model = ref

    @staticmethod
    def _copy_partitioned(src: torch.nn.Module, dst: torch.nn.Module) -> None:
        """ZeRO-3: dst <- src, one gathered parameter at a time (collective)."""
        import deepspeed
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            q = dst_params[name]
            with deepspeed.zero.GatheredParameters([p, q], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        q.data.copy_(p.data)

    def _zero3_inference_engine(self, ref: torch.nn.Module):
        import deepspeed
        cfg = self.backend.build_ds_dict(self.config.batch_size, self.grad_accum)
        cfg["gradient_clipping"] = 0.0
        cfg["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=ref, config=cfg, dist_init_required=False)
        engine.eval()
        return engine

    # ------------------------------------------------------------------------------------------ data
    def build_dataset(self, files: Any):
        base = open_pair_dataset(files, self.config.block_size, self.model_config.vocab_size)
        name = "eval" if hasattr(self, "train_dataset") else "train"
        ds = PairDataset(base, np.arange(len(base)), train_prompt=not self.stage_config.mask_prompt)
        keep, bad = validate_pairs(base, skip=self.stage_config.skip_bad_pairs, name=name, transform=ds.transform)
        ds.keep = keep
        if not hasattr(self, "skipped_pairs"):
            self.skipped_pairs: dict[str, list] = {}
        self.skipped_pairs[name] = bad
        if bad and self.backend.is_main:
            shown = ", ".join(f"{f or '<data>'} record {r}" for f, r, _ in bad[:5])
            warnings.warn(f"DPO: skipped {len(bad)} bad pair(s) of the {name} data ({shown}"
                          f"{', ...' if len(bad) > 5 else ''}): {bad[0][2]}", stacklevel=2)
        return ds

    def collate(self, items: list[dict]) -> dict:
        if not hasattr(self, "_collate"):
            self._collate = PairCollate(self.pad_token_id())
        # VLM: expand image placeholders (labels -100); one pair's images serve its chosen and rejected rows
        items = expand_items(items, self.model_config, [("chosen_input_ids", "chosen_labels"),
                                                        ("rejected_input_ids", "rejected_labels")])
        batch = self._collate(items)
        return attach_pixel_values(batch, batch.get("images"), pixel_provider(self), self.model_config)

    def count_units(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def _batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def setup_data(self) -> None:
        super().setup_data()
        if self.stage_config.precompute_ref_log_probs and self.ref_kind != "none":
            for ds in (self.train_dataset, self.eval_dataset):
                if ds is not None:
                    self.precompute_reference(ds)
            self.free_reference()

    def free_reference(self) -> None:
        ref, self.ref_model = self.ref_model, None
        if ref is not None and hasattr(ref, "destroy"):
            ref.destroy()
        del ref
        gc.collect()

    @torch.no_grad()
    def precompute_reference(self, dataset: PairDataset) -> torch.Tensor:
        """Reference log-probs of every pair, ``[len(dataset), 2]``, stored on the dataset. Each rank scores the
        positions ``rank, rank + W, ...`` (padded so all ranks run the same number of forward passes, as ZeRO-3
        needs) and the parts are all-gathered."""
        n, world, rank = len(dataset), self.backend.world_size, self.backend.rank
        per_rank = math.ceil(n / world)
        positions = [(rank + k * world) % n for k in range(per_rank)]
        saved, dataset.ref_logps = dataset.ref_logps, None
        loader = DataLoader(torch.utils.data.Subset(dataset, positions), batch_size=self.config.batch_size,
                            shuffle=False, collate_fn=self.collate, drop_last=False)
        parts = []
        try:
            for batch in loader:
                batch = self.to_device(batch)
                with self.backend.autocast():
                    c, r = self.reference_logps(batch)
                parts.append(torch.stack([c, r], dim=1).float().cpu())
        except BaseException:
            dataset.ref_logps = saved
            raise
        local = torch.cat(parts) if parts else torch.zeros(0, 2)
        table = torch.full((n, 2), float("nan"))
        for r, part in enumerate(self.backend.all_gather_object(local)):
            pos = [(r + k * world) % n for k in range(per_rank)]
            table[pos] = part
        dataset.ref_logps = table
        return table

    # ------------------------------------------------------------------------------------------ loss
    def _use_chunks(self, module: torch.nn.Module) -> bool:
        return not self._zero3 and hasattr(module, "lm_head_weight")

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, Any]):
        """One forward pass over the ``[2B, L]`` batch → (summed response log-probs ``[2B]``, response lengths
        ``[2B]``, model output)."""
        plain = self.backend.unwrap(model)
        chunks = self._use_chunks(plain)
        out = model(**model_inputs(batch), return_hidden_states=chunks)
        if chunks:
            lp, mask = chunked_token_logps(out.hidden_states, plain.lm_head_weight(), batch["labels"],
                                           chunk_size=self.logps_chunk_size)
        else:
            lp, mask = token_logps(out.logits, batch["labels"])
        return lp.sum(-1), mask.sum(-1), out

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the chosen and rejected rows, ``([B], [B])``."""
        B = int(batch["index"].numel())
        if self.ref_kind == "lora":
            from ..model.lora import lora_disabled
            policy = self.backend.unwrap(self.model)
            was_training = policy.training
            policy.eval()
            try:
                with lora_disabled(policy):
                    logps, _, _ = self.sequence_logps(policy, batch)
            finally:
                policy.train(was_training)
        else:
            if self.ref_model is None:
                raise RuntimeError("DPO reference log-probs requested but the reference model is not loaded "
                                   "(it is freed after precompute_ref_log_probs)")
            logps, _, _ = self.sequence_logps(self.ref_model, batch)
        logps = logps.float()
        return logps[:B], logps[B:]

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        sc = self.stage_config
        B = int(batch["index"].numel())
        logps, lengths, out = self.sequence_logps(model, batch)
        pc, pr, lc, lr = logps[:B], logps[B:], lengths[:B], lengths[B:]
        ref_c = ref_r = None
        if sc.needs_reference:
            if "ref_logps" in batch:
                ref = batch["ref_logps"].to(logps.device, torch.float32)
                ref_c, ref_r = ref[:, 0], ref[:, 1]
            else:
                ref_c, ref_r = self.reference_logps(batch)
        pref = preference_loss(sc.loss_type, pc, pr, ref_c, ref_r, lc, lr, beta=sc.loss_beta,
                               label_smoothing=sc.loss_label_smoothing, gamma=sc.simpo_gamma)
        loss = pref.losses.sum()
        nll = -(pc.float() / lc.float().clamp(min=1.0))     # per-pair mean token NLL of the chosen response
        if self.nll_coef:
            loss = loss + self.nll_coef * nll.sum()
        c, r = pref.chosen_rewards.float(), pref.rejected_rewards.float()
        metrics = {
            f"loss/{sc.loss_type}": pref.losses.detach().sum(),
            "rewards/chosen": c.sum(),
            "rewards/rejected": r.sum(),
            "rewards/margin": (c - r).sum(),
            "rewards/accuracy": (c > r).float().sum(),
            "logps/chosen": pc.detach().float().sum(),
            "logps/rejected": pr.detach().float().sum(),
            "nll": nll.detach().sum(),
        }
        aux = out.aux_loss if (out.aux_loss is not None and out.aux_loss.requires_grad) else None
        return LossOutput(loss=loss, aux_loss=aux, metrics=metrics)

    # ------------------------------------------------------------------------------------------ eval
    def format_eval_prompt(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids

    @torch.no_grad()
    def preference_accuracy(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Mean metrics over a pair dataset (default: the eval data, else the train data) with the current policy:
        ``rewards/accuracy``, ``rewards/margin``, ... and ``loss``. Every rank must call it (collective)."""
        ds = dataset if dataset is not None else (self.eval_dataset or self.train_dataset)
        if not isinstance(ds, PairDataset):
            ds = PairDataset(ds, np.arange(len(ds)), train_prompt=not self.stage_config.mask_prompt)
        n, world, rank = len(ds), self.backend.world_size, self.backend.rank
        bs = batch_size or self.config.batch_size
        idx = list(range(rank, n, world))
        n_batches = math.ceil(math.ceil(n / world) / bs)   # the same on every rank (ZeRO-3 forwards are collective)
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            for b in range(n_batches):
                chunk = idx[b * bs:(b + 1) * bs]
                dummy = not chunk
                batch = self.to_device(self.collate([ds[i] for i in (chunk or [0])]))
                with self.backend.autocast():
                    out = self.compute_loss(model, batch)
                if dummy:
                    continue
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss)
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += self.count_units(batch)
        finally:
            model.train(was_training)
        keys = sorted(sums) if sums else []
        keys = self.backend.broadcast_object(keys)
        packed = torch.tensor([float(count)] + [sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        self.backend.all_reduce(packed)
        total = max(float(packed[0]), 1.0)
        return {k: float(packed[1 + j]) / total for j, k in enumerate(keys)}

