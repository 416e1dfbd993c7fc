"""LM losses: CE, critical-token weights, chunked CE (value + gradient), KD, token log-probs, entropy.

Expected numbers are literals or plain-Python ``math`` (no call into the code under test)."""
import math

import pytest
import torch
import torch.nn.functional as F

from llm_trainer.losses import (
    chunked_lm_kd_loss,
    chunked_lm_loss,
    chunked_token_logps,
    critical_token_weights,
    entropy_from_logits,
    kd_divergence,
    kd_loss,
    lm_loss,
    shift_labels,
    token_logps,
)

ROWS = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]


def _lse(v):
    return math.log(sum(math.exp(x) for x in v))


def _softmax(v, tau=1.0):
    z = [x / tau for x in v]
    s = _lse(z)
    return [math.exp(x - s) for x in z]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def test_shift_labels():
    lab = torch.tensor([[5, 6, 7], [1, -100, 2]])
    assert shift_labels(lab).tolist() == [[6, 7, -100], [-100, 2, -100]]


def test_lm_loss_hand_values():
    logits = torch.tensor([ROWS[:3]])
    s, n = lm_loss(logits, torch.tensor([[0, 2, 1]]))  # targets after shift: 2, 1, (ignored)
    assert n.item() == 2 and n.dtype == torch.long
    assert s.item() == pytest.approx(0.40760596444438013 + 1.0986122886681098, abs=1e-6)
    s, n = lm_loss(logits, torch.tensor([[0, -100, 1]]))  # first target ignored
    assert n.item() == 1 and s.item() == pytest.approx(1.0986122886681098, abs=1e-6)
    # shift=False: labels already aligned with the logits
    s, n = lm_loss(logits, torch.tensor([[2, 1, -100]]), shift=False)
    assert n.item() == 2 and s.item() == pytest.approx(1.50621825311249, abs=1e-6)


def test_critical_token_weights_by_hand():
    labels = torch.tensor([[0, 2, 1, 2]])
    w = critical_token_weights(labels, [2], 3.0)
    assert w.tolist() == [[1.0, 3.0, 1.0, 3.0]]
    assert critical_token_weights(labels, torch.tensor([1, 2]), 0.5).tolist() == [[1.0, 0.5, 0.5, 0.5]]
    logits = torch.tensor([ROWS])
    s, n = lm_loss(logits, labels, token_weights=w)
    # shifted targets 2, 1, 2 with weights 3, 1, 3; normaliser = token count (3), not weight sum
    ce = [_lse(r) - r[t] for r, t in zip(ROWS, [2, 1, 2])]
    assert s.item() == pytest.approx(3 * ce[0] + ce[1] + 3 * ce[2], abs=1e-5)
    assert s.item() == pytest.approx(11.830968240670106, abs=1e-5)
    assert n.item() == 3
    s1, n1 = lm_loss(logits, labels)
    assert s1.item() == pytest.approx(sum(ce), abs=1e-5) and n1.item() == 3


def _rand_case(seed, b=2, s=7, h=8, v=50, with_bias=True, n_ignore=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (b, s), generator=g)
    labels.view(-1)[torch.randperm(b * s, generator=g)[:n_ignore]] = -100
    return hidden, w, bias, labels


def _grads(loss, tensors):
    ts = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_ce_equals_plain_value_and_grad(chunk_size, with_bias, weighted):
    hidden, w, bias, labels = _rand_case(0, with_bias=with_bias)
    tw = critical_token_weights(labels, [3, 7, 11], 2.5) if weighted else None
    ref_s, ref_n = lm_loss(F.linear(hidden, w, bias), labels, token_weights=tw)
    ref_g = _grads(ref_s, [hidden, w, bias])
    s, n = chunked_lm_loss(hidden, w, labels, chunk_size, bias=bias, token_weights=tw)
    g = _grads(s, [hidden, w, bias])
    assert n.item() == ref_n.item()
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_ce_zero_valid_tokens_keeps_graph():
    hidden, w, bias, labels = _rand_case(1)
    labels = torch.full_like(labels, -100)
    labels[:, 0] = 4  # position 0 is never a target after the shift: still zero valid targets
    s, n = chunked_lm_loss(hidden, w, labels, 4, bias=bias)
    assert n.item() == 0 and s.item() == 0.0 and s.requires_grad
    g = _grads(s, [hidden, w, bias])
    ref_s, ref_n = lm_loss(F.linear(hidden, w, bias), labels)
    assert ref_n.item() == 0 and ref_s.item() == 0.0
    for a, t in zip(g, [hidden, w, bias]):
        assert a.shape == t.shape and torch.count_nonzero(a) == 0


def test_chunked_ce_keeps_no_full_logits_for_backward():
    """Nothing of size [n_valid, V] may be saved for backward outside the per-chunk checkpoints."""
    hidden, w, bias, labels = _rand_case(2, b=2, s=16, h=2, v=64, n_ignore=0)
    n_valid = 2 * 15
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, _ = chunked_lm_loss(hidden, w, labels, chunk_size=4, bias=bias)
    assert max(sizes) < 4 * 64  # not even one chunk of logits: only hidden/weight-sized tensors
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(F.linear(hidden, w, bias), labels)
    assert max(sizes) >= n_valid * 64  # the plain path does keep full logits
    s.backward()  # recomputation works


