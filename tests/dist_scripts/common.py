"""Shared pieces of the distributed test scripts: a tiny deterministic LM, a data schedule with uneven token
counts per rank and micro-batch, the training loop as the trainer will drive the Backend, and a plain
single-process reference on the same global batch."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB, HIDDEN, INTER, SEQ, MICRO = 64, 32, 64, 8, 2


class TinyLM(torch.nn.Module):
    """Embedding -> 2-layer MLP with residual -> norm -> untied head. Tokens see only themselves (bigram LM),
    which is enough for gradients, generation and every parameter kind (weights, biases, norm)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, inter: int = INTER) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.up = torch.nn.Linear(hidden, inter)
        self.down = torch.nn.Linear(inter, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(self.norm(h))


def init_state(seed: int = 1234) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in TinyLM().state_dict().items()}


def micro_batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [MICRO, SEQ] and labels with -100 padding; the number of valid tokens differs per rank,
    micro-batch and step (1..SEQ per row), so per-rank means would weigh tokens wrongly."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank + 7 * world)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    for row in range(MICRO):
        n_valid = 1 + (3 * rank + 5 * micro + 2 * row + step) % SEQ
        labels[row, n_valid:] = -100
    return ids[:, :-1].contiguous(), labels


def loss_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(ids).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


def make_optimizer(name: str, params, lr: float | None = None):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr or 1e-2, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.5, momentum=0.9, foreach=False)
    if name == "lion":
        from llm_trainer.optim import Lion
        return Lion(params, lr=lr or 1e-3, weight_decay=0.1)
    raise ValueError(name)


def reference_run(world: int, steps: int, grad_accum: int, optim: str, clip: float | None,
                  start_state: dict | None = None, first_step: int = 0):
    """Single process, fp32, the whole global batch: loss = sum of token CE over all ranks' micro-batches /
    total tokens. Returns (state_dict, grad_norms)."""
    model = TinyLM()
    model.load_state_dict(start_state or init_state())
    opt = make_optimizer(optim, model.parameters())
    norms = []
    for step in range(first_step, first_step + steps):
        batches = [micro_batch(step, m, r, world) for m in range(grad_accum) for r in range(world)]
        total = sum(int((lab != -100).sum()) for _, lab in batches)
        opt.zero_grad(set_to_none=True)
        for ids, lab in batches:
            ls, _ = loss_sum(model, ids, lab)
            (ls / total).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))))
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def train_steps(backend, model, steps: int, grad_accum: int, clip: float | None, first_step: int = 0,
                on_step=None, *, batch_fn=micro_batch, loss_fn=loss_sum, losses: list | None = None) -> list:
    """The loop exactly as the trainer drives a Backend. ``batch_fn(step, micro, rank, world)`` -> (ids, labels)
    and ``loss_fn(model, ids, labels)`` -> (token loss sum, tokens) default to the TinyLM ones; ``losses``
    collects each step's global mean loss."""
    norms = []
    for step in range(first_step, first_step + steps):
        batches = [batch_fn(step, m, backend.rank, backend.world_size) for m in range(grad_accum)]
        local = torch.tensor(float(sum(int((lab != -100).sum()) for _, lab in batches)))
        total = backend.all_reduce(local, "sum").item()
        window = torch.zeros(())
        for m, (ids, lab) in enumerate(batches):
            ctx = backend.no_sync() if m < grad_accum - 1 else contextlib.nullcontext()
            with ctx, backend.autocast():
                ls, _ = loss_fn(model, ids.to(backend.device), lab.to(backend.device))
                backend.backward(ls / total)
            window += float(ls.detach())
        n1 = backend.clip(clip)
        n2 = backend.step()
        backend.zero_grad()
        norms.append(n2 if n2 is not None else n1)
        if losses is not None:
            losses.append(backend.all_reduce(window, "sum").item() / total)
        if on_step is not None:
            on_step(step)
    return norms


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def rel_update_error(final: dict, ref: dict, init: dict) -> float:
    """||(final - init) - (ref - init)|| / ||ref - init|| over all parameters: the error relative to what
    training changed. Scale-free, unlike max |diff|, so it is the right yardstick for bf16."""
    num = sum(float(((final[k].float() - ref[k].float()) ** 2).sum()) for k in ref)
    den = sum(float(((ref[k].float() - init[k].float()) ** 2).sum()) for k in ref)
    return (num / den) ** 0.5


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].float().argmax()))
    return ids[len(prompt):]
