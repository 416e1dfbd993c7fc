"""The rollout engine shared by `GRPOTrainer` and `PPOTrainer`: generation, rewards, rollout micro-batches, and the
log-probability forward pass used for old / reference / current policy log-probs.

Generation
    :class:`RolloutEngine` generates through the backend's ``gathered_for_generation`` (ZeRO-3: the full weights are
    gathered once per rollout, every rank enters) with the project's KV-cache decoder: each distinct prompt is
    prefilled once and its cache shared by its ``group_size`` samples. ``chunk_size`` (``chunked_rollout_size``)
    bounds how many samples are decoded at once. Alternatively a :class:`GenerationService` — any callable
    ``(model, prompts, config, group_size) -> completions`` — produces the completions (an external engine).

Old log-probs (importance ratio)
    The generation log-probs are recorded (``Rollout.gen_logprobs``) but the *old* log-probs used by the loss are
    **recomputed** after generation by :func:`completion_logps`, the very function the loss uses, with the policy in
    eval mode, the same temperature scaling (``logits / T``), the same micro-batch composition and padding and the
    same autocast. Train-mode randomness (dropout, MoE router jitter) is switched off on RL policies
    (:func:`disable_stochasticity`), so at the first inner step the ratio is exactly 1 (bit for bit on CPU; tested).
    Incremental KV-cache decoding differs from a full forward pass in the last bits, which is why the generation
    log-probs are only logged (``gen_logprob_diff``) unless ``old_logprobs="generation"``.

Rewards are computed by :mod:`.rewards`; the RL trainer that drives all this is :mod:`.rl`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..data.collate import pad_with_mask
from ..generation import GenerateConfig, generate
from ..losses import chunked_token_logps
from ..parallel.base import head_projection

__all__ = [
    "GenerationService", "GenerationResult", "Rollout", "RolloutEngine", "completion_logps", "build_sequences",
    "disable_stochasticity", "Timer",
]


# ------------------------------------------------------------------------------------------------- generation
@runtime_checkable
class GenerationService(Protocol):
    """An external generator: ``service(model, prompts, config, group_size)`` with ``prompts`` a list of token-id
    lists and ``model`` the policy (full weights, also under ZeRO-3 — e.g. to sync an inference engine). Returns
    ``len(prompts) * group_size`` completions, prompt-major (``p0 x G, p1 x G, ...``): a list of token-id lists, a
    :class:`GenerationResult`, or any object with ``completions`` (and optionally ``logprobs`` of the sampled
    tokens and ``finished`` flags), e.g. :class:`llm_trainer.generation.GenerationOutput`."""

    def __call__(self, model: nn.Module, prompts: list[list[int]], config: GenerateConfig,
                 group_size: int) -> Any: ...


@dataclass
class GenerationResult:
    completions: list[list[int]]
    logprobs: list[torch.Tensor] | None = None
    finished: list[bool] | None = None


@dataclass
class Rollout:
    """One rollout on one rank, sample-major: sample i answers prompt ``group[i]`` (``group_size`` per prompt)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: list[bool]
    group: list[int]
    gen_logprobs: list[torch.Tensor] | None = None
    answer_ids: list[list[int] | None] = field(default_factory=list)
    answer_text: list[str | None] = field(default_factory=list)
    prompt_text: list[str] = field(default_factory=list)
    completion_text: list[str] = field(default_factory=list)
    pixel_values: list[torch.Tensor | None] = field(default_factory=list)   # VLM: each sample's prompt images

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, idx: Sequence[int]) -> "Rollout":
        pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
        return Rollout(prompt_ids=pick(self.prompt_ids), completion_ids=pick(self.completion_ids),
                       finished=pick(self.finished), group=pick(self.group),
                       gen_logprobs=pick(self.gen_logprobs) if self.gen_logprobs is not None else None,
                       answer_ids=pick(self.answer_ids), answer_text=pick(self.answer_text),
                       prompt_text=pick(self.prompt_text), completion_text=pick(self.completion_text),
                       pixel_values=pick(self.pixel_values))

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        out = Rollout([], [], [], [], gen_logprobs=[] if all(p.gen_logprobs is not None for p in parts) else None)
        offset = 0
        for p in parts:
            out.prompt_ids += p.prompt_ids
            out.completion_ids += p.completion_ids
            out.finished += p.finished
            out.group += [g + offset for g in p.group]
            offset += (max(p.group) + 1) if p.group else 0
            if out.gen_logprobs is not None:
                out.gen_logprobs += p.gen_logprobs
            out.answer_ids += p.answer_ids
            out.answer_text += p.answer_text
            out.prompt_text += p.prompt_text
            out.completion_text += p.completion_text
            out.pixel_values += p.pixel_values
        return out


