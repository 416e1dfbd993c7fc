"""RL maths against hand values (literals or plain-Python loops that do not call the code under test)."""
import math
import statistics

import pytest
import torch

from llm_trainer.losses import (
    AdaptiveKLController,
    RunningMeanStd,
    gae,
    group_advantages,
    grpo_loss,
    grpo_units,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_ratio,
    ppo_policy_loss,
    value_loss,
    zero_variance_groups,
)

T = torch.tensor


def test_kl_estimators_hand():
    lp, ref = T([-1.0, -2.0, -0.5]), T([-1.5, -1.0, -0.5])
    k1 = [a - b for a, b in zip(lp.tolist(), ref.tolist())]
    assert kl_k1(lp, ref).tolist() == pytest.approx(k1)
    assert kl_k2(lp, ref).tolist() == pytest.approx([0.5 * x * x for x in k1])
    assert kl_k3(lp, ref).tolist() == pytest.approx([math.exp(-x) - 1 + x for x in k1], abs=1e-7)
    assert kl_k3(lp, ref).tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2, 0.0], abs=1e-6)
    assert torch.equal(kl_estimate(lp, ref, "k2"), kl_k2(lp, ref))
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def test_masked_stats_hand():
    x = T([[1.0, 2.0, 100.0], [3.0, float("nan"), 6.0]])
    m = T([[1, 1, 0], [1, 0, 1]]).bool()
    vals = [1.0, 2.0, 3.0, 6.0]
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    assert masked_mean(x, m, dim=-1).tolist() == pytest.approx([1.5, 4.5])
    assert masked_var(x, m).item() == pytest.approx(statistics.variance(vals))
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(statistics.pvariance(vals))
    w = masked_whiten(x, m)
    sd = math.sqrt(statistics.variance(vals) + 1e-8)
    exp = [[(1 - 3) / sd, (2 - 3) / sd, 0.0], [0.0, 0.0, (6 - 3) / sd]]
    exp[1][0] = 0.0
    assert w[0].tolist() == pytest.approx(exp[0], abs=1e-6)
    assert w[1, 0].item() == pytest.approx(0.0, abs=1e-6) and w[1, 2].item() == pytest.approx(3 / sd, abs=1e-6)
    w2 = masked_whiten(x, m, shift_mean=False)
    assert w2[0, 0].item() == pytest.approx((1 - 3) / sd + 3, abs=1e-6)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not NaN


def test_running_mean_std_matches_full_data():
    data = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    rms = RunningMeanStd()
    rms.update(T(data[:2]))
    rms.update(T(data[2:]))
    assert rms.count == 6
    assert rms.mean == pytest.approx(statistics.mean(data))
    assert rms.var == pytest.approx(statistics.pvariance(data))
    z = rms.normalize(T([10.0]))
    assert z.item() == pytest.approx((10 - 25 / 6) / math.sqrt(statistics.pvariance(data) + 1e-8), rel=1e-6)
    assert rms.normalize(T([10.0]), shift_mean=False).item() == pytest.approx(10 / rms.std, rel=1e-6)
    clone = RunningMeanStd()
    clone.load_state_dict(rms.state_dict())
    assert clone.mean == rms.mean and clone.var == rms.var


def test_adaptive_kl_controller_hand():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    f = AdaptiveKLController(0.2)
    assert f.update(100.0, 256) == 0.2


def _gae_reference(rewards, values, mask, gamma, lam, boot):
    out_a, out_r = [], []
    for r, v, m, b in zip(rewards, values, mask, boot):
        steps = [t for t in range(len(r)) if m[t]]
        adv = [0.0] * len(r)
        nxt_v, nxt_a = b, 0.0
        for t in reversed(steps):
            d = r[t] + gamma * nxt_v - v[t]
            a = d + gamma * lam * nxt_a
            adv[t] = a
            nxt_v, nxt_a = v[t], a
        out_a.append(adv)
        out_r.append([adv[t] + v[t] if m[t] else 0.0 for t in range(len(r))])
    return out_a, out_r


