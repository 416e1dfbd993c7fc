"""Policy and value losses: PPO's clipped surrogate and clipped value loss, and the GRPO family.

The contract of every loss here (and of the whole package, see docs/architecture.md): it returns the **sum** of
the loss over its *units* for one micro-batch, and the units can be counted from the micro-batch's masks before
the forward pass (:func:`grpo_units`). The training loop adds the units of the whole accumulation window over all
ranks and divides once, so no loss normalises and then un-normalises.

Masked (padded) slots never influence the value or the gradient: inputs are sanitised with
:func:`~.rl.masked_fill_zero` before any non-linearity (a NaN log-prob in a padded slot gives a finite loss and a
finite gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rl import KL_ESTIMATORS, kl_estimate, masked_fill_zero, masked_mean, masked_sum

__all__ = ["policy_ratio", "ppo_policy_loss", "value_loss", "huber", "grpo_loss", "grpo_units", "GRPO_LOSS_TYPES",
           "GRPO_AGGREGATIONS", "KL_ESTIMATORS"]

# loss_type -> (objective, aggregation)
GRPO_LOSS_TYPES = {"grpo": ("clip", "grpo"), "bnpo": ("clip", "bnpo"), "dr_grpo": ("clip", "dr_grpo"),
                   "dapo": ("clip", "dapo"), "cispo": ("cispo", "dapo")}
GRPO_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


def policy_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """Importance ratio ``[B, T]``.

    * ``token``: ``exp(logp - old_logp)`` (PPO / GRPO).
    * ``sequence``: GSPO (Zheng et al. 2025, sequence ratio ``s_i = exp(mean_t(logp - old))`` used in the
      GSPO-token form ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``): every token's value is ``s_i`` and its
      gradient is ``s_i * grad log pi(y_t)``, so with per-sequence-mean aggregation the gradient equals that
      of the sequence-level objective."""
    old = old_logp.detach()
    if level == "token":
        return torch.exp(logp - old)
    if level == "sequence":
        seq = masked_mean(logp.detach() - old, mask, dim=-1)  # [B]
        return torch.exp(seq).unsqueeze(-1) * torch.exp(logp - logp.detach())
    raise ValueError(f"importance sampling level must be 'token' or 'sequence', got {level!r}")


def _broadcast_adv(advantages: Tensor, like: Tensor, mask: Tensor) -> Tensor:
    a = advantages.detach().float()
    return a.unsqueeze(-1).expand_as(like) if a.dim() == 1 else masked_fill_zero(a, mask)


def _clip_metrics(ratio, adv, m, lo, hi) -> dict[str, Tensor]:
    r = ratio.detach()
    low = (r < lo) & (adv < 0)
    high = (r > hi) & (adv > 0)
    return {
        "clip_frac/low": masked_mean(low.float(), m),
        "clip_frac/high": masked_mean(high.float(), m),
        "clip_frac": masked_mean((low | high).float(), m),
    }


def _common_metrics(logp, old_logp, ratio, m) -> dict[str, Tensor]:
    lr = (logp.detach() - old_logp.detach()).float()
    return {
        # k3 estimate of KL(pi_old || pi_theta) from the old-policy samples: (rho - 1) - log rho
        "approx_kl": masked_mean(torch.expm1(lr) - lr, m),
        "ratio/mean": masked_mean(ratio.detach().float(), m),
        "ratio/max": torch.where(m.bool(), ratio.detach().float().expand_as(lr), torch.zeros_like(lr)).amax(),
        "num_tokens": m.sum(),
    }


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, Schulman et al. 2017 eq. 7, per token:
    ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)``; ``dual_clip = c > 1`` (Ye et al. 2020, dual-clip PPO)
    additionally bounds the loss of negative-advantage tokens by ``-c A``.
    Returns ``(loss_sum, metrics)``: the sum over masked tokens (unit: tokens). Metrics: ``clip_frac``
    (+ ``/low``, ``/high``), ``dual_clip_frac``, ``approx_kl``, ``ratio/mean``, ``ratio/max``, ``num_tokens``."""
    hi_eps = clip_eps if clip_eps_high is None else clip_eps_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = mask.float()
    logp, old_logp = masked_fill_zero(logp.float(), m), masked_fill_zero(old_logp.detach().float(), m)
    ratio = torch.exp(logp - old_logp)
    a = _broadcast_adv(advantages, ratio, m)
    loss = -torch.min(ratio * a, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi_eps) * a)
    metrics = _clip_metrics(ratio, a, m, 1.0 - clip_eps, 1.0 + hi_eps)
    if dual_clip is not None:
        cap = -dual_clip * a
        dual = (a < 0) & (loss.detach() > cap)
        loss = torch.where(a < 0, torch.min(loss, cap), loss)
        metrics["dual_clip_frac"] = masked_mean(dual.float(), m)
    metrics.update(_common_metrics(logp, old_logp, ratio, m))
    return masked_sum(loss, m), metrics


