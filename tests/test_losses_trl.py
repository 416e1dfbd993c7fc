"""Cross-check our preference and distillation losses once against trl's own implementations, on fixed
log-probs. trl has no standalone DPO loss function: we run ``DPOTrainer._compute_loss`` unbound with a stub
trainer and a stub model that returns fixed per-token log-probs (no real model, no tokenizer)."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from llm_trainer.losses import (  # noqa: E402
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kd_divergence,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

# Two pairs; per-token log-probs of chosen (rows 0, 1) and rejected (rows 2, 3) over 5 shifted positions.
# Completion mask (unshifted, length 6; position 0 is prompt): lengths 4, 2, 3, 5.
MASK = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
TOK = torch.tensor([[-0.5, -1.0, -0.25, -2.0, 0.0], [0.0, 0.0, 0.0, -3.0, -0.5],
                    [-1.5, -0.5, -2.0, 0.0, 0.0], [-0.2, -0.4, -0.6, -0.8, -1.0]])
REF_TOK = torch.tensor([[-0.6, -0.9, -0.5, -1.5, 0.0], [0.0, 0.0, 0.0, -2.0, -1.0],
                        [-1.0, -1.0, -1.0, 0.0, 0.0], [-0.3, -0.3, -0.3, -0.3, -0.3]])


def _seq(tok):
    s = tok.sum(1)
    return s[:2], s[2:]


def _lengths():
    n = MASK.sum(1)
    return n[:2], n[2:]


def _trl_dpo(loss_type, beta, label_smoothing=0.0):
    from trl.trainer.dpo_trainer import DPOTrainer

    class _Acc:
        device = torch.device("cpu")

        @staticmethod
        def gather_for_metrics(x):
            return x

        @staticmethod
        def gather(x):
            return x

    model = SimpleNamespace(training=True)
    stub = SimpleNamespace(
        model=model, accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )

    def fake_model(**kw):
        z = torch.zeros_like(TOK)
        return SimpleNamespace(log_probs=TOK, entropy=z, mean_logits=z, is_top1=z.bool())

    ref_c, ref_r = _seq(REF_TOK)
    inputs = {"input_ids": torch.ones_like(MASK), "attention_mask": torch.ones_like(MASK), "completion_mask": MASK,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(stub, fake_model, inputs, False)


def _ours(fn, **kw):
    (pc, pr), (rc, rr) = _seq(TOK), _seq(REF_TOK)
    return fn(pc, pr, rc, rr, **kw).losses.mean()


def test_dpo_matches_trl():
    ours = _ours(dpo_loss, beta=0.3)
    assert ours.item() == pytest.approx(_trl_dpo("sigmoid", 0.3).item(), abs=1e-6)


def test_robust_matches_trl():
    ours = _ours(robust_dpo_loss, beta=0.3, label_smoothing=0.2)
    assert ours.item() == pytest.approx(_trl_dpo("robust", 0.3, 0.2).item(), abs=1e-6)


def test_hinge_matches_trl():
    ours = _ours(hinge_loss, beta=0.3)
    assert ours.item() == pytest.approx(_trl_dpo("hinge", 0.3).item(), abs=1e-6)


def test_ipo_matches_trl():
    (pc, pr), (rc, rr), (lc, lr) = _seq(TOK), _seq(REF_TOK), _lengths()
    ours = ipo_loss(pc, pr, rc, rr, lc, lr, beta=0.3).losses.mean()
    assert ours.item() == pytest.approx(_trl_dpo("ipo", 0.3).item(), abs=1e-6)


def _cpo_stub(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.0):
    return SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                           simpo_gamma=simpo_gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))


def test_conservative_dpo_matches_trl_cpo_sigmoid_on_log_ratios():
    # trl 1.16's DPOTrainer has no cDPO branch; CPO's "sigmoid" loss with label smoothing applied to the
    # log-ratios (pi - ref) is exactly cDPO.
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    (pc, pr), (rc, rr) = _seq(TOK), _seq(REF_TOK)
    trl_losses, _, _ = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", 0.3, 0.15), pc - rc, pr - rr)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.15).losses
    torch.testing.assert_close(ours, trl_losses, rtol=0, atol=1e-6)


def test_simpo_matches_trl_cpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    (pc, pr), (lc, lr) = _seq(TOK), _lengths()
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(_cpo_stub("simpo", 2.0, 0.0, 0.7), pc / lc, pr / lr)
    ours = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.7)
    torch.testing.assert_close(ours.losses, trl_losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, trl_c, rtol=0, atol=1e-6)


def test_orpo_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    (pc, pr), (lc, lr) = _seq(TOK), _lengths()
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_c, _, _, _ = ORPOTrainer.odds_ratio_loss(stub, pc / lc, pr / lr)
    ours = orpo_loss(pc, pr, lc, lr, beta=0.25)
    # trl returns +beta * log sigma(log odds) and subtracts it from the NLL; ours is the positive loss term
    torch.testing.assert_close(ours.losses, -trl_losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, trl_c, rtol=0, atol=1e-6)


def test_bradley_terry_matches_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    scores = torch.tensor([[1.5], [-0.5], [0.2], [0.3]])  # chosen rows 0-1, rejected rows 2-3
    margin = torch.tensor([0.4, 0.0])
    stub = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
                           _metrics={"eval": defaultdict(list)}, _total_train_tokens=0,
                           accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x))

    def fake_model(**kw):
        return SimpleNamespace(logits=scores)

    trl_loss = RewardTrainer.compute_loss(stub, fake_model, {"margin": margin, "attention_mask": torch.ones(4, 2)})
    ours = bradley_terry_loss(scores[:2, 0], scores[2:, 0], margin).mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_generalised_jsd_matches_trl_gkd(beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    trl_sum = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.0, reduction="sum")
    ours = kd_divergence(s, t, "jsd", beta=beta)[labels != -100].sum()
    assert ours.item() == pytest.approx(trl_sum.item(), rel=1e-5, abs=1e-6)
    assert math.isfinite(ours.item())