def test_gae_literal_small():
    a, r = gae(T([[0.0, 0.0, 1.0]]), T([[0.0, 0.0, 0.0]]), T([[1, 1, 1]]), gamma=1.0, lam=1.0)
    assert a.tolist() == [[1.0, 1.0, 1.0]] and r.tolist() == [[1.0, 1.0, 1.0]]
    a, _ = gae(T([[0.0, 0.0, 1.0]]), T([[0.0, 0.0, 0.0]]), T([[1, 1, 1]]), gamma=0.5, lam=1.0)
    assert a.tolist() == [[0.25, 0.5, 1.0]]
    # truncated row: bootstrap V = 2 after the last token; gamma=1, lam=0 -> A_t = r_t + V_{t+1} - V_t
    a, _ = gae(T([[0.0, 1.0]]), T([[0.5, 1.0]]), T([[1, 1]]), gamma=1.0, lam=0.0, bootstrap_values=T([2.0]))
    assert a.tolist() == [[0.5, 2.0]]


def test_gae_matches_hand_loop_with_padding_gaps_and_bootstrap():
    rewards = [[0.0, 0.0, 1.0, 0.0], [0.5, 7.0, -1.0, 2.0], [0.0, 0.3, 0.0, 0.0]]
    values = [[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 0.5, 0.6], [5.0, 0.2, 0.1, 0.0]]
    mask = [[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1]]  # right pad, a masked gap, left pad
    boot = [0.0, 0.7, 0.0]  # row 1 was truncated
    exp_a, exp_r = _gae_reference(rewards, values, mask, 0.9, 0.8, boot)
    a, r = gae(T(rewards), T(values), T(mask), gamma=0.9, lam=0.8, bootstrap_values=T(boot))
    for got, exp in zip(a.tolist(), exp_a):
        assert got == pytest.approx(exp, abs=1e-6)
    for got, exp in zip(r.tolist(), exp_r):
        assert got == pytest.approx(exp, abs=1e-6)


def test_group_advantages_hand():
    r = T([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 3.0, 0.0, 1.0])
    sd = statistics.stdev([1, 0, 0, 1])  # sample std (trl convention)
    a = group_advantages(r, 4)
    assert a[:4].tolist() == pytest.approx([0.5 / (sd + 1e-4), -0.5 / (sd + 1e-4), -0.5 / (sd + 1e-4),
                                            0.5 / (sd + 1e-4)], abs=1e-6)
    assert a[4:8].tolist() == [0.0] * 4
    sd3 = statistics.stdev([0, 3, 0, 1])
    assert a[8:].tolist() == pytest.approx([(x - 1.0) / (sd3 + 1e-4) for x in [0, 3, 0, 1]], abs=1e-6)
    assert group_advantages(r, 4, scale_std=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -1, 2, -1, 0]
    pop = statistics.pstdev([1, 0, 0, 1])
    assert group_advantages(r, 4, unbiased=False)[0].item() == pytest.approx(0.5 / (pop + 1e-4), abs=1e-6)
    bsd = statistics.stdev(r.tolist())
    assert group_advantages(r, 4, std_level="batch")[9].item() == pytest.approx(2 / (bsd + 1e-4), abs=1e-6)
    assert group_advantages(T([3.0, 5.0]), 1).tolist() == [0.0, 0.0]
    assert zero_variance_groups(r, 4).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    with pytest.raises(ValueError):
        group_advantages(r, 5)


# Uneven lengths 1, 2, 4 (T = 4); ratios chosen so some tokens are clipped.
LP = [[-1.0, 0.0, 0.0, 0.0], [-0.5, -2.0, 0.0, 0.0], [-1.0, -0.2, -3.0, -0.7]]
OLD = [[-1.2, 0.0, 0.0, 0.0], [-0.4, -1.5, 0.0, 0.0], [-0.9, -0.6, -3.1, -0.7]]
MASK = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
ADV = [1.0, -0.5, 2.0]
EL, EH = 0.2, 0.28


def _tok_loss(lp, old, a, el=EL, eh=EH, delta=None):
    rho = math.exp(lp - old)
    c = min(max(rho, 1 - el), 1 + eh)
    r1 = rho if delta is None else min(rho, delta)
    return -min(r1 * a, c * a)


