"""Language-model losses: shifted cross-entropy, chunked cross-entropy, critical-token weights, distillation.

Conventions (see docs/architecture.md, "Losses"):

* ``labels`` are aligned with ``input_ids`` (``labels[:, t]`` is the token at position ``t``); the functions shift
  inside (``shift=True``) so that logits/hidden states at position ``t`` are scored against ``labels[:, t + 1]``.
  Pass ``shift=False`` when the targets are already aligned with the logits. For packed sequences the collate
  must put ``ignore_index`` on the first token of every document (otherwise the last token of one document is
  trained to predict the first token of the next).
* Token losses return ``(loss_sum, n_tokens)``: a float32 0-dim sum and an int64 0-dim count of the tokens that
  contributed. The training loop divides by the count summed over the whole accumulation window (and ranks),
  so ``batch 8 x accum 1`` and ``batch 2 x accum 4`` give the same update.
* Everything is computed in float32 from whatever dtype the logits/hidden states have.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "shift_labels",
    "project",
    "lm_loss",
    "critical_token_weights",
    "chunked_lm_loss",
    "chunked_lm_kd_loss",
    "kd_divergence",
    "kd_loss",
    "token_logps",
    "chunked_token_logps",
    "entropy_from_logits",
]

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _count(n: int | Tensor, device) -> Tensor:
    if isinstance(n, Tensor):
        return n.to(device=device, dtype=torch.long)
    return torch.tensor(n, dtype=torch.long, device=device)


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets aligned with the logits: ``out[:, t] = labels[:, t + 1]``, last column ``ignore_index``.

    Works for any tensor of per-token values (e.g. token weights, with ``ignore_index=0``). Shape is kept, so
    logits ``[B, S, V]`` never have to be sliced (and copied)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def critical_token_weights(labels: Tensor, critical_tokens: Sequence[int] | Tensor, weight: float) -> Tensor:
    """Per-token loss weights: ``weight`` where ``labels`` is one of ``critical_tokens``, else 1 (float32).

    Same alignment as ``labels`` (pass both to :func:`lm_loss`, which shifts them together). Normalisation
    convention: the weighted loss is ``sum_t w_t * CE_t`` and it is normalised by the **token count**, not by
    ``sum_t w_t``. So a batch without critical tokens gives exactly the plain CE, and a critical token counts
    ``weight`` times as much as an ordinary one in absolute terms (with weight-sum normalisation, up-weighting
    critical tokens would silently down-weight every other token, and the normaliser would differ between
    micro-batches of one accumulation window). The weight-sum variant is ``loss_sum / (w * valid).sum()``."""
    crit = torch.as_tensor(critical_tokens, dtype=labels.dtype, device=labels.device).reshape(-1)
    is_crit = torch.isin(labels, crit)
    out = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    return out.masked_fill(is_crit, float(weight))


def lm_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    token_weights: Tensor | None = None,
    shift: bool = True,
) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy (Shannon / standard MLE LM objective): ``sum_t w_t * -log p(y_{t+1} | x_{<=t})``.

    ``logits [B, S, V]``, ``labels [B, S]`` aligned with the inputs (shifted here unless ``shift=False``),
    ``token_weights [B, S]`` aligned like ``labels`` (e.g. :func:`critical_token_weights`).
    Returns ``(loss_sum, n_tokens)`` with ``n_tokens`` = number of targets ``!= ignore_index``."""
    if shift:
        labels = shift_labels(labels, ignore_index)
        if token_weights is not None:
            token_weights = shift_labels(token_weights, 0)
    v = logits.size(-1)
    ce = F.cross_entropy(logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    if token_weights is not None:
        ce = ce * token_weights.reshape(-1).to(ce.dtype)
    n = (labels != ignore_index).sum()
    return ce.sum(), n


# ----------------------------------------------------------------------------------------------------------------
# Distillation divergences
# ----------------------------------------------------------------------------------------------------------------


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities, with 0 * log 0 = 0 (``-inf`` logits allowed in p)."""
    terms = torch.where(logp > float("-inf"), logp.exp() * (logp - logq), torch.zeros_like(logp))
    return terms.sum(-1)


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position distillation divergence ``[...]`` between softened distributions (float32).

    ``p_S = softmax(z_S / tau)``, ``p_T = softmax(z_T / tau)``;
    * ``forward_kl``: ``KL(p_T || p_S)`` (Hinton et al. 2015; the usual "soft-label CE" up to the teacher entropy),
    * ``reverse_kl``: ``KL(p_S || p_T)`` (mode seeking, MiniLLM Gu et al. 2024),
    * ``jsd``: generalised JSD of Agarwal et al. 2024 (GKD, eq. 1 / §3):
      ``beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``, ``M = beta * p_T + (1 - beta) * p_S``; as in GKD/trl the
      endpoints are the scaled limits: ``beta = 0`` -> forward KL, ``beta = 1`` -> reverse KL.
    Temperature convention: the result is multiplied by ``tau**2`` (Hinton et al. 2015) so gradient magnitudes do
    not shrink as ``tau`` grows; at ``tau = 1`` nothing changes. The teacher side is not differentiated."""
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"kd beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"kd temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        d = _kl_rows(t, s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        d = _kl_rows(s, t)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        d = beta * _kl_rows(t, m) + (1.0 - beta) * _kl_rows(s, m)
    return d * (temperature**2)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    shift: bool = True,
) -> tuple[Tensor, Tensor]:
    """Masked distillation loss ``(kd_sum, n_tokens)`` over positions whose (shifted) label is not ignored.

    Divergence per position as in :func:`kd_divergence` (forward/reverse KL, GKD generalised JSD eq. 1, tau**2
    scaled). ``student_logits``/``teacher_logits`` ``[B, S, V]`` (same vocabulary); ``labels`` aligned with the
    inputs like :func:`lm_loss` (``None``: every position counts). Combine with CE as
    ``(1 - kd_coef) * ce_sum + kd_coef * kd_sum`` over the same token count."""
    d = kd_divergence(student_logits, teacher_logits, kind, beta, temperature)
    if labels is None:
        return d.sum(), _count(d.numel(), d.device)
    if shift:
        labels = shift_labels(labels, ignore_index)
    valid = labels != ignore_index
    return torch.where(valid, d, torch.zeros_like(d)).sum(), valid.sum()


# ----------------------------------------------------------------------------------------------------------------
# Chunked losses: never materialise [B*S, V] fp32 logits
# ----------------------------------------------------------------------------------------------------------------


def _select_valid(hidden: Tensor, labels: Tensor, token_weights, ignore_index: int, shift: bool):
    if shift:
        labels = shift_labels(labels, ignore_index)
        if token_weights is not None:
            token_weights = shift_labels(token_weights, 0)
    flat = labels.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)  # one host sync: the number of valid tokens
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, idx)
    y = flat.index_select(0, idx)
    w = None if token_weights is None else token_weights.reshape(-1).index_select(0, idx).float()
    return h, y, w, idx


