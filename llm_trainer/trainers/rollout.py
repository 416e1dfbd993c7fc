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

Rewards
    A *reward function* (:class:`RewardFun`) is called with keyword arguments and returns one number per completion
    (an outcome reward) or one list of numbers per completion, aligned with its tokens (a dense reward)::

        def reward(*, prompts, completions, prompt_ids, completion_ids, answers, answer_ids, finished, **kw):
            return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answers)]

    Only the keyword names the function declares are passed (or all, with ``**kwargs``). ``prompts`` /
    ``completions`` are decoded texts (without special tokens), ``*_ids`` token-id lists, ``answers`` /
    ``answer_ids`` the dataset's reference answers (None where absent), ``finished[i]`` whether completion i ended
    with a stop token (False: truncated at ``max_new_tokens``). A reward model — any object with
    ``score(prompt_ids, completion_ids) -> [N]`` (``llm_trainer.RewardModel``) — is a source too. Several sources
    are combined as ``sum_k w_k r_k``; a raising function, a NaN/inf value or a wrong length raises
    :class:`RewardFunctionError` naming the function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..generation import GenerateConfig, generate

__all__ = [
    "GenerationService", "GenerationResult", "Rollout", "RolloutEngine", "RewardFun", "RewardFunctionError",
    "RewardModelSource", "RewardSet", "RewardOutput", "completion_logps", "build_sequences", "disable_stochasticity",
    "eval_mode",
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
            kw = {"pixel_values": torch.cat(images).to(_device_of(model))} if images else {}
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


# ---------------------------------------------------------------------------------------------------- rewards
class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned NaN/inf, or the wrong number of values."""


@runtime_checkable
class RewardFun(Protocol):
    """See the module docstring: keyword arguments ``prompts, completions, prompt_ids, completion_ids, answers,
    answer_ids, finished``; returns ``N`` numbers, or ``N`` per-token lists (dense)."""

    def __call__(self, **kwargs: Any) -> Any: ...


class RewardModelSource:
    """Adapts a reward model (anything with ``score(prompt_ids, completion_ids) -> [N]``) to a reward function."""

    def __init__(self, model: Any, name: str | None = None):
        if not callable(getattr(model, "score", None)):
            raise TypeError(f"{type(model).__name__} has no score(prompt_ids, completion_ids) method")
        self.model = model
        self.__name__ = name or type(model).__name__

    def __call__(self, *, prompt_ids, completion_ids, **_: Any):
        with torch.no_grad():
            return self.model.score(prompt_ids, completion_ids)


_REWARD_ARGS = ("prompts", "completions", "prompt_ids", "completion_ids", "answers", "answer_ids", "finished")


def _accepted(fn: Callable) -> tuple[str, ...] | None:
    """Keyword names to pass (None = all, the function takes **kwargs)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


@dataclass
class RewardOutput:
    """``scores [N]``: weighted sum of the outcome rewards; ``dense``: per-sample tensors of the weighted sum of the
    dense rewards (None when no function is dense); ``per_function``: each function's unweighted per-sample total;
    ``total [N]``: the sequence reward (``scores`` + summed dense)."""

    scores: torch.Tensor
    dense: list[torch.Tensor] | None
    per_function: dict[str, torch.Tensor]

    @property
    def total(self) -> torch.Tensor:
        if self.dense is None:
            return self.scores
        return self.scores + torch.stack([d.sum() for d in self.dense])


class RewardSet:
    """Several reward sources with weights. ``funcs``: a callable, a reward model, or a list of them."""

    def __init__(self, funcs: Any, weights: Sequence[float] | None = None):
        if funcs is None:
            raise ValueError("reward_func is required: a reward function, a reward model (with .score) or a list")
        items = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
        if not items:
            raise ValueError("reward_func: empty list")
        self.funcs: list[Callable] = []
        self.names: list[str] = []
        for f in items:
            if callable(getattr(f, "score", None)) and (not callable(f) or isinstance(f, nn.Module)):
                f = RewardModelSource(f)          # a reward model (e.g. llm_trainer.RewardModel, an nn.Module)
            elif not callable(f):
                raise TypeError(f"reward_func entries must be callables or reward models, got {type(f).__name__}")
            name = _fn_name(f)
            base, k = name, 2
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
            self.funcs.append(f)
            self.names.append(name)
        if weights is None:
            weights = [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.funcs)} reward functions "
                             f"{self.names}")
        self.weights = [float(w) for w in weights]
        self._accepts = [_accepted(f) for f in self.funcs]

    def __call__(self, rollout: Rollout) -> RewardOutput:
        n = len(rollout)
        lengths = [len(c) for c in rollout.completion_ids]
        kwargs = dict(prompts=rollout.prompt_text, completions=rollout.completion_text,
                      prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                      answers=rollout.answer_text or [None] * n, answer_ids=rollout.answer_ids or [None] * n,
                      finished=rollout.finished)
        scores = torch.zeros(n, dtype=torch.float32)
        dense: list[torch.Tensor] | None = None
        per_fn: dict[str, torch.Tensor] = {}
        for fn, name, w, acc in zip(self.funcs, self.names, self.weights, self._accepts):
            args = kwargs if acc is None else {k: v for k, v in kwargs.items() if k in acc}
            try:
                raw = fn(**args)
            except Exception as e:  # noqa: BLE001 - re-raised with the function's name
                raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            value = self._check(name, raw, n, lengths)
            if isinstance(value, list):
                dense = [torch.zeros(L) for L in lengths] if dense is None else dense
                for i, v in enumerate(value):
                    dense[i] = dense[i] + w * v
                per_fn[name] = torch.stack([v.sum() for v in value]) if n else torch.zeros(0)
            else:
                scores = scores + w * value
                per_fn[name] = value
        return RewardOutput(scores, dense, per_fn)

    @staticmethod
    def _check(name: str, raw: Any, n: int, lengths: list[int]) -> torch.Tensor | list[torch.Tensor]:
        where = f"reward function {name!r}"
        if raw is None:
            raise RewardFunctionError(f"{where} returned None; expected {n} numbers (one per completion)")
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().float().cpu()
            if raw.dim() == 2 and raw.size(0) == n:        # dense, padded [N, T]
                raw = [raw[i, :L] for i, L in enumerate(lengths)]
            elif raw.dim() == 2 and raw.size(-1) == 1:
                raw = raw[:, 0]
        try:
            length = len(raw)
        except TypeError:
            raise RewardFunctionError(f"{where} returned {type(raw).__name__}; expected a sequence of {n} "
                                      f"numbers (one per completion)") from None
        if length != n:
            raise RewardFunctionError(f"{where} returned {length} values for {n} completions")
        is_dense = n > 0 and not isinstance(raw, torch.Tensor) and any(
            isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0) for v in raw)
        if is_dense:
            out = []
            for i, (v, L) in enumerate(zip(raw, lengths)):
                t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                if t.numel() != L:
                    raise RewardFunctionError(f"{where}: dense reward {i} has {t.numel()} values for a completion "
                                              f"of {L} tokens")
                if not bool(torch.isfinite(t).all()):
                    raise RewardFunctionError(f"{where} returned a non-finite value (NaN/inf) for completion {i}")
                out.append(t)
            return out
        try:
            t = torch.as_tensor(raw if isinstance(raw, torch.Tensor) else [float(v) for v in raw],
                                dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"{where} returned values that are not numbers: {e}") from None
        bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
        if bad:
            raise RewardFunctionError(f"{where} returned non-finite values (NaN/inf) for completions {bad[:8]}")
        return t

    def metrics(self, out: RewardOutput) -> dict[str, float]:
        m: dict[str, float] = {}
        total = out.total
        if total.numel():
            m["reward/mean"] = float(total.mean())
            m["reward/std"] = float(total.std(unbiased=False))
        if len(self.names) > 1 or self.names[0] != "reward":
            for name, v in out.per_function.items():
                if v.numel():
                    m[f"reward/{name}/mean"] = float(v.mean())
                    m[f"reward/{name}/std"] = float(v.std(unbiased=False))
        return m


