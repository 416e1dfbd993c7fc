"""RL maths: KL estimators, masked statistics, reward normalisation, advantages (GAE, group-relative), PPO and
the GRPO family of policy losses.

Shapes: per-token tensors are ``[B, T]`` over the completion tokens with a ``mask [B, T]`` (1 = a token the
policy generated and is trained on). ``logp`` is log pi_theta of the sampled tokens (with grad), ``old_logp``
log pi_old (recorded at rollout time, no grad), ``ref_logp`` log pi_ref (no grad). Metrics are detached 0-dim
tensors (no host sync); convert with ``.item()`` when logging.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "RunningMeanStd",
    "AdaptiveKLController",
    "kl_penalized_rewards",
    "gae",
    "group_advantages",
    "zero_variance_groups",
    "policy_ratio",
    "ppo_policy_loss",
    "value_loss",
    "grpo_loss",
    "GRPO_AGGREGATIONS",
]

GRPO_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html)
# ----------------------------------------------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(x) - log pi_ref(x), x ~ pi: unbiased estimate of KL(pi || pi_ref), high variance, can be < 0."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi(x) - log pi_ref(x))**2 / 2, x ~ pi: biased, low variance, >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(x) / pi(x), x ~ pi: unbiased, low variance, >= 0."""
    d = ref_logp - logp
    return torch.expm1(d) - d


_KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate with ``estimator`` in ``k1 | k2 | k3`` (Schulman 2020)."""
    if estimator not in _KL:
        raise ValueError(f"KL estimator must be one of {tuple(_KL)}, got {estimator!r}")
    return _KL[estimator](logp, ref_logp)


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum of ``x`` where ``mask`` (bool or 0/1 float weights), over ``dim`` (all if None)."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    prod = torch.where(m != 0, x * m, torch.zeros_like(x * m))  # masked NaN/inf do not leak
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is set; 0 (not NaN) where the mask is empty."""
    num = masked_sum(x, mask, dim)
    m = mask.to(num.dtype)
    den = m.sum() if dim is None else m.sum(dim)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (all dims); Bessel-corrected when ``unbiased`` (needs > 1 entry,
    else the biased value is returned)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.float().sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1.0), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (``+ mean`` back when ``shift_mean=False``,
    i.e. scale only); positions outside the mask are 0. Statistics are those of this tensor only; for
    cross-rank whitening compute the moments with an all-reduce and apply the same formula."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