def _zero_with_graph(hidden: Tensor, head, bias: Tensor | None = None) -> Tensor:
    """0.0 that depends on the hidden states and the head (zero gradients everywhere, graph kept for DDP/ZeRO
    hooks); a projection callable is applied to an empty chunk, so every rank's loss still touches the head."""
    out = hidden.sum().float() * 0.0
    if callable(head) and not isinstance(head, Tensor):
        return out + head(hidden.reshape(-1, hidden.size(-1))[:0]).float().sum()
    for t in (head, bias):
        if t is not None:
            out = out + t.sum().float() * 0.0
    return out


def _maybe_checkpoint(fn, *args):
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def project(h: Tensor, head, bias: Tensor | None = None) -> Tensor:
    """Logits of hidden states: ``head`` is the output projection weight ``[V, H]`` (with optional ``bias``) or a
    callable ``h -> logits`` (e.g. the one `Backend.output_projection` yields, which gathers a partitioned head)."""
    if callable(head) and not isinstance(head, Tensor):
        return head(h)
    return F.linear(h, head, bias)


def _ce_chunk(h, weight, bias, y, w):
    logits = project(h, weight, bias).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    if w is not None:
        ce = ce * w
    return ce.sum()


def chunked_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 4096,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    token_weights: Tensor | None = None,
    shift: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``hidden @ lm_head_weight.T (+ bias)`` without ever holding full-batch logits.

    Same value and gradient as ``lm_loss(F.linear(hidden, W, b), labels, ...)``; ``lm_head_weight`` may also be a
    projection callable (see :func:`project`). Only the valid (non-ignored)
    positions are projected ("active token filtering"); they are processed ``chunk_size`` rows at a time, each
    chunk under ``torch.utils.checkpoint`` so in the backward pass too only one ``[chunk, V]`` float32 logits
    block (plus its gradient) is alive. The matmul runs in the input dtype (bf16 on GPU) and the chunk's
    logits are upcast to float32 for the softmax. With zero valid tokens returns ``(0, 0)`` where the 0 still
    depends on ``hidden``, ``lm_head_weight`` and ``bias`` (zero gradients, the graph is kept).
    ``hidden [B, S, H]`` (final-normed), ``lm_head_weight [V, H]``, ``labels [B, S]`` aligned with the inputs.
    Returns ``(loss_sum, n_tokens)``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    h, y, w, idx = _select_valid(hidden, labels, token_weights, ignore_index, shift)
    n = idx.numel()
    if n == 0:
        return _zero_with_graph(hidden, lm_head_weight, bias), _count(0, hidden.device)
    total = None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        wc = None if w is None else w[start:end]
        part = _maybe_checkpoint(_ce_chunk, h[start:end], lm_head_weight, bias, y[start:end], wc)
        total = part if total is None else total + part
    return total, _count(n, hidden.device)


