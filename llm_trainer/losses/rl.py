"""RL maths: KL estimators, masked statistics, reward normalisation and advantages (GAE, group-relative). The
policy and value losses that use them are in :mod:`.policy`.

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
    "masked_fill_zero",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "RunningMeanStd",
    "AdaptiveKLController",
    "kl_penalized_rewards",
    "gae",
    "group_advantages",
    "zero_variance_groups",
    "masked_moments",
    "whiten_with_moments",
    "KL_ESTIMATORS",
]


# ----------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html)
# ----------------------------------------------------------------------------------------------------------------


# Values and gradients differ. With x ~ pi (the samples held fixed, as in a policy-gradient step), every
# estimator's *value* estimates KL(pi || pi_ref), but as a differentiable loss term its expected *gradient* is:
#   k1: E_pi[grad log pi] = 0            -- no regularisation at all, only noise (fine inside a PPO reward);
#   k2: grad KL(pi || pi_ref)            -- the reverse KL the penalty is meant to be;
#   k3: grad KL(pi_ref || pi)            -- the forward KL (what DeepSeekMath's GRPO and trl use).
# tests/test_losses_rl.py checks all three by exact expectation over a small categorical policy.


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(x) - log pi_ref(x), x ~ pi: unbiased estimate of KL(pi || pi_ref), high variance, can be < 0.
    As a loss term its expected gradient is zero (see above): use it only inside a reward."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi(x) - log pi_ref(x))**2 / 2, x ~ pi: biased, low variance, >= 0. Its expected gradient is
    exactly grad KL(pi || pi_ref)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(x) / pi(x), x ~ pi: unbiased, low variance, >= 0. Its expected
    gradient is grad KL(pi_ref || pi) (the forward KL), not grad KL(pi || pi_ref)."""
    d = ref_logp - logp
    return torch.expm1(d) - d


_KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
KL_ESTIMATORS = tuple(_KL)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of the value of KL(pi || pi_ref) with ``estimator`` in ``k1 | k2 | k3`` (Schulman
    2020); see the note above on which divergence each one's gradient follows."""
    if estimator not in _KL:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return _KL[estimator](logp, ref_logp)


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Sum of ``x`` where ``mask`` (bool or 0/1 float weights), over ``dim`` (all if None). A NaN/inf in a
    masked-out slot does not reach the value; to keep it out of the *gradient* too, sanitise the inputs of any
    non-linearity first (:func:`masked_fill_zero`), as the losses of :mod:`.policy` do."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    prod = torch.where(m != 0, x * m, torch.zeros_like(x * m))
    return prod.sum() if dim is None else prod.sum(dim)


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with 0 where ``mask`` is not set: applied to a loss's inputs it keeps junk in padded slots (NaN,
    inf, huge values) out of both the value and the gradient (``torch.where`` routes no gradient there)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


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
# Whitening across micro-batches and ranks
# ----------------------------------------------------------------------------------------------------------------


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``float64 [3]``: (sum, sum of squares, count) of the masked entries — add these over micro-batches and
    all-reduce them over ranks, then :func:`whiten_with_moments`."""
    m = mask.double()
    v = masked_fill_zero(x.double(), mask)
    return torch.stack([(v * m).sum(), (v * v * m).sum(), m.sum()])


def whiten_with_moments(x: Tensor, mask: Tensor, moments: Tensor, shift_mean: bool = True,
                        eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and Bessel-corrected variance of ``moments`` (from
    :func:`masked_moments`); ``+ mean`` back when ``shift_mean=False`` (the mean is kept, the spread is
    normalised: trl's ``masked_whiten(shift_mean=False)``). 0 outside ``mask``. Equals :func:`masked_whiten` when
    the moments are those of ``x`` alone."""
    n = max(float(moments[2]), 1.0)
    mean = float(moments[0]) / n
    var = max(float(moments[1]) / n - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))
    out = (x - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