def test_kd_hand_values():
    st = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    te = [[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]
    sl, tl = torch.tensor([st]), torch.tensor([te])
    for tau in (1.0, 2.0):
        ps = [_softmax(r, tau) for r in st]
        pt = [_softmax(r, tau) for r in te]
        fwd = [_kl(t, s) * tau * tau for s, t in zip(ps, pt)]
        rev = [_kl(s, t) * tau * tau for s, t in zip(ps, pt)]
        beta = 0.3
        jsd = []
        for s, t in zip(ps, pt):
            mix = [beta * a + (1 - beta) * b for a, b in zip(t, s)]
            jsd.append((beta * _kl(t, mix) + (1 - beta) * _kl(s, mix)) * tau * tau)
        for kind, exp in (("forward_kl", fwd), ("reverse_kl", rev), ("jsd", jsd)):
            d = kd_divergence(sl, tl, kind, beta=beta, temperature=tau)[0]
            assert d.tolist() == pytest.approx(exp, abs=1e-6), kind
        # masked: labels aligned with inputs; shifted target of position 0 is ignored, of position 1 ... none
        s, n = kd_loss(sl, tl, torch.tensor([[7, 1]]), kind="forward_kl", temperature=tau)
        assert n.item() == 1 and s.item() == pytest.approx(fwd[0], abs=1e-6)
        s, n = kd_loss(sl, tl, None, kind="reverse_kl", temperature=tau)
        assert n.item() == 2 and s.item() == pytest.approx(sum(rev), abs=1e-6)
    # endpoints of the generalised JSD are the scaled limits (GKD / trl convention)
    assert kd_divergence(sl, tl, "jsd", beta=0.0).tolist() == kd_divergence(sl, tl, "forward_kl").tolist()
    assert kd_divergence(sl, tl, "jsd", beta=1.0).tolist() == kd_divergence(sl, tl, "reverse_kl").tolist()
    # identical distributions: zero divergence
    assert kd_divergence(sl, sl, "jsd").abs().max().item() < 1e-6


def test_kd_handles_masked_vocab_and_no_teacher_grad():
    st = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    te = torch.tensor([[0.0, float("-inf"), 1.0]], requires_grad=True)
    d = kd_divergence(st, te, "forward_kl")
    pt = [1 / (1 + math.e), 0.0, math.e / (1 + math.e)]
    ps = _softmax([0.0, 1.0, 2.0])
    assert d.item() == pytest.approx(_kl(pt, ps), abs=1e-6)
    d.sum().backward()
    assert te.grad is None and torch.isfinite(st.grad).all()


@pytest.mark.parametrize("teacher_mode", ["logits", "hidden"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_lm_kd_equals_plain(teacher_mode, kind):
    hidden, w, bias, labels = _rand_case(3)
    g = torch.Generator().manual_seed(9)
    th = torch.randn(2, 7, 5, generator=g)
    tw = torch.randn(50, 5, generator=g)
    t_logits = F.linear(th, tw)
    logits = F.linear(hidden, w, bias)
    ce_ref, n_ref = lm_loss(logits, labels)
    kd_ref, _ = kd_loss(logits, t_logits, labels, kind=kind, beta=0.4, temperature=1.5)
    ref = 0.3 * ce_ref + 0.7 * kd_ref
    ref_g = _grads(ref, [hidden, w, bias])
    teacher = {"teacher_logits": t_logits} if teacher_mode == "logits" else {
        "teacher_hidden": th, "teacher_lm_head_weight": tw}
    ce, kd, n = chunked_lm_kd_loss(hidden, w, labels, **teacher, kind=kind, beta=0.4, temperature=1.5,
                                   chunk_size=3, bias=bias)
    assert n.item() == n_ref.item()
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
    got_g = _grads(0.3 * ce + 0.7 * kd, [hidden, w, bias])
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_logps_hand_and_chunked():
    logits = torch.tensor([ROWS[:3]])
    lp, mask = token_logps(logits, torch.tensor([[0, 2, 1]]))
    assert mask.tolist() == [[True, True, False]]
    assert lp[0].tolist() == pytest.approx([-0.40760596444438013, -1.0986122886681098, 0.0], abs=1e-6)
    lp2, _ = token_logps(logits, torch.tensor([[0, 2, 1]]), temperature=2.0)
    assert lp2[0, 0].item() == pytest.approx(1.5 - _lse([0.5, 1.0, 1.5]), abs=1e-6)

    hidden, w, bias, labels = _rand_case(4)
    ref_lp, ref_mask = token_logps(F.linear(hidden, w, bias), labels, temperature=0.7)
    ref_ent = entropy_from_logits(F.linear(hidden, w, bias) / 0.7, ref_mask)
    ref_g = _grads(ref_lp.sum(), [hidden, w, bias])
    lp, ent, mask = chunked_token_logps(hidden, w, labels, chunk_size=3, bias=bias, temperature=0.7,
                                        return_entropy=True)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(lp.sum(), [hidden, w, bias]), ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_entropy_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -math.inf, -math.inf]])
    ent = entropy_from_logits(logits)
    # uniform over 4 -> ln 4; (3/4, 1/4) -> -(.75 ln .75 + .25 ln .25)
    assert ent.tolist()[0] == pytest.approx(math.log(4), abs=1e-6)
    assert ent.tolist()[1] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-6)
    ent_m = entropy_from_logits(logits[:1].expand(3, 4).reshape(1, 3, 4), torch.tensor([[1, 0, 1]]), chunk_size=2)
    assert ent_m[0].tolist() == pytest.approx([math.log(4), 0.0, math.log(4)], abs=1e-6)