class RunningMeanStd:
    """Running mean/variance of a scalar stream (rewards), float64, merged with the parallel-variance formula
    (Chan, Golub & LeVeque 1979). ``normalize(x) = (x - mean) / sqrt(var + eps)``.

    Distributed: all-reduce ``(sum, sum of squares, count)`` of the local batch, then call
    :meth:`update_from_moments` with the global moments on every rank so the statistics stay identical."""

    def __init__(self, eps: float = 1e-8):
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0
        self.eps = eps

    def update(self, x: Tensor) -> None:
        x = x.detach().double().reshape(-1)
        if x.numel() == 0:
            return
        self.update_from_moments(x.mean().item(), x.var(unbiased=False).item(), float(x.numel()))

    def update_from_moments(self, batch_mean: float, batch_var: float, batch_count: float) -> None:
        """Merge a batch with population variance ``batch_var`` of ``batch_count`` samples."""
        if batch_count <= 0:
            return
        if self.count == 0:
            self.mean, self.var, self.count = float(batch_mean), float(batch_var), float(batch_count)
            return
        tot = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta * delta * self.count * batch_count / tot
        self.mean = self.mean + delta * batch_count / tot
        self.var = m2 / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.var + self.eps)

    def normalize(self, x: Tensor, shift_mean: bool = True) -> Tensor:
        out = x / self.std if not shift_mean else (x - self.mean) / self.std
        return out.to(x.dtype)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
        self.eps = float(state.get("eps", self.eps))


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (§2.2): ``e = clip(KL / target - 1, -0.2, 0.2)``,
    ``beta <- beta * (1 + e * n_steps / horizon)``. ``target=None`` keeps beta fixed."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: float = 10000.0):
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            e = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + e * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def _last_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last set position per row and whether the row has any."""
    m = mask.bool()
    t = m.size(-1)
    pos = torch.arange(t, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(-1)
    return last.clamp(min=0), last >= 0


def kl_penalized_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards (Ziegler et al. 2019 eq. 2; Ouyang et al. 2022 eq. 2):
    ``r_t = -kl_coef * KL_t`` on every masked token, plus the sequence score on the **last** masked token
    (``scores [B]``) or, for dense rewards, ``scores [B, T]`` added per token. Returns ``(rewards, kl)`` (both
    ``[B, T]``, 0 outside the mask, no grad)."""
    m = mask.float()
    kl = kl_estimate(logp.detach().float(), ref_logp.detach().float(), estimator) * m
    rewards = -kl_coef * kl
    if scores.dim() == 1:
        last, has = _last_index(mask)
        add = torch.zeros_like(rewards)
        add.scatter_(1, last.unsqueeze(1), (scores.float() * has.float()).unsqueeze(1))
        rewards = rewards + add
    else:
        rewards = rewards + scores.float() * m
    return rewards, kl


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016 eq. 16 (``A_t = sum_l (gamma lam)^l delta_{t+l}``,
    ``delta_t = r_t + gamma V_{t+1} - V_t``) -> ``(advantages, returns = advantages + values)``, 0 outside mask.

    ``rewards``, ``values`` ``[B, T]`` (``values[:, t]`` = V of the state before token t); only masked positions
    are steps (masked-out positions, e.g. padding or tool output, are skipped: the next step is the next masked
    position). After a row's last step the next value is ``bootstrap_values[b]``: pass V of the state after the
    last token for **truncated** rows (hit the length limit) and 0 for rows that ended (EOS); ``None`` = all
    ended (no bootstrap)."""
    b, t = rewards.shape
    m = mask.bool()
    r = rewards.float()
    v = values.float()
    next_value = torch.zeros(b, device=r.device) if bootstrap_values is None else bootstrap_values.float().clone()
    next_adv = torch.zeros(b, device=r.device)
    adv = torch.zeros_like(r)
    for i in range(t - 1, -1, -1):
        delta = r[:, i] + gamma * next_value - v[:, i]
        a = delta + gamma * lam * next_adv
        mi = m[:, i]
        adv[:, i] = torch.where(mi, a, torch.zeros_like(a))
        next_value = torch.where(mi, v[:, i], next_value)
        next_adv = torch.where(mi, a, next_adv)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


@torch.no_grad()
def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_std: bool = True,
    eps: float = 1e-4,
    std_level: str = "group",
    unbiased: bool = True,
) -> Tensor:
    """Group-relative advantages, GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision):
    ``A_i = (r_i - mean(group)) / (std(group) + eps)`` for ``rewards [B * G]`` laid out group after group.
    ``scale_std=False`` is Dr. GRPO (Liu et al. 2025: no std division); ``std_level="batch"`` divides by the
    std of the whole batch instead. ``unbiased`` selects the sample std (trl) or population std. A group of one
    sample, or with identical rewards, gets advantage 0."""
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    if std_level not in ("group", "batch"):
        raise ValueError(f"std_level must be 'group' or 'batch', got {std_level!r}")
    r = rewards.float().reshape(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        if std_level == "group":
            std = r.std(dim=1, keepdim=True, unbiased=unbiased) if group_size > 1 else torch.zeros_like(r[:, :1])
        else:
            std = r.std(unbiased=unbiased) if r.numel() > 1 else torch.zeros((), device=r.device)
        adv = adv / (torch.nan_to_num(std, nan=0.0) + eps)
    return adv.reshape(-1)


@torch.no_grad()
def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``bool [B * G]``: True for every sample whose group has identical rewards (no learning signal under group
    normalisation; DAPO dynamic sampling, Yu et al. 2025, filters them)."""
    r = rewards.reshape(-1, group_size)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)
    return same.expand_as(r).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Policy losses
# ----------------------------------------------------------------------------------------------------------------


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


