"""Rollout corrections (losses.policy.rollout_correction_weights): truncated (TIS, Yao et al. 2025) and masked (MIS)
importance sampling at token and sequence level against hand values, and their weights in the GRPO and PPO losses."""
from __future__ import annotations

import math

import pytest
import torch

from llm_trainer.losses import grpo_loss, ppo_policy_loss, rollout_correction_weights

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
ROLL = torch.tensor([[-1.0, -2.5, -0.1], [-1.0, -0.2, 9.0]])      # the last slot is padding (junk must not leak)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
E = math.exp


@pytest.mark.parametrize("mode,level,threshold,expected,clipped", [
    # rho = exp(old - rollout) per token: [[1, e^.5, e^-.4], [e^.7, e^-.5, -]]
    ("tis", "token", 1.5, [[1.0, 1.5, E(-0.4)], [1.5, E(-0.5), 0.0]], 2 / 5),
    ("mis", "token", 1.5, [[1.0, 0.0, E(-0.4)], [0.0, E(-0.5), 0.0]], 2 / 5),
    # per sequence: exp(0.1) and exp(0.2), for every token of the row
    ("tis", "sequence", 1.15, [[E(0.1)] * 3, [1.15, 1.15, 0.0]], 2 / 5),
    ("mis", "sequence", 1.15, [[E(0.1)] * 3, [0.0, 0.0, 0.0]], 2 / 5),
    ("mis", "sequence", 2.0, [[E(0.1)] * 3, [E(0.2), E(0.2), 0.0]], 0.0),
])
def test_weights_equal_hand_values(mode, level, threshold, expected, clipped):
    w, m = rollout_correction_weights(OLD, ROLL, MASK, mode, level, threshold)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["rollout_is/clip_frac"], torch.tensor(clipped), rtol=0, atol=1e-7)
    torch.testing.assert_close(m["rollout_is/mean"], torch.tensor(expected).sum() / 5, rtol=1e-6, atol=1e-7)


def test_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        rollout_correction_weights(OLD, ROLL, MASK, "clip")
    with pytest.raises(ValueError, match="level must be 'token' or 'sequence'"):
        rollout_correction_weights(OLD, ROLL, MASK, "tis", "batch")
    with pytest.raises(ValueError, match="threshold must be > 0"):
        rollout_correction_weights(OLD, ROLL, MASK, "tis", "token", 0.0)


def test_weights_multiply_each_tokens_policy_term():
    """At ratio 1 and no clipping each token's GRPO term is -A; with weights it is -w A (the KL term unweighted);
    the PPO surrogate alike. Without weights the losses are unchanged."""
    logp = OLD.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    w, _ = rollout_correction_weights(OLD, ROLL, MASK, "tis", "token", 1.5)
    ref = OLD - 0.1
    loss, _ = grpo_loss(logp, OLD, adv, MASK, aggregation="dapo", ref_logp=ref, beta=0.5, token_weights=w)
    k3 = math.expm1(-0.1) + 0.1
    per_tok = -adv[:, None] * w + 0.5 * k3
    torch.testing.assert_close(loss, (per_tok * MASK).sum())
    loss.backward()
    torch.testing.assert_close(logp.grad, (-adv[:, None] * w + 0.5 * (1 - math.exp(-0.1))) * MASK)
    plain, _ = grpo_loss(OLD, OLD, adv, MASK, aggregation="grpo")
    unit, _ = grpo_loss(OLD, OLD, adv, MASK, aggregation="grpo", token_weights=torch.ones_like(MASK))
    assert torch.equal(plain, unit) and torch.equal(plain, torch.tensor(-1.0 + 2.0))
    pg, _ = ppo_policy_loss(OLD, OLD, adv, MASK, token_weights=w)
    torch.testing.assert_close(pg, (-adv[:, None] * w * MASK).sum())
    assert torch.equal(ppo_policy_loss(OLD, OLD, adv, MASK)[0], ppo_policy_loss(OLD, OLD, adv, MASK, token_weights=None)[0])