def _per_seq():
    return [[_tok_loss(LP[i][t], OLD[i][t], ADV[i]) for t in range(4) if MASK[i][t]] for i in range(3)]


def _run(**kw):
    lp = T(LP, requires_grad=True)
    loss, met = grpo_loss(lp, T(OLD), T(ADV), T(MASK), clip_eps_low=EL, clip_eps_high=EH, **kw)
    return loss, met, lp


def test_grpo_aggregations_differ_and_match_hand():
    """Each aggregation returns a sum over its units; sum / units is the paper's normaliser (dapo: over a window of
    20 tokens, as the loop divides by the window's tokens)."""
    seqs = _per_seq()
    total = sum(sum(s) for s in seqs)
    hand = {
        "grpo": sum(sum(s) / len(s) for s in seqs) / 3,
        "bnpo": total / 7,
        "dr_grpo": total / (3 * 8),
        "dapo": total / 20,
    }
    units = {"grpo": 3, "bnpo": 1, "dr_grpo": 3, "dapo": 7}
    got = {}
    for agg in hand:
        loss, met, _ = _run(aggregation=agg, max_completion_length=8)
        assert grpo_units(T(MASK), agg) == units[agg]
        got[agg] = loss.item() / (20 if agg == "dapo" else units[agg])
        assert got[agg] == pytest.approx(hand[agg], abs=1e-6), agg
        assert met["loss_sum"].item() == pytest.approx(total, abs=1e-6)
        assert met["num_tokens"].item() == 7
    vals = list(got.values())
    assert all(abs(a - b) > 1e-3 for i, a in enumerate(vals) for b in vals[i + 1:])
    with pytest.raises(ValueError, match="max_completion_length"):
        _run(aggregation="dr_grpo")
    # padding rows (row_mask 0) are not sequences of dr_grpo; rows without loss tokens are not sequences of grpo
    mask = T([[1, 1], [0, 0], [0, 0]])
    assert grpo_units(mask, "dr_grpo", row_mask=T([1, 1, 0])) == 2 and grpo_units(mask, "grpo") == 1
    assert grpo_units(torch.zeros(2, 3), "bnpo") == 0


def test_grpo_clip_metrics_hand():
    _, met, _ = _run(aggregation="bnpo")
    ratios = [(math.exp(LP[i][t] - OLD[i][t]), ADV[i]) for i in range(3) for t in range(4) if MASK[i][t]]
    low = sum(1 for r, a in ratios if r < 1 - EL and a < 0)
    high = sum(1 for r, a in ratios if r > 1 + EH and a > 0)
    assert high >= 1  # the fixture exercises clipping
    assert met["clip_frac/low"].item() == pytest.approx(low / 7)
    assert met["clip_frac/high"].item() == pytest.approx(high / 7)
    assert met["clip_frac"].item() == pytest.approx((low + high) / 7)
    assert met["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r, _ in ratios) / 7, abs=1e-6)


def test_first_inner_step_ratio_exactly_one_and_clip_inactive():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g) * 3
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv = T([0.7, -1.3, 2.0])
    for level in ("token", "sequence"):
        lp = old.clone().requires_grad_(True)
        assert torch.equal(policy_ratio(lp, old, mask, level), torch.ones(3, 5))
        outs = []
        for el, eh in ((0.2, 0.28), (1e-3, 1e-3), (1e9, 1e9)):  # usual, tight, no clipping
            x = old.clone().requires_grad_(True)
            loss, met = grpo_loss(x, old, adv, mask, clip_eps_low=el, clip_eps_high=eh, importance_sampling=level)
            loss.backward()
            outs.append((loss.detach(), x.grad))
            assert met["clip_frac"].item() == 0.0
        for loss, grad in outs[1:]:
            assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])
        # value: grpo aggregation of -A summed over the sequences -> -sum(A)
        assert outs[0][0].item() == pytest.approx(-(0.7 - 1.3 + 2.0), abs=1e-6)
    lp = old.clone().requires_grad_(True)
    s, met = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    s_unclipped, _ = ppo_policy_loss(lp, old, adv, mask, clip_eps=1e9)
    assert torch.equal(s, s_unclipped) and met["clip_frac"].item() == 0.0 and met["approx_kl"].item() == 0.0