def huber(x: Tensor, delta: float) -> Tensor:
    """Huber loss of the error ``x`` (Huber 1964): ``x²/2`` for ``|x| <= delta``, else ``delta (|x| - delta/2)``."""
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None = 0.2,
    huber_delta: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 baselines, as in Ouyang et al. 2022's PPO): per token
    ``max(l(V - R), l(V_old + clip(V - V_old, -c, c) - R))`` with its own ``clip_range`` c (``None``: unclipped)
    and ``l(x) = x²/2``, or the Huber loss with ``huber_delta`` (a documented extension; trl uses the square).
    Returns ``(loss_sum over masked tokens, metrics)`` (unit: tokens)."""
    m = mask.float()
    v = masked_fill_zero(values.float(), m)
    ret = masked_fill_zero(returns.detach().float(), m)
    err_fn = (lambda x: 0.5 * x * x) if huber_delta is None else (lambda x: huber(x, huber_delta))
    err = err_fn(v - ret)
    metrics: dict[str, Tensor] = {}
    if clip_range is not None:
        old = masked_fill_zero(old_values.detach().float(), m)
        err_clip = err_fn(old + torch.clamp(v - old, -clip_range, clip_range) - ret)
        metrics["vf_clip_frac"] = masked_mean((err_clip > err).float().detach(), m)
        err = torch.max(err, err_clip)
    metrics["value/mean"] = masked_mean(v.detach(), m)
    metrics["value/error"] = masked_mean(((v - ret) ** 2).detach(), m)
    return masked_sum(err, m), metrics


def grpo_units(mask: Tensor, aggregation: str, row_mask: Tensor | None = None) -> int:
    """The units :func:`grpo_loss` sums over in a micro-batch (``mask [B, T]``; ``row_mask [B]`` marks rows
    that are real samples, not padding rows added to keep ranks in step):

    * ``grpo``: sequences with at least one loss token;
    * ``bnpo``: micro-batches with at least one loss token (0 or 1);
    * ``dr_grpo``: sequences (all real rows: the normaliser is the constant rows x max_completion_length);
    * ``dapo``: loss tokens."""
    rows = mask.sum(-1) > 0
    if aggregation == "grpo":
        return int(rows.sum())
    if aggregation == "bnpo":
        return int(bool(rows.any()))
    if aggregation == "dr_grpo":
        return int(mask.size(0) if row_mask is None else row_mask.sum())
    if aggregation == "dapo":
        return int(mask.sum())
    raise ValueError(f"aggregation must be one of {GRPO_AGGREGATIONS}, got {aggregation!r}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    aggregation: str = "grpo",
    objective: str = "clip",
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    delta: float | None = None,
    importance_sampling: str = "token",
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family policy loss of one micro-batch → ``(loss_sum, metrics)``, summed over the units of
    :func:`grpo_units` (the loop divides by the window's units on all ranks).

    Per-token term ``l_t`` (``A`` = advantages ``[B]`` or ``[B, T]``, ``rho`` = :func:`policy_ratio`):
    * ``objective="clip"``: ``-min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` (GRPO, Shao et al. 2024
      eq. 3; clip-higher eps_high > eps_low from DAPO, Yu et al. 2025), with ``rho' = min(rho, delta)`` when
      ``delta`` is set (INTELLECT-2 two-sided clipping: also caps the unclipped ratio for ``A < 0``).
    * ``objective="cispo"``: ``-sg(clip(rho, max=1 + eps_high)) * A * logp`` (MiniMax-M1 CISPO: clipped,
      stop-gradient IS weight; no lower bound, as in the paper; note trl's ``epsilon_high`` for cispo is the
      absolute cap, ours is ``1 + clip_eps_high``).
    * ``beta > 0``: ``+ beta * k_t`` with ``kl_estimator`` (needs ``ref_logp``; k3 by default — its gradient
      follows KL(pi_ref || pi); k2's follows KL(pi || pi_ref); k1's is zero in expectation, see :mod:`.rl`).
    ``importance_sampling="sequence"`` is GSPO (see :func:`policy_ratio`).

    Sum per aggregation (``m`` = mask; divided by the window's units it is the paper's normaliser):
    * ``grpo``: ``sum_i [sum_t m l / sum_t m]`` — per-sequence token means (unit: sequences with tokens);
    * ``bnpo``: ``sum m l / sum m`` — this micro-batch's token mean (unit: micro-batches);
    * ``dr_grpo``: ``sum m l / max_completion_length`` (unit: sequences; Liu et al. 2025, Dr. GRPO);
    * ``dapo``: ``sum m l`` (unit: loss tokens of the whole window: token-level, Yu et al. 2025).
    Metrics: clip fractions (``clip_frac``, ``/low``, ``/high``; ``cispo_clip_frac``), ``approx_kl`` (old → new),
    ``kl`` (to the reference, if beta > 0), ``ratio/*``, ``loss_sum``, ``num_tokens``."""
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {GRPO_AGGREGATIONS}, got {aggregation!r}")
    if objective not in ("clip", "cispo"):
        raise ValueError(f"objective must be 'clip' or 'cispo', got {objective!r}")
    if aggregation == "dr_grpo" and not max_completion_length:
        raise ValueError("dr_grpo needs max_completion_length (the constant generation limit)")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    hi_eps = clip_eps_low if clip_eps_high is None else clip_eps_high
    m = mask.float()
    logp32 = masked_fill_zero(logp.float(), m)
    old32 = masked_fill_zero(old_logp.detach().float(), m)
    ratio = policy_ratio(logp32, old32, m, importance_sampling)
    a = _broadcast_adv(advantages, ratio, m)
    metrics: dict[str, Tensor] = {}
    if objective == "clip":
        coef1 = ratio if delta is None else torch.clamp(ratio, max=delta)
        coef2 = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + hi_eps)
        per_tok = -torch.min(coef1 * a, coef2 * a)
        metrics.update(_clip_metrics(ratio, a, m, 1.0 - clip_eps_low, 1.0 + hi_eps))
    else:
        w = torch.clamp(ratio, max=1.0 + hi_eps).detach()
        per_tok = -w * a * logp32
        metrics["cispo_clip_frac"] = masked_mean(((ratio.detach() > 1.0 + hi_eps) & (a > 0)).float(), m)
    if beta > 0:
        kl = kl_estimate(logp32, masked_fill_zero(ref_logp.detach().float(), m), kl_estimator)
        per_tok = per_tok + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), m)
    total = masked_sum(per_tok, m)
    if aggregation == "grpo":
        loss = masked_mean(per_tok, m, dim=-1).sum()
    elif aggregation == "bnpo":
        loss = total / m.sum().clamp(min=1.0)
    elif aggregation == "dr_grpo":
        loss = total / float(max_completion_length)
    else:
        loss = total
    metrics.update(_common_metrics(logp32, old32, ratio, m))
    metrics["loss_sum"] = total.detach()
    return loss, metrics