# -------------------------------------------------------------------------------------------- tensor helpers
def build_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    pad_token_id: int) -> dict[str, Any]:
    """``input_ids`` ``[B, P + T]``: prompts left-padded to ``P``, completions right-padded to ``T`` (>= 1);
    ``attention_mask``; ``completion_mask [B, T]`` (1 on generated tokens); ``prompt_len`` = P (an int)."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max((len(c) for c in completions), default=0))
    ids = torch.full((B, P + T), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):P] = 1
        if len(c):
            ids[i, P:P + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            mask[i, P:P + len(c)] = 1
            cmask[i, :len(c)] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": cmask, "prompt_len": P}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _output_projection(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits of hidden states through the module when there is one (LoRA, ZeRO-3 hooks), else the tied weight."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head(h)
    return F.linear(h, model.lm_head_weight())


def completion_logps(model: nn.Module, batch: dict[str, Any], temperature: float = 1.0, *,
                     with_entropy: bool = False, plain: nn.Module | None = None,
                     with_values: bool = False) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` on a :func:`build_sequences` batch → ``logp [B, T]`` =
    ``log softmax(logits / temperature)`` of each completion token (float32; 0 where ``completion_mask`` is 0),
    optionally ``entropy [B, T]`` (detached) and, with ``with_values`` (the model is PPO's policy+value module,
    called with ``return_values=True``), ``values [B, T+1]`` (column t: V of the state before completion token t;
    column ``len_i``: the state after the last token, the bootstrap value of a truncated completion).
    ``model`` may be a DDP/DeepSpeed wrapper; ``plain`` is the module inside it (for the output projection).
    Every log-prob of the trainers (old, reference, current) goes through here, so they agree bit for bit."""
    plain = plain if plain is not None else getattr(model, "module", model)
    P = int(batch["prompt_len"])
    kw = {"return_values": True} if with_values else {}
    for key in ("pixel_values", "image_counts"):                              # VLM prompts
        if batch.get(key) is not None:
            kw[key] = batch[key]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden_states=True, **kw)
    hidden = out.hidden_states
    h = hidden[:, P - 1:-1]                                                  # positions predicting the completion
    targets = batch["input_ids"][:, P:]
    logits = _output_projection(plain, h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    cm = batch["completion_mask"]
    res = {"logp": torch.where(cm > 0, logp, torch.zeros_like(logp))}
    if with_entropy:
        with torch.no_grad():
            p = (logits - lse.unsqueeze(-1)).exp()
            ent = lse - (p * logits).sum(-1)
            res["entropy"] = ent * cm
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


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, each module's previous flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


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


def finite_or_zero(x: float) -> float:
    return x if math.isfinite(x) else 0.0


# ------------------------------------------------------------------------------------------ shared RL trainer
from .base import BaseTrainer  # noqa: E402
from .images import expand_items, is_vlm, load_images, pixel_provider  # noqa: E402


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class RLTrainer(BaseTrainer):
    """What GRPO and PPO share: prompt data, the rollout engine, rewards, the reference model, rollout
    micro-batches synchronised across ranks, reward evaluation. Subclasses implement ``make_rollout_batches``.

    ``reward_func``: a reward function, a reward model (``.score``) or a list of them (see the module docstring);
    ``reward_weights``: one weight per source (None → the stage config's ``reward_weights`` or all 1).
    ``generation_service``: see :class:`GenerationService`. ``old_logprobs``: 'recompute' (default, exact ratio 1)
    or 'generation' (use the sampler's log-probs; only sensible with an external engine whose numerics you
    trust, and never with top-k/top-p/repetition penalty, which change the sampling distribution)."""

    stage = "rl"
    loss_unit = "tokens"

    def __init__(self, *, train_config, reward_func: Any = None, reward_weights: Sequence[float] | None = None,
                 eval_prompts: list[str] | None = None, generation_service: Any = None,
                 old_logprobs: str = "recompute", **kwargs: Any) -> None:
        if old_logprobs not in ("recompute", "generation"):
            raise ValueError(f"old_logprobs must be 'recompute' or 'generation', got {old_logprobs!r}")
        self.old_logprobs_source = old_logprobs
        stage_cfg = self._stage_config_of(train_config)
        weights = reward_weights if reward_weights is not None else getattr(stage_cfg, "reward_weights", None)
        self.rewards = RewardSet(reward_func, weights)
        self.rollouts_done = 0
        super().__init__(train_config=train_config, eval_prompts=eval_prompts,
                         generation_service=generation_service, **kwargs)
        sc = self.stage_config
        gc = sc.generate_config
        self.engine = RolloutEngine(self.backend, gc, self.stop_token_ids(), self.pad_token_id(),
                                    group_size=self.group_size, chunk_size=sc.chunked_rollout_size,
                                    service=generation_service, vocab_size=self.model_config.vocab_size)
        self.timer = Timer()

    # ------------------------------------------------------------------------------------------ config hooks
    @classmethod
    def _stage_config_of(cls, train_config):
        raise NotImplementedError

    def get_stage_config(self):
        return self._stage_config_of(self.config)

    @property
    def group_size(self) -> int:
        return 1

    @property
    def temperature(self) -> float:
        gc = self.stage_config.generate_config
        return 1.0 if gc.greedy else float(gc.temperature)

    def micro_batch_size(self) -> int:
        return self.rollout_micro_batch_size()

    def rollout_micro_batch_size(self) -> int:
        """Samples per micro-batch of the update phase (None in the stage config → the whole rollout)."""
        n = self.config.batch_size * self.group_size
        mb = getattr(self.stage_config, self._mb_field, None)
        return min(n, mb) if mb else n

    _mb_field = "grpo_batch_size"
    _epochs_field = "grpo_epochs"

    def prepare_model(self, model: nn.Module):
        disable_stochasticity(model)
        return None

    # -------------------------------------------------------------------------------------------------- data
    def build_dataset(self, files: Any):
        if isinstance(files, torch.utils.data.Dataset):
            return files
        if isinstance(files, (list, tuple)) and files and isinstance(files[0], dict):
            return _ListDataset(list(files))
        from ..data.datasets import open_dataset
        return open_dataset("rl", files, self.config.dataset_block_size, vocab_size=self.model_config.vocab_size)

    def collate(self, items: list[dict]) -> dict[str, Any]:
        def ids(x):
            if x is None:
                return None
            return x.reshape(-1).tolist() if isinstance(x, torch.Tensor) else [int(t) for t in x]
        out = {"prompt_ids": [ids(it["prompt_ids"]) for it in items],
               "answer_ids": [ids(it.get("answer_ids")) for it in items],
               "answer_text": [it.get("answer_text") for it in items]}
        if is_vlm(self.model_config):      # VLM: expanded image tokens, each prompt's pixel values
            out["prompt_ids"] = [ids(it["prompt_ids"]) for it in expand_items(items, self.model_config,
                                                                              [("prompt_ids", None)])]
            provider = pixel_provider(self)
            out["pixel_values"] = [load_images(provider, self.model_config, it["images"]) if it.get("images")
                                   else None for it in items]
        return out

    def count_units(self, batch: dict[str, Any]) -> int:
        return int(batch["units"])

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def pad_token_id(self) -> int:
        if self.tokenizer is not None:
            return super().pad_token_id()
        mc = self.model_config
        for v in (mc.pad_token_id, mc.eos_token_id):
            if isinstance(v, int):
                return v
            if isinstance(v, (list, tuple)) and v:
                return int(v[0])
        return 0

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        return self.tokenizer.decode(list(ids))

    # ----------------------------------------------------------------------------------------------- steps
    def steps_per_rollout(self) -> int:
        n = self.config.batch_size * self.group_size
        micro = math.ceil(n / self.rollout_micro_batch_size())
        return getattr(self.stage_config, self._epochs_field) * math.ceil(micro / self.grad_accum)

    def steps_per_epoch(self) -> int:
        return (len(self.sampler) // self.config.batch_size) * self.steps_per_rollout()

    def _epoch_float(self) -> float:
        per_epoch = max(len(self.sampler) // self.config.batch_size, 1)
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
            self.on_epoch_end()

    def training_windows(self) -> Iterator[list[dict[str, Any]]]:
        prompts = self.prompt_batches()
        epochs = getattr(self.stage_config, self._epochs_field)
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

    # -------------------------------------------------------------------------------------------- rollouts
    def rollout_generator(self) -> torch.Generator:
        """Sampling RNG of this rollout: seeded by (seed, rank, rollout number), so ranks differ and resume repeats."""
        g = torch.Generator(device=self.device)
        g.manual_seed((self.config.seed * 1_000_003 + 7919 * (self.backend.rank + 1)
                       + 104_729 * (self.epoch * 1_000_000 + self.epoch_position)) % (2**63))
        return g

    def policy_module(self, plain: nn.Module) -> nn.Module:
        """The policy LM inside the (unwrapped) trained module."""
        return plain

    def sample(self, prompt_batch: dict[str, Any]) -> tuple[Rollout, RewardOutput]:
        """Generate ``group_size`` completions per prompt and score them."""
        prompts = prompt_batch["prompt_ids"]
        G = self.group_size
        gen = self.rollout_generator()
        with self.timer("generate"):
            model = self.model
            res = self._generate(model, prompts, gen, prompt_batch.get("pixel_values"))
        rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
        answers = prompt_batch.get("answer_ids") or [None] * len(prompts)
        texts = prompt_batch.get("answer_text") or [None] * len(prompts)
        ptext = [self.decode(p) for p in prompts]
        rollout = Rollout(prompt_ids=rep(prompts), completion_ids=res.completions, finished=res.finished,
                          group=[i for i in range(len(prompts)) for _ in range(G)], gen_logprobs=res.logprobs,
                          answer_ids=rep(answers), answer_text=rep(texts), prompt_text=rep(ptext),
                          completion_text=[self.decode(c) for c in res.completions],
                          pixel_values=rep(prompt_batch["pixel_values"]) if "pixel_values" in prompt_batch else [])
        with self.timer("reward"):
            rewards = self.rewards(rollout)
        return rollout, rewards

    def _generate(self, model, prompts, generator, pixel_values=None) -> GenerationResult:
        # generate with the policy LM (PPO's trained module also holds the value model)
        with self.backend.gathered_for_generation(model) as plain:
            return self.engine.generate(self.policy_module(plain), prompts, generator, gather=False,
                                        pixel_values=pixel_values)

    @torch.no_grad()
    def score_micro_batches(self, batches: list[dict[str, Any]], with_values: bool = False) -> None:
        """Adds ``old_logp`` (and ``ref_logp`` when β > 0, ``old_values`` for PPO) to every micro-batch: the policy
        in eval mode through :func:`completion_logps`, under the same autocast as the update (ratio exactly 1)."""
        with self.backend.gathered_for_generation(self.model) as plain, eval_mode(plain):
            policy = self.policy_module(plain)
            for b in batches:
                dev = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                with self.timer("old_logp"), self.backend.autocast():
                    out = completion_logps(plain if with_values else policy, dev, self.temperature,
                                           plain=policy, with_values=with_values)
                b["old_logp"] = out["logp"].detach().float().cpu()
                if with_values:
                    b["old_values"] = out["values"].detach().float().cpu()
                if self.ref_model is not None:
                    with self.timer("reference"), self.backend.autocast():
                        if self.ref_model == "lora":
                            from ..model.lora import lora_disabled
                            with lora_disabled(policy):
                                ref = completion_logps(policy, dev, self.temperature)["logp"]
                        else:
                            with eval_mode(self.ref_model):
                                ref = completion_logps(self.ref_model, dev, self.temperature)["logp"]
                    b["ref_logp"] = ref.detach().float().cpu()

    # ------------------------------------------------------------------------------------------- reference
    @property
    def needs_reference(self) -> bool:
        return False

    def ref_weights_path(self) -> str | None:
        return getattr(self.stage_config, "ref_model_weights_path", None)

    def setup_extra_models(self) -> None:
        self.ref_model = None
        if self.needs_reference:
            self.ref_model = self.build_reference()

    def build_reference(self):
        """Frozen initial policy (or ``ref_model_weights_path``); with LoRA and no path, the policy with adapters
        off. Under ZeRO-3 a full, unpartitioned replica on every rank."""
        from ..model.lora import has_lora
        from .setup import frozen_copy, load_weights, new_model
        path = self.ref_weights_path()
        with self.backend.gathered_for_generation(self.model) as plain:
            policy = self.policy_module(plain)
            dtype = next(policy.parameters()).dtype
            if path is None and has_lora(policy):
                return "lora"
            zero3 = getattr(self.backend, "stage", None) == 3
            if path is not None:
                ref = new_model(self.model_config)
                load_weights(ref, path)
            elif zero3:
                ref = new_model(self.model_config)
                ref.load_state_dict({k: v.detach().clone() for k, v in policy.state_dict().items()})
            else:
                ref = frozen_copy(policy)
        disable_stochasticity(ref)
        ref = frozen_copy(ref) if path is not None or zero3 else ref
        return ref.to(device=self.device, dtype=dtype)

    # ----------------------------------------------------------------------------------- micro-batch helpers
    def sync_count(self, n: int, op: str = "max") -> int:
        t = torch.tensor([float(n)], dtype=torch.float64)
        self.backend.all_reduce(t, op)
        return int(t[0])

    def split_micro_batches(self, n_samples: int, keep: list[int]) -> list[list[int]]:
        """Indices of each micro-batch over the kept samples; every rank gets the same number of micro-batches
        (ZeRO-3/DDP run the same collectives everywhere): short ranks get padding micro-batches (index lists
        marked by a leading -1) that run a forward/backward with an all-zero loss mask."""
        mb = self.rollout_micro_batch_size()
        chunks = [keep[s:s + mb] for s in range(0, len(keep), mb)]
        total = self.sync_count(len(chunks))
        while len(chunks) < total:
            chunks.append([-1, 0 if not keep else keep[0]])
        return chunks

    # ------------------------------------------------------------------------------------------------ ptx
    def ptx_tensors(self, prompts: list[list[int]], answers: list[list[int] | None]) -> dict[str, torch.Tensor]:
        if any(a is None or len(a) == 0 for a in answers):
            raise ValueError("ptx_coef > 0 needs reference answers (answer_ids) for every prompt of the RL data")
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_token_id(), dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, prompts)):
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, :len(s)] = 1
            labels[i, len(p):len(s)] = torch.as_tensor(s[len(p):])
        return {"ptx_input_ids": ids, "ptx_attention_mask": mask, "ptx_labels": labels}

    def ptx_loss(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """Mean answer-token cross-entropy of the micro-batch's prompt + reference answer (pretraining-data mix)."""
        from ..losses import lm_loss
        out = model(input_ids=batch["ptx_input_ids"], attention_mask=batch["ptx_attention_mask"])
        logits = out.logits if out.logits is not None else _output_projection(
            self.policy_module(self.backend.unwrap(model)), out.hidden_states)
        total, n = lm_loss(logits, batch["ptx_labels"])
        return total / torch.as_tensor(n, dtype=total.dtype, device=total.device).clamp(min=1)

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def eval_loss(self) -> dict[str, float]:
        """Held-out rewards: greedy completions of ``eval_file_dataset`` prompts, mean of each reward source."""
        items = []
        limit = None if self.config.eval_batches is None else self.config.eval_batches * self.config.batch_size
        from ..data.sampler import ShardedSampler
        sampler = ShardedSampler(len(self.eval_dataset), rank=self.backend.rank, world_size=self.backend.world_size,
                                 seed=self.config.seed, shuffle=False, drop_last=False)
        for k, i in enumerate(sampler):
            if limit is not None and k >= limit:
                break
            items.append(self.eval_dataset[i])
        res = self.evaluate_rewards(items)
        return res

    @torch.no_grad()
    def evaluate_rewards(self, items: list[dict], greedy: bool = True) -> dict[str, float]:
        """Mean reward (and per source) of one completion per prompt (greedy by default) over ``items`` (RL
        dataset items, this rank's share); all-reduced over ranks. Collective."""
        gc = self.stage_config.generate_config
        config = dataclasses.replace(gc, do_sample=False) if greedy else gc
        sums: dict[str, float] = {}
        count = 0
        names = ["eval_reward"] + [f"eval_reward/{n}" for n in self.rewards.names]
        bs = max(1, self.config.batch_size)
        n_batches = self.sync_count(math.ceil(len(items) / bs))
        for s in range(n_batches):
            chunk = items[s * bs:(s + 1) * bs]
            real = bool(chunk)
            if not real:
                chunk = items[:1] if items else None
            if chunk is None:                      # nothing local: still enter the collective generation
                with self.backend.gathered_for_generation(self.model):
                    pass
                continue
            batch = self.collate(chunk)
            with self.backend.gathered_for_generation(self.model) as plain:
                policy = self.policy_module(plain)
                images = [p for p in batch.get("pixel_values") or [] if p is not None and p.numel()]
                kw = {"pixel_values": torch.cat(images).to(self.device)} if images else {}
                out = generate(policy, batch["prompt_ids"], config, eos_token_ids=self.stop_token_ids(),
                               pad_token_id=self.pad_token_id(), **kw)
            if not real:
                continue
            rollout = Rollout(prompt_ids=batch["prompt_ids"], completion_ids=out.completions, finished=out.finished,
                              group=list(range(len(chunk))), answer_ids=batch["answer_ids"],
                              answer_text=batch["answer_text"],
                              prompt_text=[self.decode(p) for p in batch["prompt_ids"]],
                              completion_text=[self.decode(c) for c in out.completions])
            r = self.rewards(rollout)
            sums["eval_reward"] = sums.get("eval_reward", 0.0) + float(r.total.sum())
            for n, v in r.per_function.items():
                sums[f"eval_reward/{n}"] = sums.get(f"eval_reward/{n}", 0.0) + float(v.sum())
            count += len(chunk)
        t = torch.tensor([sums.get(n, 0.0) for n in names] + [float(count)], dtype=torch.float64)
        self.backend.all_reduce(t)
        total = max(float(t[-1]), 1.0)
        res = {n: float(t[i]) / total for i, n in enumerate(names)}
        if len(self.rewards.names) == 1:
            res = {"eval_reward": res["eval_reward"]}
        self.metrics.print(f"step {self.global_step}: eval_reward {res['eval_reward']:.4f} "
                           f"({int(t[-1])} prompts)") if hasattr(self, "metrics") else None
        return res

    # -------------------------------------------------------------------------------------------- overrides
    def make_rollout_batches(self, prompts: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        raise NotImplementedError

    def rollout_stats(self, rollout: Rollout, rewards: RewardOutput) -> dict[str, float]:
        lens = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        stats = dict(self.rewards.metrics(rewards))
        stats["completion_len"] = float(lens.mean()) if lens.numel() else 0.0
        stats["truncated_frac"] = float(1.0 - sum(rollout.finished) / max(len(rollout), 1))
        return stats