def _broadcast_adv(advantages: Tensor, like: Tensor) -> Tensor:
    a = advantages.detach().float()
    return a.unsqueeze(-1).expand_as(like) if a.dim() == 1 else a


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
    Returns ``(loss_sum, metrics)``: the **sum** over masked tokens; the caller divides by the token count of
    the mini-batch or accumulation window. Metrics: ``clip_frac`` (+ ``/low``, ``/high``), ``dual_clip_frac``,
    ``approx_kl``, ``ratio/mean``, ``ratio/max``, ``num_tokens``."""
    hi_eps = clip_eps if clip_eps_high is None else clip_eps_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = mask.float()
    ratio = torch.exp(logp.float() - old_logp.detach().float())
    a = _broadcast_adv(advantages, ratio)
    loss = -torch.min(ratio * a, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi_eps) * a)
    metrics = _clip_metrics(ratio, a, m, 1.0 - clip_eps, 1.0 + hi_eps)
    if dual_clip is not None:
        cap = -dual_clip * a
        dual = (a < 0) & (loss.detach() > cap)
        loss = torch.where(a < 0, torch.min(loss, cap), loss)
        metrics["dual_clip_frac"] = masked_mean(dual.float(), m)
    metrics.update(_common_metrics(logp, old_logp, ratio, m))
    return masked_sum(loss, m), metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 baselines, as in Ouyang et al. 2022's PPO): per token
    ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` with its own ``clip_range`` c (``None``:
    unclipped ``0.5 (V - R)^2``). Returns ``(loss_sum over masked tokens, metrics)``; the caller normalises."""
    v = values.float()
    ret = returns.detach().float()
    m = mask.float()
    err = (v - ret) ** 2
    metrics: dict[str, Tensor] = {}
    if clip_range is not None:
        old = old_values.detach().float()
        v_clip = old + torch.clamp(v - old, -clip_range, clip_range)
        err_clip = (v_clip - ret) ** 2
        metrics["vf_clip_frac"] = masked_mean((err_clip > err).float().detach(), m)
        err = torch.max(err, err_clip)
    loss = 0.5 * err
    metrics["value/mean"] = masked_mean(v.detach(), m)
    metrics["value/error"] = masked_mean(((v - ret) ** 2).detach(), m)
    return masked_sum(loss, m), metrics


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
    num_window_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family policy loss for one micro-batch -> ``(loss, metrics)``.

    Per-token term ``l_t`` (``A`` = advantages ``[B]`` or ``[B, T]``, ``rho`` = :func:`policy_ratio`):
    * ``objective="clip"``: ``-min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` (GRPO, Shao et al. 2024
      eq. 3; clip-higher eps_high > eps_low from DAPO, Yu et al. 2025), with ``rho' = min(rho, delta)`` when
      ``delta`` is set (INTELLECT-2 two-sided clipping: also caps the unclipped ratio for ``A < 0``).
    * ``objective="cispo"``: ``-sg(clip(rho, max=1 + eps_high)) * A * logp`` (MiniMax-M1 CISPO: clipped,
      stop-gradient IS weight; no lower bound, as in the paper; note trl's ``epsilon_high`` for cispo is the
      absolute cap, ours is ``1 + clip_eps_high``).
    * ``beta > 0``: ``+ beta * KL_t(pi || pi_ref)`` with ``kl_estimator`` (k3 default; needs ``ref_logp``).
    ``importance_sampling="sequence"`` is GSPO (see :func:`policy_ratio`).

    Aggregation (each is a different normaliser; ``m`` = mask, ``B`` = sequences in this micro-batch):
    * ``grpo``: ``mean_i [sum_t m l / sum_t m]`` — per-sequence token mean, then mean over sequences.
    * ``bnpo``: ``sum m l / sum m`` — token mean over this micro-batch.
    * ``dr_grpo``: ``sum m l / (B * max_completion_length)`` — a constant (caller passes the generation limit),
      Liu et al. 2025 (Dr. GRPO).
    * ``dapo``: ``sum m l / num_window_tokens`` — token-level over the **whole accumulation window**: the caller
      passes the number of masked tokens in all micro-batches of the optimizer step (under DDP gradient
      averaging, the global count divided by the world size). Do **not** divide this loss again.
    The first three are micro-batch means: with k micro-batches per optimizer step the caller divides by k
    (as trl does). Metrics: clip fractions (``clip_frac``, ``/low``, ``/high``; ``cispo_clip_frac``),
    ``approx_kl`` (old->new), ``kl`` (to the reference, if beta > 0), ``ratio/*``, ``loss_sum``, ``num_tokens``."""
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {GRPO_AGGREGATIONS}, got {aggregation!r}")
    if objective not in ("clip", "cispo"):
        raise ValueError(f"objective must be 'clip' or 'cispo', got {objective!r}")
    if aggregation == "dr_grpo" and not max_completion_length:
        raise ValueError("dr_grpo needs max_completion_length (the constant generation limit)")
    if aggregation == "dapo" and num_window_tokens is None:
        raise ValueError("dapo needs num_window_tokens (masked tokens in the whole accumulation window)")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    hi_eps = clip_eps_low if clip_eps_high is None else clip_eps_high
    m = mask.float()
    logp32 = logp.float()
    ratio = policy_ratio(logp32, old_logp.float(), m, importance_sampling)
    a = _broadcast_adv(advantages, ratio)
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
        kl = kl_estimate(logp32, ref_logp.detach().float(), kl_estimator)
        per_tok = per_tok + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), m)
    total = masked_sum(per_tok, m)
    if aggregation == "grpo":
        loss = masked_mean(per_tok, m, dim=-1).mean()
    elif aggregation == "bnpo":
        loss = total / m.sum().clamp(min=1.0)
    elif aggregation == "dr_grpo":
        loss = total / (per_tok.size(0) * float(max_completion_length))
    else:
        nwt = num_window_tokens if isinstance(num_window_tokens, Tensor) else torch.tensor(float(num_window_tokens))
        loss = total / nwt.to(total.device, torch.float32).clamp(min=1.0)
    metrics.update(_common_metrics(logp32, old_logp, ratio, m))
    metrics["loss_sum"] = total.detach()
    return loss, metrics