def test_gspo_sequence_ratio_value_and_gradient():
    lp = T(LP, requires_grad=True)
    ratio = policy_ratio(lp, T(OLD), T(MASK), "sequence")
    s = []
    for i in range(3):
        d = [LP[i][t] - OLD[i][t] for t in range(4) if MASK[i][t]]
        s.append(math.exp(sum(d) / len(d)))
    for i in range(3):
        for t in range(4):
            assert ratio[i, t].item() == pytest.approx(s[i], rel=1e-6)
    # unclipped GSPO with per-sequence mean aggregation (summed over sequences): dL/dlogp_{i,t} = -A_i s_i / |y_i|
    loss, _ = grpo_loss(lp, T(OLD), T(ADV), T(MASK), importance_sampling="sequence", clip_eps_low=1e9,
                        clip_eps_high=1e9)
    assert loss.item() == pytest.approx(-sum(a * si for a, si in zip(ADV, s)), abs=1e-6)
    loss.backward()
    lens = [1, 2, 4]
    for i in range(3):
        for t in range(4):
            exp = -ADV[i] * s[i] / lens[i] if MASK[i][t] else 0.0
            assert lp.grad[i, t].item() == pytest.approx(exp, abs=1e-6)
    # with GSPO's small clip range the sequence whose ratio leaves [1 - eps, 1 + eps] gets no gradient at all
    lp2 = T(LP, requires_grad=True)
    grpo_loss(lp2, T(OLD), T(ADV), T(MASK), importance_sampling="sequence", clip_eps_low=3e-4,
              clip_eps_high=4e-4)[0].backward()
    assert s[2] > 1 + 4e-4 and ADV[2] > 0
    assert lp2.grad[2].abs().max().item() == 0.0


def test_cispo_value_and_gradient():
    lp = T(LP, requires_grad=True)
    loss, met = grpo_loss(lp, T(OLD), T(ADV), T(MASK), objective="cispo", aggregation="bnpo", clip_eps_high=EH)
    vals, grads = [], {}
    clipped = 0
    for i in range(3):
        for t in range(4):
            if not MASK[i][t]:
                continue
            rho = math.exp(LP[i][t] - OLD[i][t])
            w = min(rho, 1 + EH)
            clipped += rho > 1 + EH and ADV[i] > 0
            vals.append(-w * ADV[i] * LP[i][t])
            grads[(i, t)] = -w * ADV[i] / 7
    assert clipped >= 1
    assert loss.item() == pytest.approx(sum(vals) / 7, abs=1e-6)
    assert met["cispo_clip_frac"].item() == pytest.approx(clipped / 7)
    loss.backward()
    for i in range(3):
        for t in range(4):
            assert lp.grad[i, t].item() == pytest.approx(grads.get((i, t), 0.0), abs=1e-6)


