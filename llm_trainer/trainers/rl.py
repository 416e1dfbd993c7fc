"""`RLTrainer`: what GRPO and PPO share on top of the one loop — prompt data, the rollout engine
(:mod:`.rollout`), rewards (:mod:`.rewards`), the reference model (:mod:`.reference`), rollout micro-batches kept in
step across ranks, and reward evaluation. Subclasses implement ``make_rollout_batches``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX, PromptCollate, pad_with_mask
from ..generation import generate
from ..losses import chunked_lm_loss
from .base import BaseTrainer
from .collective import even_batches, mean_over_ranks, sum_over_ranks
from .images import expand_items, is_vlm, load_images
from .reference import Reference, build_reference, eval_mode
from .rewards import RewardOutput, RewardSet
from .rollout import GenerationResult, Rollout, RolloutEngine, Timer, completion_logps, disable_stochasticity

__all__ = ["RLTrainer"]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class RLTrainer(BaseTrainer):
    """``reward_func``: a reward function, a reward model (``.score``) or a list of them (see :mod:`.rewards`);
    ``reward_weights``: one weight per source (None → the stage config's ``reward_weights`` or all 1).
    ``generation_service``: see :class:`~.rollout.GenerationService`. ``old_logprobs``: 'recompute' (default,
    exact ratio 1) or 'generation' (use the sampler's log-probs; only sensible with an external engine whose
    numerics you trust, and never with top-k/top-p/repetition penalty, which change the sampling distribution)."""

    stage = "rl"
    loss_unit = "tokens"

    def __init__(self, *, train_config, reward_func: Any = None, reward_weights: Sequence[float] | None = None,
                 eval_prompts: list[str] | None = None, generation_service: Any = None,
                 old_logprobs: str = "recompute", **kwargs: Any) -> None:
        if old_logprobs not in ("recompute", "generation"):
            raise ValueError(f"old_logprobs must be 'recompute' or 'generation', got {old_logprobs!r}")
        self.old_logprobs_source = old_logprobs
        self.generation_service = generation_service
        self.reward_func, self.reward_weights = reward_func, reward_weights
        self.rollouts_done = 0
        self.rollout_stats: dict[str, float] = {}       # of the rollout the current windows come from
        self.skipped_nonfinite_rewards = 0              # samples dropped for a NaN/inf reward (nan_policy='skip')
        self.timer = Timer()
        super().__init__(train_config=train_config, eval_prompts=eval_prompts, **kwargs)

    def setup(self) -> None:
        sc = self.stage_config
        weights = self.reward_weights if self.reward_weights is not None else sc.reward_weights
        self.rewards = RewardSet(self.reward_func, weights,        # checked before the model is built
                                 allow_nonfinite=self.config.nan_policy == "skip")
        super().setup()
        self.engine = RolloutEngine(self.backend, sc.generate_config, self.stop_token_ids(), self.pad_token_id(),
                                    group_size=self.group_size, chunk_size=sc.chunked_rollout_size,
                                    service=self.generation_service, vocab_size=self.model_config.vocab_size)

    # ------------------------------------------------------------------------------------------ config hooks
    @property
    def group_size(self) -> int:
        return 1

    @property
    def temperature(self) -> float:
        return self.engine.temperature

    def micro_batch_size(self) -> int:
        return self.rollout_micro_batch_size()

    def rollout_micro_batch_size(self) -> int:
        """Samples per micro-batch of the update phase (None in the stage config → the whole rollout)."""
        n = self.config.batch_size * self.group_size
        mb = self.stage_config.update_batch_size
        return min(n, mb) if mb else n

    def build_model(self) -> nn.Module:
        return disable_stochasticity(super().build_model())

    def policy_plain(self) -> nn.Module:
        """The policy LM as a plain module (possibly partitioned under ZeRO-3)."""
        return self.policy_for_generation(self.backend.unwrap(self.model))

    def setup_extra_models(self) -> None:
        self.reference: Reference | None = None
        if self.stage_config.needs_reference:
            self.reference = build_reference(self.backend, self.policy_plain(),
                                             self.stage_config.ref_model_weights_path,
                                             f"{type(self.stage_config).__name__}.ref_model_weights_path")

    # -------------------------------------------------------------------------------------------------- data
    def build_dataset(self, files: Any, split: str):
        if isinstance(files, torch.utils.data.Dataset):
            return files
        if isinstance(files, (list, tuple)) and files and isinstance(files[0], dict):
            return _ListDataset(list(files))
        from ..data.datasets import open_dataset
        return open_dataset("rl", files, self.config.block_size, vocab_size=self.model_config.vocab_size,
                            tokenizer=self.tokenizer)

    def build_collate(self):
        return PromptCollate()

    def collate(self, items: list[dict]) -> dict[str, Any]:
        out = self.collate_fn(items)
        out.pop("images", None)
        if is_vlm(self.model_config):      # VLM: expanded image tokens, each prompt's pixel values
            expanded = expand_items(items, self.model_config, [("prompt_ids", None)])
            out["prompt_ids"] = [torch.as_tensor(it["prompt_ids"]).reshape(-1).tolist() for it in expanded]
            out["pixel_values"] = [load_images(self.pixel_provider, self.model_config, it["images"])
                                   if it.get("images") else None for it in items]
        return out

    def count_units(self, batch: dict[str, Any]) -> dict[str, int]:
        return batch["units"]

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        return self.tokenizer.decode(list(ids))

    # ----------------------------------------------------------------------------------------------- steps
    def steps_per_rollout(self) -> int:
        n = self.config.batch_size * self.group_size
        micro = math.ceil(n / self.rollout_micro_batch_size())
        return self.stage_config.update_epochs * math.ceil(micro / self.grad_accum)

    def steps_per_epoch(self) -> int:
        return self.micro_batches_per_epoch() * self.steps_per_rollout()

    def _epoch_float(self) -> float:
        per_epoch = max(self.micro_batches_per_epoch(), 1)
        return round(self.epoch + self.epoch_position / per_epoch, 4)

    def prompt_batches(self) -> Iterator[dict[str, Any]]:
        """Prompt batches (``batch_size`` prompts per rank) from the current data position, across epochs."""
        while self.epoch < self.config.n_epochs:
            loader = self._loader(self.train_dataset, self.epoch_position * self.config.batch_size, self.epoch)
            for batch in loader:
                self.epoch_position += 1
                yield batch
            self.epoch += 1
            self.epoch_position = 0

    def training_windows(self) -> Iterator[list[dict[str, Any]]]:
        prompts = self.prompt_batches()
        epochs = self.stage_config.update_epochs
        while self.global_step < self.total_steps:
            micro = self.make_rollout_batches(prompts)
            if micro is None:                      # data exhausted
                return
            if not micro:                          # nothing to learn from on any rank (e.g. all groups filtered)
                continue
            order_gen = torch.Generator().manual_seed(self.config.seed * 7919 + self.rollouts_done)
            for ep in range(epochs):
                # the first pass keeps the rollout order (the first window's ratio is exactly 1); later passes shuffle
                order = list(range(len(micro))) if ep == 0 else torch.randperm(len(micro), generator=order_gen).tolist()
                for s in range(0, len(order), self.grad_accum):
                    yield [micro[i] for i in order[s:s + self.grad_accum]]
                    if self.global_step >= self.total_steps:
                        return

    def train_step(self, window: list[dict[str, Any]]) -> dict[str, Any]:
        stats = super().train_step(window)
        if not stats.get("_skipped"):
            stats.update(self.rollout_stats)
        return stats

    # -------------------------------------------------------------------------------------------- rollouts
    def rollout_generator(self) -> torch.Generator:
        """Sampling RNG of this rollout: seeded by (seed, rank, rollout number), so ranks differ and resume repeats."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.config.seed * 1_000_003 + 7919 * (self.backend.rank + 1)
                       + 104_729 * (self.epoch * 1_000_000 + self.epoch_position)) % (2**63))
        return g

    def sample(self, prompt_batch: dict[str, Any]) -> tuple[Rollout, RewardOutput]:
        """Generate ``group_size`` completions per prompt and score them."""
        prompts = prompt_batch["prompt_ids"]
        G = self.group_size
        with self.timer("generate"):
            res = self._generate(prompts, self.rollout_generator(), prompt_batch.get("pixel_values"))
        rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
        rollout = Rollout(prompt_ids=rep(prompts), completion_ids=res.completions, finished=res.finished,
                          group=[i for i in range(len(prompts)) for _ in range(G)], gen_logprobs=res.logprobs,
                          answer_ids=rep(prompt_batch["answer_ids"]), answer_text=rep(prompt_batch["answer_text"]),
                          prompt_text=rep([self.decode(p) for p in prompts]),
                          completion_text=[self.decode(c) for c in res.completions],
                          pixel_values=rep(prompt_batch["pixel_values"]) if "pixel_values" in prompt_batch else [])
        with self.timer("reward"):
            rewards = self.rewards(rollout)
        return rollout, rewards

    def _generate(self, prompts, generator, pixel_values=None) -> GenerationResult:
        with self.backend.gathered_for_generation(self.model) as plain:
            return self.engine.generate(self.policy_for_generation(plain), prompts, generator, gather=False,
                                        pixel_values=pixel_values)

    def policy_logps(self, model: nn.Module, batch: dict[str, Any], **kw) -> dict[str, torch.Tensor]:
        """:func:`completion_logps` of the trained policy (``model`` may be the wrapped module)."""
        with self.backend.output_projection(self.policy_plain()) as project:
            return completion_logps(model, batch, self.temperature, project=project, **kw)

    @torch.no_grad()
    def score_micro_batches(self, batches: list[dict[str, Any]], with_values: bool = False) -> None:
        """Adds ``old_logp`` (and ``ref_logp`` when a reference is used, ``old_values`` for PPO) to every
        micro-batch: the policy in eval mode through :func:`completion_logps`, under the same autocast as the
        update (ratio exactly 1)."""
        plain = self.backend.unwrap(self.model)       # ZeRO-3: each module gathers its own weights in forward
        with eval_mode(plain):
            policy = self.policy_for_generation(plain)
            with self.backend.output_projection(policy) as project:
                for b in batches:
                    dev = self.to_device(b)
                    with self.timer("old_logp"), self.backend.autocast():
                        out = completion_logps(plain if with_values else policy, dev, self.temperature,
                                               project=project, with_values=with_values)
                    b["old_logp"] = out["logp"].detach().float().cpu()
                    if with_values:
                        b["old_values"] = out["values"].detach().float().cpu()
                    if self.reference is not None:
                        with self.timer("reference"), self.backend.autocast(), self.reference.active() as ref, \
                                self.backend.output_projection(ref) as ref_project:
                            ref_lp = completion_logps(ref, dev, self.temperature, project=ref_project)["logp"]
                        b["ref_logp"] = ref_lp.detach().float().cpu()

    def set_rollout_stats(self, stats: dict[str, float]) -> None:
        """Rollout statistics (this rank's), averaged over ranks and logged with the steps of this rollout."""
        stats.update({f"time/{k}": v for k, v in self.timer.times.items()})
        self.rollout_stats = mean_over_ranks(self.backend, stats)
        self.callbacks("on_rollout_end", self, self.rollout_stats)

    # ----------------------------------------------------------------------------------- micro-batch helpers
    def micro_batch_indices(self, keep: list[int]) -> list[tuple[list[int], bool]]:
        """Indices of each update micro-batch over the kept samples, as ``(indices, is_padding)``: every rank gets
        the same number of micro-batches (ZeRO-3/DDP run the same collectives everywhere); padding micro-batches
        run a forward/backward with an all-zero loss mask."""
        return list(even_batches(self.backend, keep, self.rollout_micro_batch_size(), 0))

    def ptx_batch(self, prompts: list[list[int]], answers: list[list[int] | None]) -> dict[str, torch.Tensor]:
        """Prompt + reference answer rows for the pretraining-mix LM loss (labels on the answer tokens)."""
        if any(a is None or len(a) == 0 for a in answers):
            raise ValueError("ptx_coef > 0 needs reference answers (answer_ids) for every prompt of the RL data")
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        ids, mask = pad_with_mask(seqs, self.pad_token_id())
        labels = pad_with_mask([[IGNORE_INDEX] * len(p) + list(a) for p, a in zip(prompts, answers)],
                               IGNORE_INDEX)[0]
        return {"ptx_input_ids": ids, "ptx_attention_mask": mask, "ptx_labels": labels}

    @staticmethod
    def ptx_units(batch: dict[str, Any]) -> int:
        return int((batch["ptx_labels"][:, 1:] != IGNORE_INDEX).sum())

    def ptx_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """Summed answer-token cross-entropy of the micro-batch's prompt + reference answer (pretraining mix;
        unit: answer tokens)."""
        out = model(input_ids=batch["ptx_input_ids"], attention_mask=batch["ptx_attention_mask"],
                    return_hidden_states=True)
        with self.backend.output_projection(self.policy_plain()) as project:
            total, _ = chunked_lm_loss(out.hidden_states, project, batch["ptx_labels"])
        return total

    # ------------------------------------------------------------------------------------------------ eval
    def eval_dataset_metrics(self) -> dict[str, float]:
        """Held-out rewards: greedy completions of ``eval_file_dataset`` prompts, mean of each reward source."""
        ds = self.eval_dataset
        return self.evaluate_rewards([ds[i] for i in self.eval_items(ds)])

    @torch.no_grad()
    def evaluate_rewards(self, items: list[dict], greedy: bool = True) -> dict[str, float]:
        """Mean reward (and per source) of one completion per prompt (greedy by default) over ``items`` (RL
        dataset items, this rank's share); summed over ranks. Collective."""
        gc = self.stage_config.generate_config
        config = dataclasses.replace(gc, do_sample=False) if greedy else gc
        sums: dict[str, float] = {"_count": 0.0, "eval_reward": 0.0}
        if len(self.rewards.names) > 1:
            sums.update({f"eval_reward/{n}": 0.0 for n in self.rewards.names})
        filler = items[0] if items else None
        for chunk, padding in even_batches(self.backend, items, max(1, self.config.batch_size), filler):
            if chunk == [None]:                   # nothing local: still enter the collective generation
                with self.backend.gathered_for_generation(self.model):
                    continue
            batch = self.collate(chunk)
            with self.backend.gathered_for_generation(self.model) as plain:
                images = [p for p in batch.get("pixel_values") or [] if p is not None and p.numel()]
                kw = {"pixel_values": torch.cat(images).to(self.device)} if images else {}
                out = generate(self.policy_for_generation(plain), batch["prompt_ids"], config,
                               eos_token_ids=self.stop_token_ids(), pad_token_id=self.pad_token_id(), **kw)
            if padding:
                continue
            rollout = Rollout(prompt_ids=batch["prompt_ids"], completion_ids=out.completions, finished=out.finished,
                              group=list(range(len(chunk))), answer_ids=batch["answer_ids"],
                              answer_text=batch["answer_text"],
                              prompt_text=[self.decode(p) for p in batch["prompt_ids"]],
                              completion_text=[self.decode(c) for c in out.completions])
            r = self.rewards(rollout)
            sums["eval_reward"] += float(r.total.sum())
            if len(self.rewards.names) > 1:
                for n, v in r.per_function.items():
                    sums[f"eval_reward/{n}"] += float(v.sum())
            sums["_count"] += len(chunk)
        totals = sum_over_ranks(self.backend, sums)
        count = totals.pop("_count")
        return {k: v / max(count, 1.0) for k, v in totals.items()}

    # -------------------------------------------------------------------------------------------- overrides
    def make_rollout_batches(self, prompts: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        raise NotImplementedError

    def nonfinite_rewards(self, rewards: RewardOutput) -> torch.Tensor:
        """``bool [N]``: samples whose reward is NaN/inf (possible only with ``nan_policy='skip'``); they are
        counted in ``skipped_nonfinite_rewards`` and the caller drops them from the update."""
        bad = ~torch.isfinite(rewards.total)
        if bool(bad.any()):
            self.skipped_nonfinite_rewards += int(bad.sum())
            self.metrics.print(f"step {self.global_step}: {int(bad.sum())} sample(s) with a NaN/inf reward "
                               f"skipped ({self.skipped_nonfinite_rewards} so far)")
        return bad

    def rollout_summary(self, rollout: Rollout, rewards: RewardOutput) -> dict[str, float]:
        """Reward, completion-length and truncation statistics of one rollout on this rank (finite rewards)."""
        lens = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        finite = torch.isfinite(rewards.total)
        if not bool(finite.all()):
            rewards = RewardOutput(rewards.scores[finite],
                                   None if rewards.dense is None else [d for d, f in zip(rewards.dense, finite) if f],
                                   {k: v[finite] for k, v in rewards.per_function.items()})
        stats = dict(self.rewards.metrics(rewards))
        stats["completion_len"] = float(lens.mean()) if lens.numel() else 0.0
        stats["truncated_frac"] = float(1.0 - sum(rollout.finished) / max(len(rollout), 1))
        return stats

