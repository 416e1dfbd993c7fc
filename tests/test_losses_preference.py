"""Preference losses against hand computations with plain-Python math (trl cross-checks: test_losses_trl.py)."""
import math

import pytest
import torch

from llm_trainer.losses import (
    PREFERENCE_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    preference_loss,
    preference_metrics,
    robust_dpo_loss,
    sequence_logps,
    simpo_loss,
)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# two pairs of fixed summed log-probs and lengths
PC, PR = [-5.0, -12.0], [-7.0, -9.0]
RC, RR = [-6.0, -11.0], [-6.5, -9.5]
LC, LR = [4, 6], [5, 3]
T = torch.tensor


def _args():
    return T(PC), T(PR), T(RC), T(RR)


def test_dpo_equals_ln2_at_policy_equal_reference():
    lp = T([-3.0, -40.0, -0.5])
    out = dpo_loss(lp, lp - 1.0, lp.clone(), lp - 1.0, beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)
    assert out.chosen_rewards.abs().max().item() == 0 and out.rejected_rewards.abs().max().item() == 0
    for ls in (0.0, 0.2):
        o = preference_loss("dpo", lp, lp, lp, lp, beta=0.5, label_smoothing=ls)
        assert o.losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)


def test_dpo_and_cdpo_hand():
    beta = 0.1
    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]  # [1.5, -1.5]
    assert h == [1.5, -1.5]
    out = dpo_loss(*_args(), beta=beta)
    assert out.losses.tolist() == pytest.approx([-logsig(beta * x) for x in h], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.6209570478, 0.7709570478], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.05], abs=1e-6)
    eps = 0.2
    c = dpo_loss(*_args(), beta=beta, label_smoothing=eps)
    exp = [-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in h]
    assert c.losses.tolist() == pytest.approx(exp, abs=1e-6)


def test_robust_and_hinge_hand():
    beta, eps = 0.5, 0.1
    h = [1.5, -1.5]
    r = robust_dpo_loss(*_args(), beta=beta, label_smoothing=eps)
    exp = [((1 - eps) * -logsig(beta * x) - eps * -logsig(-beta * x)) / (1 - 2 * eps) for x in h]
    assert r.losses.tolist() == pytest.approx(exp, abs=1e-6)
    hl = hinge_loss(*_args(), beta=beta)
    assert hl.losses.tolist() == pytest.approx([max(0.0, 1 - beta * x) for x in h], abs=1e-6)
    assert hl.losses.tolist() == pytest.approx([0.25, 1.75], abs=1e-6)
    with pytest.raises(ValueError):
        robust_dpo_loss(*_args(), label_smoothing=0.5)


def test_ipo_hand_length_averaged():
    beta = 0.25
    out = ipo_loss(*_args(), T(LC), T(LR), beta=beta)
    exp = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        d = (pc - rc) / lc - (pr - rr) / lr
        exp.append((d - 1 / (2 * beta)) ** 2)
    # pair 0: 1/4 + 0.5/5 = 0.35 -> (0.35 - 2)^2 = 2.7225
    assert exp[0] == pytest.approx(2.7225)
    assert out.losses.tolist() == pytest.approx(exp, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.25], abs=1e-6)


def test_orpo_hand():
    beta = 0.1
    out = orpo_loss(T(PC), T(PR), T(LC), T(LR), beta=beta)
    exp = []
    for pc, pr, lc, lr in zip(PC, PR, LC, LR):
        mc, mr = pc / lc, pr / lr
        log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        exp.append(-beta * logsig(log_odds))
    assert out.losses.tolist() == pytest.approx(exp, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * -5 / 4, beta * -2.0], abs=1e-6)
    # near-certain responses (mean log-prob ~ 0) stay finite with finite gradients
    c = T([-1e-9], requires_grad=True)
    o = orpo_loss(c, T([-3.0]), T([1]), T([1]))
    o.losses.sum().backward()
    assert torch.isfinite(o.losses).all() and torch.isfinite(c.grad).all()


def test_simpo_hand():
    beta, gamma = 2.0, 0.5
    out = simpo_loss(T(PC), T(PR), T(LC), T(LR), beta=beta, gamma=gamma)
    exp = [-logsig(beta * pc / lc - beta * pr / lr - gamma) for pc, pr, lc, lr in zip(PC, PR, LC, LR)]
    # pair 0: 2(-1.25) - 2(-1.4) - 0.5 = -0.2
    assert exp[0] == pytest.approx(-logsig(-0.2))
    assert out.losses.tolist() == pytest.approx(exp, abs=1e-6)
    ls = simpo_loss(T(PC), T(PR), T(LC), T(LR), beta=beta, gamma=gamma, label_smoothing=0.1)
    z = [beta * pc / lc - beta * pr / lr - gamma for pc, pr, lc, lr in zip(PC, PR, LC, LR)]
    assert ls.losses.tolist() == pytest.approx([-0.9 * logsig(x) - 0.1 * logsig(-x) for x in z], abs=1e-6)


def test_sequence_logps_hand():
    logits = T([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0]],
                [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]])
    labels = T([[9, 2, 1], [9, -100, 0]])  # shifted targets: row0 (2, 1), row1 (ignored, 0)
    s, n = sequence_logps(logits, labels)
    lse = lambda v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    assert n.tolist() == [2, 1]
    assert s.tolist() == pytest.approx([3 - lse([1, 2, 3]) - math.log(3), -math.log(3)], abs=1e-6)


def test_bradley_terry_hand_and_metrics():
    c, r = T([2.0, 0.0, -1.0]), T([1.0, 0.5, -1.0])
    assert bradley_terry_loss(c, r).tolist() == pytest.approx([-logsig(1.0), -logsig(-0.5), math.log(2)], abs=1e-6)
    m = T([0.5, 0.0, 1.0])
    assert bradley_terry_loss(c, r, m).tolist() == pytest.approx([-logsig(0.5), -logsig(-0.5), -logsig(-1.0)],
                                                                 abs=1e-6)
    assert bradley_terry_loss(c, r, 1.0).tolist() == pytest.approx([math.log(2), -logsig(-1.5), -logsig(-1.0)],
                                                                   abs=1e-6)
    met = preference_metrics(c, r)
    assert met["rewards/accuracy"].item() == pytest.approx(1.0)       # sums over pairs: 1 of 3 is right
    assert met["rewards/margin"].item() == pytest.approx(0.5)


def test_dispatcher_matches_and_validates():
    pc, pr, rc, rr = _args()
    lc, lr = T(LC), T(LR)
    for lt in PREFERENCE_LOSS_TYPES:
        o = preference_loss(lt, pc, pr, rc, rr, lc, lr, beta=0.2, label_smoothing=0.1, gamma=0.3)
        assert o.losses.shape == (2,) and torch.isfinite(o.losses).all()
    assert torch.equal(preference_loss("ipo", pc, pr, rc, rr, lc, lr, beta=0.2).losses,
                       ipo_loss(pc, pr, rc, rr, lc, lr, beta=0.2).losses)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", pc, pr)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss("simpo", pc, pr)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss("kto", pc, pr, rc, rr)


def test_dpo_gradient_sign():
    pc = T([-5.0], requires_grad=True)
    pr = T([-7.0], requires_grad=True)
    dpo_loss(pc, pr, T([-6.0]), T([-6.5]), beta=0.1).losses.sum().backward()
    # d/d pc of -log sigma(beta h) = -beta * sigma(-beta h)
    assert pc.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.15))), abs=1e-7)
    assert pr.grad.item() == pytest.approx(-pc.grad.item(), abs=1e-7)