def test_delta_cap_and_kl_penalty_hand():
    lp, old = T([[0.0, -1.0]], requires_grad=True), T([[-math.log(5.0), -1.0]])
    adv = T([-1.0])
    loss, _ = grpo_loss(lp, old, adv, T([[1, 0]]), aggregation="bnpo", clip_eps_high=0.28)
    assert loss.item() == pytest.approx(5.0, abs=1e-5)  # -min(5 * -1, 1.28 * -1)
    loss, _ = grpo_loss(lp, old, adv, T([[1, 0]]), aggregation="bnpo", clip_eps_high=0.28, delta=2.0)
    assert loss.item() == pytest.approx(2.0, abs=1e-5)  # unclipped ratio capped at delta
    # KL to the reference with k3, beta = 0.1, first step (ratio 1)
    lp = T([[-1.0, -2.0]], requires_grad=True)
    ref = T([[-1.5, -1.0]])
    loss, met = grpo_loss(lp, lp.detach(), T([0.5]), T([[1, 1]]), aggregation="bnpo", beta=0.1, ref_logp=ref)
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert loss.item() == pytest.approx(sum(-0.5 + 0.1 * k for k in k3) / 2, abs=1e-6)
    assert met["kl"].item() == pytest.approx(sum(k3) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(lp, lp.detach(), T([0.5]), T([[1, 1]]), beta=0.1)


def test_ppo_policy_loss_hand_and_dual_clip():
    lp = T([[math.log(5.0), math.log(0.5), math.log(2.0), 0.0]], requires_grad=True)
    old = T([[0.0, 0.0, 0.0, 0.0]])
    adv = T([[-1.0, 2.0, 1.0, 3.0]])
    mask = T([[1, 1, 1, 0]])
    s, met = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    # token 0: -min(-5, -1.2) = 5 (A < 0, rho large: unclipped branch, not clipped);
    # token 1: -min(1.0, 0.8 * 2) = -1.0 (not clipped); token 2: -min(2, 1.2) = -1.2 (clipped); token 3 masked
    assert s.item() == pytest.approx(5.0 - 1.0 - 1.2, abs=1e-5)
    assert met["clip_frac"].item() == pytest.approx(1 / 3) and met["clip_frac/high"].item() == pytest.approx(1 / 3)
    assert met["clip_frac/low"].item() == 0.0
    s_hi, _ = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.5)
    assert s_hi.item() == pytest.approx(5.0 - 1.0 - 1.5, abs=1e-5)
    s, met = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    assert s.item() == pytest.approx(3.0 - 1.0 - 1.2, abs=1e-5)
    assert met["dual_clip_frac"].item() == pytest.approx(1 / 3)
    s.backward()
    assert lp.grad[0, 0].item() == 0.0  # dual-clipped: constant
    assert lp.grad[0, 1].item() == pytest.approx(-0.5 * 2.0, abs=1e-6)  # unclipped: -rho * A
    assert lp.grad[0, 2].item() == 0.0  # clipped


