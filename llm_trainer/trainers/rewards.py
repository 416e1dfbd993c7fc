"""Rewards of RL rollouts: reward functions, reward models as reward sources, and their weighted combination.

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

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

__all__ = ["RewardFun", "RewardFunctionError", "RewardModelSource", "RewardSet", "RewardOutput"]


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
    """Several reward sources with weights. ``funcs``: a callable, a reward model, or a list of them.
    ``allow_nonfinite``: pass NaN/inf values through (the trainer skips those samples, ``nan_policy='skip'``)
    instead of raising :class:`RewardFunctionError`."""

    def __init__(self, funcs: Any, weights: Sequence[float] | None = None, allow_nonfinite: bool = False):
        self.allow_nonfinite = allow_nonfinite
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

    def __call__(self, rollout: Any) -> RewardOutput:
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
            value = self._check(name, raw, n, lengths, self.allow_nonfinite)
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
    def _check(name: str, raw: Any, n: int, lengths: list[int],
               allow_nonfinite: bool = False) -> torch.Tensor | list[torch.Tensor]:
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
                if not allow_nonfinite and not bool(torch.isfinite(t).all()):
                    raise RewardFunctionError(f"{where} returned a non-finite value (NaN/inf) for completion {i}")
                out.append(t)
            return out
        try:
            t = torch.as_tensor(raw if isinstance(raw, torch.Tensor) else [float(v) for v in raw],
                                dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"{where} returned values that are not numbers: {e}") from None
        bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
        if bad and not allow_nonfinite:
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
