"""Exact rollout log-probs: batch-invariant numerics under which the log-probs recorded while decoding equal, bit for
bit, those the trainer computes with a full forward pass — so the old-policy forward pass can be skipped
(``old_logprobs="exact"``).

Why incremental decoding and a full forward pass disagree in the last bits (measured on CPU fp32, ~1e-6): a matrix
product's row depends on how many rows the kernel sees (MKL takes other code paths below a few rows, and splits rows
over threads), attention reduces over keys whose positions depend on the left padding of the batch, and the
log-softmax is written differently in the sampler and in the loss. Under :func:`exact_numerics`, for the model's
forward passes (decoding and training alike):

* every ``nn.Linear`` and the LM-head projection see at least :data:`ROWS` rows (padded with zeros), so each row
  goes through the same kernel whatever the batch;
* attention (:func:`invariant_attention`, through the ``Attention.attention_fn`` hook) shifts each row's keys so
  that its first real key is at index 0, pads keys to a multiple of :data:`KEYS` and queries to at least ``ROWS``
  rows, and uses two batched matrix products and a softmax over that canonical layout — a query's result no
  longer depends on its batch, its row's padding, or how many queries are computed with it;
* :func:`exact_generate` decodes with the KV cache through the model's own forward and takes each sampled token's
  log-prob from the same chunked log-prob routine the losses use (``chunked_token_logps``).

These are properties of the kernels, not of the maths: they were measured on this library's CPU build (MKL, 1 to 8
threads; ``tests/test_agentic_exact.py`` checks them with 1 and 2) and are re-checked at run time, since the trainer
logs the gap between the recorded log-probs and those of its first update (``logprob_gap/max``: 0 when exact). On
other hardware (GPU kernels, bf16) the gap is measured and logged the same way.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..generation import GenerateConfig
from ..losses import chunked_token_logps
from ..model.cache import KVCache

__all__ = ["exact_numerics", "invariant_attention", "padded_rows", "exact_generate", "ROWS", "KEYS"]

ROWS = 16   # matrix products see at least this many rows (on the CPUs measured, 11 rows at most take other paths)
KEYS = 64   # attention reduces over a multiple of this many keys


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _min_rows(n: int) -> int:
    """Rows a matrix product is given for ``n`` real rows: at least :data:`ROWS` (MKL takes other code paths for
    up to 3 rows with 1 or 4 threads and up to 11 rows with 2 or 8 threads on this library's development CPU; from
    then on a row's result no longer depends on the number of rows — see the module docstring)."""
    return max(n, ROWS)


def padded_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (a row-wise map such as a linear layer) of ``x [..., K]``, applied to the rows padded with zeros to at
    least :data:`ROWS` rows."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    pad = _min_rows(n) - n
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    y = fn(rows)[:n]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return padded_rows(lambda r: F.linear(r, module.weight, module.bias), x)


def invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (same arguments; no dropout) computed in a canonical layout (see the module
    docstring): ``q [B, H, Sq, D]``, ``k``/``v`` ``[B, KV, Sk, D]`` (the ``H / KV`` query heads of a key head are
    stacked into one matrix product), ``attn_mask`` boolean, True = attend."""
    if dropout_p:
        raise ValueError("invariant attention has no dropout (RL policies run without it)")
    B, H, Sq, D = q.shape
    KV, Sk = k.shape[1], k.shape[2]
    rep = H // KV
    if attn_mask is None:
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
        if is_causal:
            mask = mask.tril(Sk - Sq)
        mask = mask.expand(B, 1, Sq, Sk)
    else:
        mask = attn_mask.expand(B, 1, Sq, Sk)
    # each row's keys shifted so that its first real key (the first one its last query attends) is at index 0
    lead = mask[:, 0, -1].int().argmax(-1)                                       # [B]
    Kp = _round_up(Sk, KEYS)
    idx = torch.arange(Kp, device=q.device)[None] + lead[:, None]                # [B, Kp]
    valid = idx < Sk
    idx = idx.clamp(max=Sk - 1)
    if bool((lead == 0).all()):             # no row is left-padded: only the keys' zero padding
        kc, vc = (F.pad(t, (0, 0, 0, Kp - Sk)) for t in (k, v))
        mc = F.pad(mask, (0, Kp - Sk), value=False)
    else:
        gather = lambda t: t.gather(2, idx[:, None, :, None].expand(B, KV, Kp, D))  # noqa: E731
        kc, vc = gather(k), torch.where(valid[:, None, :, None], gather(v), torch.zeros((), dtype=v.dtype))
        mc = mask.gather(3, idx[:, None, None, :].expand(B, 1, Sq, Kp)) & valid[:, None, None, :]
    M = rep * Sq                                                                 # query rows per key head
    qg = q.reshape(B, KV, M, D)
    if _min_rows(M) > M:
        qg = torch.cat([qg, qg.new_zeros(B, KV, _min_rows(M) - M, D)], 2)
    scores = torch.matmul(qg, kc.transpose(-1, -2))[:, :, :M].reshape(B, H, Sq, Kp)
    scores = scores * (scale if scale is not None else 1.0 / math.sqrt(D))
    scores = scores.masked_fill(~mc, float("-inf"))
    probs = torch.where(mc.any(-1, keepdim=True), torch.softmax(scores, dim=-1), torch.zeros((), dtype=q.dtype))
    pg = probs.reshape(B, KV, M, Kp)
    if _min_rows(M) > M:
        pg = torch.cat([pg, pg.new_zeros(B, KV, _min_rows(M) - M, Kp)], 2)
    return torch.matmul(pg, vc)[:, :, :M].reshape(B, H, Sq, D)


@contextlib.contextmanager
def exact_numerics(*models: nn.Module) -> Iterator[None]:
    """Inside, ``models`` run with batch-invariant linears and attention (see the module docstring); their previous
    forwards are restored on exit."""
    from ..model.layers import Attention
    patched: list[nn.Module] = []
    attended: list[nn.Module] = []
    try:
        for model in models:
            for m in model.modules():
                if isinstance(m, Attention) and getattr(m, "attention_fn", None) is None:
                    m.attention_fn = invariant_attention
                    attended.append(m)
                elif isinstance(m, nn.Linear) and "forward" not in m.__dict__:
                    m.forward = functools.partial(_linear_forward, m)
                    patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for m in attended:
            m.attention_fn = None


def exact_project(project: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An LM-head projection whose rows are padded like the linears' (for a tied head, which is no module)."""
    return functools.partial(padded_rows, project)


def check_config(config: GenerateConfig) -> None:
    if config.top_k is not None or config.top_p < 1.0 or config.repetition_penalty != 1.0 or config.suppress_tokens:
        raise ValueError("old_logprobs='exact' samples from softmax(logits / temperature) itself; top_k, top_p, "
                         "repetition_penalty and suppress_tokens change that distribution and are not supported")


@torch.no_grad()
def exact_generate(model: nn.Module, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                   stop_ids: Sequence[int], pad_token_id: int, project: Callable[[torch.Tensor], torch.Tensor],
                   generator: torch.Generator | None = None,
                   group_size: int = 1) -> tuple[list[list[int]], list[torch.Tensor], list[bool]]:
    """Sample ``group_size`` completions per prompt (prompt-major) under :func:`exact_numerics` (the caller enters
    it): ``(completions, log-probs, finished)``. Prompts are left-padded and prefilled together, once each (the cache
    rows are then repeated for the group: a row's result does not depend on its batch); each step feeds the new
    tokens through the model's forward with the KV cache; the log-prob of a sampled token is ``chunked_token_logps``
    of its hidden state at the sampling temperature (greedy: temperature 1)."""
    check_config(config)
    device = next(model.parameters()).device
    temperature = 1.0 if config.greedy else float(config.temperature)
    U, P, T = len(prompts), max(len(p) for p in prompts), config.max_new_tokens
    ids = torch.full((U, P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((U, P + T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):P] = 1
    ids, mask = ids.to(device), mask.to(device)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    cache = KVCache(max_length=P + T)
    out = model(input_ids=ids, attention_mask=mask[:, :P], past_key_values=cache, use_cache=True,
                return_hidden_states=True)
    h = out.hidden_states[:, -1:]
    if group_size > 1:
        cache.repeat_interleave(group_size)
        h, mask = h.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    N = U * group_size
    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((N, T), dtype=torch.float32, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    t = 0
    for t in range(T):
        z = project(h[:, 0]).float()
        if config.greedy:
            tok = z.argmax(-1)
        else:                    # Gumbel-max in its exponential form, as llm_trainer.generation samples
            p = torch.softmax(z / temperature, dim=-1)
            tok = (p / torch.empty_like(p).exponential_(1.0, generator=generator)).argmax(-1)
        tok = tok.masked_fill(done, pad_token_id)
        # the losses' routine, handed the logits just computed (the projection of the same rows)
        lp = chunked_token_logps(h, lambda _: z, tok[:, None], shift=False, temperature=temperature)[0][:, 0]
        tokens[:, t], logps[:, t] = tok, lp.masked_fill(done, 0.0)
        done = done | torch.isin(tok, stops)
        mask[:, P + t] = 1
        if bool(done.all()) or t == T - 1:
            break
        out = model(input_ids=tok[:, None], attention_mask=mask[:, :P + t + 1], past_key_values=cache,
                    use_cache=True, return_hidden_states=True)
        h = out.hidden_states[:, -1:]
    completions, lps, finished = [], [], []
    for i in range(N):
        row = tokens[i, :t + 1].tolist()
        end = next((j + 1 for j, x in enumerate(row) if x in set(stop_ids)), None)
        n = end if end is not None else len(row)
        completions.append(row[:n])
        lps.append(logps[i, :n].cpu().clone())
        finished.append(end is not None)
    return completions, lps, finished