def _ce_kd_chunk(h, weight, bias, y, w, t_logits, t_h, t_weight, t_bias, kind, beta, temperature):
    logits = project(h, weight, bias).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    if w is not None:
        ce = ce * w
    with torch.no_grad():
        if t_logits is None:
            t_logits = project(t_h, t_weight, t_bias)
    kd = kd_divergence(logits, t_logits, kind, beta, temperature)
    return torch.stack([ce.sum(), kd.sum()])


def chunked_lm_kd_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_lm_head_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    token_weights: Tensor | None = None,
    shift: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked CE and distillation in one pass: ``(ce_sum, kd_sum, n_tokens)``.

    CE as :func:`chunked_lm_loss`; the KD term is :func:`kd_divergence` (forward/reverse KL or GKD generalised
    JSD, Agarwal et al. 2024 eq. 1, tau**2-scaled) summed over the same valid positions (``token_weights`` apply
    to CE only). The teacher is given either as full ``teacher_logits [B, S, V]`` (gathered per chunk) or, to
    keep the teacher side chunked too, as ``teacher_hidden [B, S, Ht]`` + ``teacher_lm_head_weight [V, Ht]``
    (teacher logits are computed per chunk under ``no_grad`` and recomputed in backward instead of stored)."""
    if (teacher_logits is None) == (teacher_hidden is None or teacher_lm_head_weight is None):
        raise ValueError("give exactly one of teacher_logits or (teacher_hidden, teacher_lm_head_weight)")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    kd_divergence(torch.zeros(1, 2), torch.zeros(1, 2), kind, beta, temperature)  # validate args early
    h, y, w, idx = _select_valid(hidden, labels, token_weights, ignore_index, shift)
    n = idx.numel()
    if n == 0:
        z = _zero_with_graph(hidden, lm_head_weight, bias)
        return z, z.clone(), _count(0, hidden.device)
    if teacher_logits is not None:
        t_all = teacher_logits.detach().reshape(-1, teacher_logits.size(-1))
        t_h_all = None
    else:
        t_all = None
        t_h_all = teacher_hidden.detach().reshape(-1, teacher_hidden.size(-1))
    t_weight = teacher_lm_head_weight
    if isinstance(t_weight, Tensor):
        t_weight = t_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    total = None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        ic = idx[start:end]
        tl = None if t_all is None else t_all.index_select(0, ic)
        th = None if t_h_all is None else t_h_all.index_select(0, ic)
        wc = None if w is None else w[start:end]
        part = _maybe_checkpoint(
            _ce_kd_chunk, h[start:end], lm_head_weight, bias, y[start:end], wc, tl, th, t_weight, t_bias,
            kind, beta, temperature,
        )
        total = part if total is None else total + part
    return total[0], total[1], _count(n, hidden.device)


# ----------------------------------------------------------------------------------------------------------------
# Per-token log-probabilities and entropy (DPO, RL)
# ----------------------------------------------------------------------------------------------------------------


def _logps_rows(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def token_logps(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    shift: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-token ``log softmax(logits / temperature)[label]`` -> ``(logps [B, S], mask [B, S] bool)``.

    ``logps`` is 0 where the (shifted) label is ``ignore_index``. Computed as ``z_y - logsumexp(z)`` in float32
    (no second ``[B, S, V]`` log-softmax tensor). ``temperature`` must equal the sampling temperature in RL so
    the importance ratio starts at exactly 1."""
    if shift:
        labels = shift_labels(labels, ignore_index)
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    lp = _logps_rows(logits, safe, temperature)
    return lp.masked_fill(~mask, 0.0), mask