def test_value_loss_hand():
    v = T([[1.0, 0.45, 3.0]], requires_grad=True)
    s, met = value_loss(v, T([[0.5, 0.5, 0.0]]), T([[2.0, -1.0, 0.0]]), T([[1, 1, 0]]), clip_range=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: |0.45-0.5| < 0.2 so (1.45)^2 = 2.1025
    assert s.item() == pytest.approx(0.5 * 1.69 + 0.5 * 2.1025, abs=1e-6)
    assert met["vf_clip_frac"].item() == 0.5
    s2, _ = value_loss(v, T([[0.5, 0.5, 0.0]]), T([[2.0, -1.0, 0.0]]), T([[1, 1, 0]]), clip_range=None)
    assert s2.item() == pytest.approx(0.5 * 1.0 + 0.5 * 2.1025, abs=1e-6)


def test_kl_penalized_rewards_hand():
    lp = T([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    ref = T([[-1.5, -1.0, -0.1], [-0.1, 0.0, 0.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    r, kl = kl_penalized_rewards(T([1.0, 2.0]), lp, ref, mask, kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([-0.05, 0.1 + 1.0, 0.0], abs=1e-6)
    assert r[1].tolist() == pytest.approx([0.02 + 2.0, 0.0, 0.0], abs=1e-6)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0], abs=1e-6)
    dense = T([[0.5, 0.5, 9.0], [1.0, 9.0, 9.0]])
    r, _ = kl_penalized_rewards(dense, lp, ref, mask, kl_coef=0.0, estimator="k3")
    assert r.tolist() == [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------- issue 11 regressions
def test_kl_estimator_gradients_follow_the_documented_divergence():
    """Exact expectation over a 6-way categorical policy (samples held fixed, as in a policy-gradient step):
    k1's expected gradient is 0, k2's is grad KL(pi || ref), k3's is grad KL(ref || pi)."""
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    p = logp.exp().detach()
    reverse = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta, retain_graph=True)[0]
    forward = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta, retain_graph=True)[0]
    expected = {}
    for est in ("k1", "k2", "k3"):
        expected[est] = torch.autograd.grad((p * kl_estimate(logp, ref, est)).sum(), theta, retain_graph=True)[0]
    assert expected["k1"].abs().max() < 1e-12
    torch.testing.assert_close(expected["k2"], reverse, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected["k3"], forward, rtol=0, atol=1e-12)
    assert (expected["k3"] - reverse).abs().max() > 1e-2              # k3 is not the reverse KL's gradient
    # values: k1 and k3 are unbiased estimates of KL(pi || ref)
    kl = float((p * (logp - ref)).sum().detach())
    for est in ("k1", "k3"):
        assert float((p * kl_estimate(logp, ref, est)).sum().detach()) == pytest.approx(kl, abs=1e-12)


def test_grpo_config_refuses_k1_as_a_loss_term():
    from llm_trainer.configs import GRPOConfig
    with pytest.raises(ValueError, match="k1.*expected gradient"):
        GRPOConfig(kl_estimator="k1", loss_beta=0.04)
    GRPOConfig(kl_estimator="k1", loss_beta=0.0)                        # no KL term: nothing to refuse
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards="batch").scale_rewards == "batch"
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOConfig(scale_rewards="rows")


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e30])
def test_masked_slots_influence_neither_value_nor_gradient(junk):
    """Junk in padded slots of any input (log-probs, old/ref log-probs, advantages, values) leaves the loss and its
    gradient equal to the clean inputs' ones."""
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    clean = {"lp": T([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]), "old": T([[-1.1, -1.9, 0.0], [-0.4, 0.0, 0.0]]),
             "ref": T([[-1.2, -2.2, 0.0], [-0.6, 0.0, 0.0]]), "adv": T([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]),
             "v": T([[0.3, 0.1, 0.0], [0.2, 0.0, 0.0]]), "ret": T([[1.0, -1.0, 0.0], [0.5, 0.0, 0.0]])}
    dirty = {k: torch.where(mask.bool(), v, torch.full_like(v, junk)) for k, v in clean.items()}

    def losses(x):
        lp = x["lp"].clone().requires_grad_(True)
        v = x["v"].clone().requires_grad_(True)
        out = []
        for agg in ("grpo", "bnpo", "dr_grpo", "dapo"):
            out.append(grpo_loss(lp, x["old"], x["adv"], mask, aggregation=agg, max_completion_length=3,
                                 beta=0.1, ref_logp=x["ref"])[0])
        out.append(grpo_loss(lp, x["old"], x["adv"], mask, objective="cispo", aggregation="dapo")[0])
        out.append(grpo_loss(lp, x["old"], x["adv"], mask, importance_sampling="sequence")[0])
        out.append(ppo_policy_loss(lp, x["old"], x["adv"], mask, dual_clip=3.0)[0])
        out.append(value_loss(v, x["v"] * 0.5, x["ret"], mask, clip_range=0.2, huber_delta=1.0)[0])
        total = sum(out)
        total.backward()
        return torch.stack([o.detach() for o in out]), lp.grad, v.grad

    for a, b in zip(losses(clean), losses(dirty)):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_whitening_with_moments_equals_masked_whiten_and_spans_micro_batches():
    from llm_trainer.losses import masked_moments, whiten_with_moments
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g) * 3 + 1
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    for shift in (True, False):
        want = masked_whiten(x, mask, shift_mean=shift)
        got = whiten_with_moments(x, mask, masked_moments(x, mask), shift_mean=shift)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # two micro-batches, moments added: the same as whitening the concatenation
        parts = [(x[:2], mask[:2]), (x[2:], mask[2:])]
        moments = sum(masked_moments(a, m) for a, m in parts)
        joined = torch.cat([whiten_with_moments(a, m, moments, shift_mean=shift) for a, m in parts])
        torch.testing.assert_close(joined, want, rtol=1e-5, atol=1e-6)
    # scale only keeps the mean: (r - mu)/sigma + mu, as trl's masked_whiten(shift_mean=False)
    w = whiten_with_moments(x, mask, masked_moments(x, mask), shift_mean=False)
    assert float(masked_mean(w, mask)) == pytest.approx(float(masked_mean(x, mask)), abs=1e-5)
