"""The evaluator protocol, the task base class and the collective log-likelihood routine the tasks share.

An evaluator is a callable ``evaluator(trainer) -> {metric: float}`` that the training loop runs on every rank at each
evaluation (every ``TrainConfig.eval_interval`` steps and at the end; ``Trainer(..., evaluators=[...])``); the loop
logs what it returns to ``metrics.jsonl`` and prints it on the eval line. It may also be called directly (before
training, for a baseline) — on every rank, since it is collective.

Ranks: each rank takes its share of the requests (:func:`~llm_trainer.trainers.collective.rank_shard` of a
length-sorted list), runs them in batches with :func:`~llm_trainer.trainers.collective.even_batches` (under ZeRO-3 a
forward pass gathers partitioned weights, a collective, so every rank runs the same number of passes; padding
batches run and are discarded), and the per-request results are summed over ranks into one vector every rank then
reduces the same way, so 2 ranks give the numbers of one process (up to the float rounding of other batch
compositions).

Log-likelihoods use the backbone's final hidden states and the chunked log-prob routine
(:func:`~llm_trainer.losses.chunked_token_logps` through ``backend.output_projection``): only the scored positions
are projected onto the vocabulary, chunk by chunk, never a ``[B, S, V]`` float32 logits tensor.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from ..data.collate import IGNORE_INDEX, pad_with_mask
from ..data.formats import DataError
from ..generation import eval_mode
from ..losses import chunked_token_logps
from ..trainers.collective import even_batches, rank_shard

__all__ = ["Evaluator", "EvalTask", "load_items", "language_model", "loglikelihoods", "scatter_sum"]


@runtime_checkable
class Evaluator(Protocol):
    """``evaluator(trainer) -> {metric: value}``; collective (every rank calls it, see the module docstring)."""

    def __call__(self, trainer: Any) -> dict[str, float]: ...


def load_items(data: str | os.PathLike | Sequence[dict], required: dict[str, Callable[[Any], str | None]],
               task: str) -> list[dict]:
    """Records of a task: a jsonl file (one object per line, blank lines ignored) or a list of dicts. ``required``
    maps each field to a check returning why a value is bad (None when fine). Raises :class:`DataError` naming the
    file, line and field of the first bad record."""
    if isinstance(data, (str, os.PathLike)):
        path = str(data)
        if not os.path.isfile(path):
            raise DataError(f"{task}: task file not found", file=path)
        rows: list[tuple[int | None, Any]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{task}: malformed JSON ({e.msg} at column {e.colno})", file=path,
                                    line=lineno) from None
    else:
        path, rows = None, [(None, r) for r in data]
    items = []
    for i, (line, obj) in enumerate(rows):
        where = dict(file=path, line=line) if path else dict(record=i)
        if not isinstance(obj, dict):
            raise DataError(f"{task}: expected a JSON object, got {type(obj).__name__}", **where)
        for name, check in required.items():
            if name not in obj:
                raise DataError(f"{task}: missing field", field=name, **where)
            why = check(obj[name])
            if why:
                raise DataError(f"{task}: {why}", field=name, **where)
        items.append(obj)
    if not items:
        raise DataError(f"{task}: no records", file=path)
    return items


def language_model(trainer: Any, module: torch.nn.Module | None = None) -> torch.nn.Module:
    """The language model the trainer trains (PPO: its policy), inside ``module`` (default: the unwrapped model)."""
    plain = module if module is not None else trainer.backend.unwrap(trainer.model)
    return trainer.policy_for_generation(plain)


def scatter_sum(backend: Any, n: int, parts: dict[int, Sequence[float]], width: int) -> torch.Tensor:
    """``[n, width]`` float64: row ``i`` = ``parts[i]`` from whichever rank computed it, summed over ranks."""
    out = torch.zeros(n, width, dtype=torch.float64)
    for i, values in parts.items():
        out[i] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    backend.all_reduce(out)
    return out


@torch.no_grad()
def loglikelihoods(trainer: Any, requests: Sequence[tuple[Sequence[int], int]], batch_size: int,
                   max_length: int | None = None, greedy: bool = False):
    """``[N]`` float64 on every rank: for each request ``(ids, n)`` the summed log-probability of its last ``n``
    tokens given the tokens before them. The model reads every token but the last (which is only predicted); when
    that is more than ``max_length`` tokens the first ones are dropped (the scored ones are kept while they fit), as
    lm-evaluation-harness does. ``greedy=True``: also ``[N]`` bool, whether every scored token is the argmax of its
    position (the harness's ``is_greedy``; projects the scored positions at once). Collective: every rank passes the
    same requests."""
    backend = trainer.backend
    seqs, scored = [], []
    for ids, n in requests:
        ids = list(ids)
        if not 1 <= n < len(ids):
            raise ValueError(f"a log-likelihood request scores {n} of {len(ids)} tokens (needs 1 <= n < length)")
        if max_length is not None and len(ids) - 1 > max_length:
            ids, n = ids[len(ids) - 1 - max_length:], min(n, max_length)
        seqs.append(ids)
        scored.append(n)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))      # similar lengths share a batch
    mine = [order[j] for j in rank_shard(len(order), backend)]
    pad = trainer.pad_token_id()
    results: dict[int, list[float]] = {}
    lm = language_model(trainer)
    with eval_mode(trainer.model):
        for idx, padding in even_batches(backend, mine, batch_size, order[0] if order else 0):
            ids, mask = pad_with_mask([seqs[i][:-1] for i in idx], pad)
            targets = torch.full_like(ids, IGNORE_INDEX)      # targets[t]: the token position t predicts, if scored
            for row, i in enumerate(idx):
                L = len(seqs[i]) - 1
                targets[row, L - scored[i]:L] = torch.tensor(seqs[i][L + 1 - scored[i]:])
            ids, mask, targets = (t.to(trainer.device) for t in (ids, mask, targets))
            with backend.autocast():
                out = lm(input_ids=ids, attention_mask=mask, return_hidden_states=True)
                with backend.output_projection(lm) as project:
                    lp, hit = chunked_token_logps(out.hidden_states, project, targets, shift=False)
                    if greedy:
                        wrong = torch.zeros_like(hit)
                        wrong[hit] = project(out.hidden_states[hit]).argmax(-1) != targets[hit]
            if not padding:
                for row, i in enumerate(idx):
                    results[i] = [float(lp[row].double().sum())] + ([float(not wrong[row].any())] if greedy else [])
    table = scatter_sum(backend, len(seqs), results, 2 if greedy else 1)
    return (table[:, 0], table[:, 1] == 1) if greedy else table[:, 0]


class EvalTask:
    """A named evaluation over local records, logged as ``eval/<name>/<metric>``.

    ``limit``: the first ``limit`` records only. ``every``: run at evaluations whose step is a multiple of ``every``
    (and at the last step; None: at every evaluation). ``batch_size``: sequences per forward pass (None → the
    trainer's ``batch_size``). Subclasses implement :meth:`evaluate`."""

    fields: dict[str, Callable[[Any], str | None]] = {}

    def __init__(self, name: str, data: str | os.PathLike | Sequence[dict], *, limit: int | None = None,
                 every: int | None = None, batch_size: int | None = None):
        if not name or "/" in name:
            raise ValueError(f"task name {name!r} must be non-empty and without '/'")
        for field, value in (("limit", limit), ("every", every), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{type(self).__name__}.{field} must be a positive int or None, got {value!r}")
        self.name, self.every, self.batch_size = name, every, batch_size
        self.source = str(data) if isinstance(data, (str, os.PathLike)) else None
        self.items = load_items(data, self.fields, f"{type(self).__name__} {name!r}")[:limit]

    def due(self, trainer: Any) -> bool:
        step, total = trainer.global_step, getattr(trainer, "total_steps", None)
        return self.every is None or step % self.every == 0 or (total is not None and step >= total)

    def batch(self, trainer: Any) -> int:
        return self.batch_size or trainer.config.batch_size

    def tokenizer(self, trainer: Any):
        if trainer.tokenizer is None:
            raise ValueError(f"{type(self).__name__} {self.name!r} needs a tokenizer (TrainConfig.tokenizer)")
        return trainer.tokenizer

    def __call__(self, trainer: Any) -> dict[str, float]:
        if not self.due(trainer):
            return {}
        return {f"eval/{self.name}/{k}": float(v) for k, v in self.evaluate(trainer).items()}

    def evaluate(self, trainer: Any) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, items={len(self.items)}, source={self.source!r})"


def is_text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "expected a non-empty string"


def is_prompt(v: Any) -> str | None:
    """A string or a list of chat messages (``{"role", "content"}``)."""
    if isinstance(v, str):
        return is_text(v)
    if isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in v):
        return None
    return "expected a non-empty string or a list of {'role', 'content'} messages"