def _entropy_rows(z: Tensor, lse: Tensor) -> Tensor:
    """-sum p log p per row from float32 logits ``z`` and their logsumexp; ``-inf`` logits contribute 0."""
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _logps_chunk(h, weight, bias, y, temperature, with_entropy):
    z = project(h, weight, bias).float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return lp
    return torch.stack([lp, _entropy_rows(z, lse)])


def chunked_token_logps(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 4096,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """:func:`token_logps` from hidden states, ``chunk_size`` rows at a time under checkpoint (no full logits).
    The one log-prob routine of DPO (sequence log-probs) and RL (old, reference and current policy log-probs);
    ``lm_head_weight`` may be a projection callable (:func:`project`).

    Returns ``(logps [B, S], mask)`` or, with ``return_entropy=True``, ``(logps, entropy [B, S], mask)`` where
    entropy is that of ``softmax(logits / temperature)`` (0 at masked positions; differentiable, for an entropy
    bonus; detach it for logging). Only valid rows are projected."""
    if shift:
        labels = shift_labels(labels, ignore_index)
    mask = labels != ignore_index
    flat_shape = labels.shape
    h, y, _, idx = _select_valid(hidden, labels, None, ignore_index, shift=False)
    out_lp = torch.zeros(flat_shape.numel(), dtype=torch.float32, device=hidden.device)
    out_ent = torch.zeros_like(out_lp) if return_entropy else None
    n = idx.numel()
    if n == 0:
        z = _zero_with_graph(hidden, lm_head_weight, bias)
        out_lp = out_lp + z
        if return_entropy:
            return out_lp.view(flat_shape), out_ent.view(flat_shape), mask
        return out_lp.view(flat_shape), mask
    parts = []
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        parts.append(_maybe_checkpoint(_logps_chunk, h[start:end], lm_head_weight, bias, y[start:end],
                                       temperature, return_entropy))
    vals = torch.cat(parts, dim=-1)
    if return_entropy:
        out_lp = out_lp.index_put((idx,), vals[0])
        out_ent = out_ent.index_put((idx,), vals[1])
        return out_lp.view(flat_shape), out_ent.view(flat_shape), mask
    out_lp = out_lp.index_put((idx,), vals)
    return out_lp.view(flat_shape), mask


def entropy_from_logits(logits: Tensor, mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Per-position entropy ``H = logsumexp(z) - sum softmax(z) * z`` of ``softmax(logits)`` (float32, shape
    ``logits.shape[:-1]``), 0 where ``mask`` is false. ``chunk_size`` bounds the float32 temporaries (rows per
    step). Aggregate with ``masked_mean``. Not differentiated through (a metric); detach is applied."""
    z = logits.detach()
    flat = z.reshape(-1, z.size(-1))
    step = flat.size(0) if not chunk_size else chunk_size
    outs = []
    for s in range(0, flat.size(0), max(step, 1)):
        c = flat[s:s + step].float()
        outs.append(_entropy_rows(c, torch.logsumexp(c, -1)))
    ent = torch.cat(outs) if outs else flat.new_zeros(0, dtype=torch.float32)
    ent = ent.view(z.shape[:-1])
    if mask is not None:
        ent = ent.masked_fill(~mask.bool(), 0.0)
    return ent