class RolloutEngine:
    """Generates ``group_size`` completions per prompt with the policy (see the module docstring)."""

    def __init__(self, backend, generate_config: GenerateConfig, eos_token_ids: Sequence[int], pad_token_id: int,
                 group_size: int = 1, chunk_size: int | None = None, service: Callable | None = None,
                 vocab_size: int | None = None):
        self.backend = backend
        self.config = generate_config
        self.eos_token_ids = list(eos_token_ids)
        self.stop_ids = set(self.eos_token_ids) | set(generate_config.stop_token_ids or [])
        self.pad_token_id = int(pad_token_id)
        self.group_size = int(group_size)
        self.chunk_size = chunk_size
        self.service = service
        self.vocab_size = vocab_size

    @property
    def temperature(self) -> float:
        """The temperature log-probs are scaled with: the sampling temperature, 1 for greedy decoding."""
        return 1.0 if self.config.greedy else float(self.config.temperature)

    def _prompt_chunks(self, n: int) -> Iterator[tuple[int, int]]:
        per = n if not self.chunk_size else max(1, self.chunk_size // self.group_size)
        for s in range(0, n, per):
            yield s, min(n, s + per)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[list[int]], generator: torch.Generator | None = None,
                 gather: bool = True, pixel_values: list[torch.Tensor | None] | None = None) -> GenerationResult:
        """Completions for ``prompts`` (prompt-major, ``group_size`` each). Collective under ZeRO-3 unless
        ``gather=False`` (``model`` is then already a plain module with full weights). ``pixel_values[i]``: the
        images ``[n_i, 3, H, W]`` (or None) of prompt ``i`` (VLM)."""
        comps: list[list[int]] = []
        lps: list[torch.Tensor] | None = []
        fins: list[bool] = []
        ctx = self.backend.gathered_for_generation(model) if gather else contextlib.nullcontext(model)
        with ctx as plain:
            for s, e in self._prompt_chunks(len(prompts)):
                res = self._generate_chunk(plain, prompts[s:e], generator,
                                           pixel_values[s:e] if pixel_values is not None else None)
                comps += res.completions
                fins += res.finished
                if lps is not None and res.logprobs is not None:
                    lps += list(res.logprobs)
                else:
                    lps = None
        return GenerationResult(comps, lps, fins)

    def _generate_chunk(self, model, prompts, generator, pixel_values=None) -> GenerationResult:
        n = len(prompts) * self.group_size
        images = [p for p in (pixel_values or []) if p is not None and p.numel()]
        if images and self.service is not None:
            raise NotImplementedError("a generation_service cannot be used with image prompts (VLM) yet")
        if self.service is None:
            kw = {"pixel_values": torch.cat(images).to(next(model.parameters()).device)} if images else {}
            out = generate(model, prompts, self.config, eos_token_ids=self.eos_token_ids,
                           pad_token_id=self.pad_token_id, group_size=self.group_size, return_logprobs=True,
                           generator=generator, **kw)
            return GenerationResult(out.completions, out.logprobs, out.finished)
        name = getattr(self.service, "__name__", type(self.service).__name__)
        raw = self.service(model, prompts, self.config, self.group_size)
        if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], (list, tuple, torch.Tensor)) \
                and not hasattr(raw, "completions"):
            comps, lps, fins = list(raw), None, None
        else:
            comps = getattr(raw, "completions", None)
            lps, fins = getattr(raw, "logprobs", None), getattr(raw, "finished", None)
            if comps is None:
                raise TypeError(f"generation service {name!r} returned {type(raw).__name__}; expected a list of "
                                f"token-id lists or an object with .completions")
        if len(comps) != n:
            raise ValueError(f"generation service {name!r} returned {len(comps)} completions for {len(prompts)} "
                             f"prompts x group_size {self.group_size} = {n}")
        out_c, out_l, out_f = [], [] if lps is not None else None, []
        limit = self.config.max_new_tokens
        for i, c in enumerate(comps):
            ids = c.reshape(-1).tolist() if isinstance(c, torch.Tensor) else [int(t) for t in c]
            cut = next((j + 1 for j, t in enumerate(ids) if t in self.stop_ids), None)   # stop at the first stop id
            if cut is not None:
                ids = ids[:cut]
            ids = ids[:limit]
            if self.vocab_size is not None and any(t < 0 or t >= self.vocab_size for t in ids):
                raise ValueError(f"generation service {name!r}: completion {i} has token ids outside the "
                                 f"vocabulary [0, {self.vocab_size})")
            out_c.append(ids)
            done = bool(fins[i]) if fins is not None else (bool(ids) and ids[-1] in self.stop_ids)
            out_f.append(done)
            if out_l is not None:
                lp = torch.as_tensor(lps[i], dtype=torch.float32).reshape(-1)[:len(ids)]
                if lp.numel() != len(ids):
                    raise ValueError(f"generation service {name!r}: {lp.numel()} log-probs for completion {i} "
                                     f"of {len(ids)} tokens")
                out_l.append(lp)
        return GenerationResult(out_c, out_l, out_f)


