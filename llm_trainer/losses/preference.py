"""Preference losses (DPO family, ORPO, SimPO) and the Bradley-Terry reward-model loss.

Inputs are per-sequence **summed** log-probabilities of the response tokens (``sequence_logps``) plus, for the
length-normalised losses (IPO, ORPO, SimPO), the response lengths. Every loss returns a
:class:`PreferenceOutput` ``(losses [B], chosen_rewards [B], rejected_rewards [B])``: one loss per pair (the
trainer sums them and divides by the number of pairs in the accumulation window) and detached implicit rewards
for logging. Rewards follow trl: ``beta * (logp - ref_logp)`` for reference-based losses, ``beta * mean logp``
for ORPO and SimPO.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .lm import token_logps

__all__ = [
    "PreferenceOutput",
    "PREFERENCE_LOSS_TYPES",
    "sequence_logps",
    "dpo_loss",
    "robust_dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "orpo_loss",
    "simpo_loss",
    "preference_loss",
    "preference_metrics",
    "bradley_terry_loss",
]

PREFERENCE_LOSS_TYPES = ("dpo", "robust", "hinge", "ipo", "orpo", "simpo")


class PreferenceOutput(NamedTuple):
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def sequence_logps(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, shift: bool = True, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-sequence ``(sum_t log p(y_t), n_tokens)`` over non-ignored (shifted) labels: ``([B], [B] int64)``.

    The mean log-prob is ``sum / n_tokens.clamp(min=1)``. Build ``labels`` with the prompt set to
    ``ignore_index`` so only response tokens count (Rafailov et al. 2023, log pi(y|x) in eq. 7)."""
    lp, mask = token_logps(logits, labels, ignore_index, shift, temperature)
    return lp.sum(-1), mask.sum(-1)


def _f(x: Tensor) -> Tensor:
    return x.float()


def _len(n: Tensor) -> Tensor:
    return n.float().clamp(min=1.0)


def _pref_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    cr = _f(chosen_logps) - _f(ref_chosen_logps)
    rr = _f(rejected_logps) - _f(ref_rejected_logps)
    return cr, rr, cr - rr


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """DPO, Rafailov et al. 2023 eq. 7: ``-log sigma(beta * h)``, ``h = (pi_c - ref_c) - (pi_r - ref_r)`` on summed
    log-probs. ``label_smoothing = eps > 0`` gives conservative DPO (cDPO, Mitchell 2023):
    ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``. At policy == reference the loss is ``ln 2``."""
    cr, rr, h = _pref_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return PreferenceOutput(losses, beta * cr.detach(), beta * rr.detach())


def robust_dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> PreferenceOutput:
    """Robust DPO, Chowdhury et al. 2024 (rDPO loss, §3): unbiased loss under preference flips with rate ``eps``:
    ``[(1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)] / (1 - 2 eps)``, ``eps < 0.5``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    cr, rr, h = _pref_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    e = label_smoothing
    losses = (-(1.0 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * e)
    return PreferenceOutput(losses, beta * cr.detach(), beta * rr.detach())


def hinge_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> PreferenceOutput:
    """SLiC-HF hinge/calibration loss (Zhao et al. 2023, rank-calibration loss with margin ``1/beta``), DPO-parameterised as in
    trl: ``max(0, 1 - beta * h)``, ``h`` as in :func:`dpo_loss`."""
    cr, rr, h = _pref_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return PreferenceOutput(torch.relu(1.0 - beta * h), beta * cr.detach(), beta * rr.detach())


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
) -> PreferenceOutput:
    """IPO, Azar et al. 2023 eq. 17 (beta = tau): ``(h_avg - 1 / (2 beta))**2`` with
    ``h_avg = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|`` on **length-averaged** log-ratios, as trl does
    (confirmed with the IPO authors per trl; summed log-probs make the square scale with length)."""
    cr, rr, _ = _pref_logits(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h_avg = cr / _len(chosen_lengths) - rr / _len(rejected_lengths)
    losses = (h_avg - 1.0 / (2.0 * beta)) ** 2
    return PreferenceOutput(losses, beta * cr.detach(), beta * rr.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
) -> PreferenceOutput:
    """ORPO odds-ratio term, Hong et al. 2024 eq. 7 (times lambda = ``beta``, eq. 6):
    ``-beta * log sigma(log odds(y_c) - log odds(y_r))``, ``odds(y) = P / (1 - P)``, ``log P`` = mean token
    log-prob. The NLL term of eq. 6 (``L_SFT``) is added by the trainer. The mean log-prob is clamped to
    ``<= -1e-6`` (P = 1 has infinite odds). No reference model."""
    mc = (_f(chosen_logps) / _len(chosen_lengths)).clamp(max=-1e-6)
    mr = (_f(rejected_logps) / _len(rejected_lengths)).clamp(max=-1e-6)
    log_odds = (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceOutput(losses, beta * mc.detach(), beta * mr.detach())


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """SimPO, Meng et al. 2024 eq. 6: ``-log sigma(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma)``.
    ``gamma`` is the absolute target margin (trl's ``simpo_gamma``; trl subtracts ``gamma / beta`` before the
    ``beta`` scaling, which is the same thing). ``label_smoothing`` as in cDPO. No reference model."""
    ac = _f(chosen_logps) / _len(chosen_lengths)
    ar = _f(rejected_logps) / _len(rejected_lengths)
    z = beta * (ac - ar) - gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PreferenceOutput(losses, beta * ac.detach(), beta * ar.detach())


def preference_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> PreferenceOutput:
    """Dispatch on ``loss_type`` in :data:`PREFERENCE_LOSS_TYPES` (``robust`` uses ``label_smoothing`` as the
    flip rate). Reference log-probs are required for dpo/robust/hinge/ipo, lengths for ipo/orpo/simpo."""
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSS_TYPES}, got {loss_type!r}")
    if loss_type in ("dpo", "robust", "hinge", "ipo") and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    if loss_type in ("ipo", "orpo", "simpo") and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
    ref = (ref_chosen_logps, ref_rejected_logps)
    if loss_type == "dpo":
        return dpo_loss(chosen_logps, rejected_logps, *ref, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "robust":
        return robust_dpo_loss(chosen_logps, rejected_logps, *ref, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "hinge":
        return hinge_loss(chosen_logps, rejected_logps, *ref, beta=beta)
    if loss_type == "ipo":
        return ipo_loss(chosen_logps, rejected_logps, *ref, chosen_lengths, rejected_lengths, beta=beta)
    if loss_type == "orpo":
        return orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta)
    return simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta, gamma=gamma,
                      label_smoothing=label_smoothing)


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Sums over the pairs (detached; the loop divides by the pairs of the window): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy`` (pairs with chosen reward strictly above
    rejected)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/margin": (c - r).sum(),
        "rewards/accuracy": (c > r).float().sum(),
    }


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Reward-model pairwise loss per pair (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; margin as in
    Llama 2, Touvron et al. 2023 eq. 2): ``-log sigma(r_c - r_r - margin)``."""
    d = _f(chosen_scores) - _f(rejected_scores)
    if margin is not None:
        d = d - (margin.float() if isinstance(margin, Tensor) else float(margin))
    return -F.logsigmoid(d)