# -------------------------------------------------------------------------------------------- tensor helpers
def build_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    pad_token_id: int) -> dict[str, Any]:
    """``input_ids`` ``[B, P + T]``: prompts left-padded to ``P``, completions right-padded to ``T`` (>= 1);
    ``attention_mask``; ``completion_mask [B, T]`` (1 on generated tokens); ``prompt_len`` = P (an int)."""
    p_ids, p_mask = pad_with_mask([list(p) for p in prompts], pad_token_id, side="left")
    T = max(1, max((len(c) for c in completions), default=0))
    c_ids, c_mask = pad_with_mask([list(c) for c in completions], pad_token_id, length=T)
    return {"input_ids": torch.cat([p_ids, c_ids], 1), "attention_mask": torch.cat([p_mask, c_mask], 1),
            "completion_mask": c_mask.float(), "prompt_len": p_ids.size(1)}


def completion_logps(model: nn.Module, batch: dict[str, Any], temperature: float = 1.0, *,
                     project: Callable[[torch.Tensor], torch.Tensor] | None = None, with_entropy: bool = False,
                     with_values: bool = False, chunk_size: int = 4096) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` on a :func:`build_sequences` batch → ``logp [B, T]`` =
    ``log softmax(logits / temperature)`` of each completion token (float32; 0 where ``completion_mask`` is 0),
    computed chunk by chunk from the hidden states through ``project`` (the backend's ``output_projection`` of the
    policy; None → the plain model's own head: fine outside ZeRO-3) — no ``[B, T, V]`` logits tensor — optionally ``entropy [B, T]`` (detached) and, with ``with_values``
    (the model is PPO's policy+value module, called with ``return_values=True``), ``values [B, T+1]`` (column t: V
    of the state before completion token t; column ``len_i``: the state after the last token, the bootstrap value
    of a truncated completion). ``model`` may be a DDP/DeepSpeed wrapper. Every log-prob of the trainers (old,
    reference, current) goes through here, so they agree bit for bit."""
    P = int(batch["prompt_len"])
    if project is None:
        project = head_projection(getattr(model, "module", model))
    kw = {"return_values": True} if with_values else {}
    for key in ("pixel_values", "image_counts"):                              # VLM prompts
        if batch.get(key) is not None:
            kw[key] = batch[key]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden_states=True, **kw)
    h = out.hidden_states[:, P - 1:-1]                                       # positions predicting the completion
    cm = batch["completion_mask"]
    labels = batch["input_ids"][:, P:].masked_fill(cm == 0, -100)
    got = chunked_token_logps(h, project, labels, chunk_size=chunk_size, shift=False, temperature=temperature,
                              return_entropy=with_entropy)
    res = {"logp": got[0]}
    if with_entropy:
        res["entropy"] = got[1].detach()
    if with_values:
        res["values"] = out.values[:, P - 1:].float()
    aux = getattr(out, "aux_loss", None)
    if aux is not None and aux.requires_grad:
        res["aux_loss"] = aux
    return res


def disable_stochasticity(model: nn.Module) -> nn.Module:
    """Switch off train-mode randomness (dropout, attention dropout, MoE router jitter) so a train-mode forward equals
    the eval-mode forward that produced the old log-probs (the importance ratio starts at exactly 1)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
        cfg = getattr(m, "cfg", None)
        if cfg is not None and dataclasses.is_dataclass(cfg) and getattr(cfg, "router_jitter", 0):
            m.cfg = dataclasses.replace(cfg, router_jitter=0.0)
    return model


class Timer:
    """Accumulates wall time per phase: ``with timer("generate"): ...``."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
