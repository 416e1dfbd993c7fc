"""Oracle: the GRPO-family loss (:func:`grpo_loss` summed over :func:`grpo_units`) and the PPO clipped surrogate
against trl 1.16's own ``GRPOTrainer._compute_loss``, values and gradients w.r.t. the per-token log-probs.

trl has no standalone GRPO loss function, so ``_compute_loss`` runs unbound on a stub ``self`` whose
``_get_per_token_logps_and_entropies`` returns a fixed leaf tensor of per-token log-probs (no model, no tokenizer,
no accelerate state): everything from the importance ratio to the aggregation is trl's code.

Intended differences from trl (docs/rl.md "Loss aggregation", ``grpo_loss``'s docstring), asserted here rather
than hidden:
* CISPO: our cap is ``1 + clip_eps_high``, trl's ``epsilon_high`` is the absolute cap.
* ``grpo`` normalises by the sequences with >= 1 loss token of the whole accumulation window; trl takes the mean of
  per-micro-batch means that also count fully masked rows. ``dr_grpo`` divides by the window's sequences; trl
  averages per-micro-batch ``sum / (B * L)``. Both agree with trl when the micro-batches are equal and have no
  empty rows.
* Padded slots: ours receives NaN junk there and must stay finite (value and gradient); trl receives zeros.

trl 1.16 no longer ships a PPO trainer (``trl.experimental.ppo`` is gone). The PPO surrogate is checked against
``_compute_loss(loss_type="dapo")`` with token-level advantages ``[B, T]`` (a path trl supports for subclasses),
which is exactly PPO's per-token clipped objective averaged over tokens. trl 1.16 has no value loss and no dual
clip to compare with.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", minversion="1.16", reason="trl >= 1.16 (a test-only oracle) is not importable")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl's GRPOTrainer is not importable")

from llm_trainer.losses import GRPO_LOSS_TYPES, grpo_loss, grpo_units, ppo_policy_loss  # noqa: E402

EPS_LOW, EPS_HIGH, DELTA, BETA = 0.2, 0.28, 1.3, 0.04
CISPO_EPS_HIGH = 0.5                      # our cap 1.5 == trl epsilon_high 1.5
T = 7                                     # completion length (also max_completion_length for dr_grpo)
LENGTHS = [7, 4, 1, 5, 3, 6, 2, 7]        # right padding; full-length rows and a one-token row
HOLES = [(0, 2), (3, 1)]                  # interior holes in the loss mask (tool output)
EMPTY_ROW_LENGTHS = [7, 4, 0, 5, 3, 6]    # row 2 has no completion token


class _Accelerator:
    """What ``_compute_loss`` touches on ``self.accelerator`` with one process."""
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _trl_loss(loss_type, logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, eps_low=EPS_LOW,
              eps_high=EPS_HIGH, delta=None, is_level="token", accumulation=1, window_tokens=None):
    """trl's loss of one micro-batch in train mode. ``accumulation`` micro-batches make one optimizer step and one
    generation batch (``steps_per_generation == gradient_accumulation_steps``, trl's default), so summing the
    returned losses over the window gives trl's accumulated loss; ``window_tokens`` is trl's
    ``num_items_in_batch`` (loss tokens of the generation batch)."""
    b, t = mask.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=is_level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=t, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=accumulation),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old_logp,
        "num_items_in_batch": torch.tensor(float(mask.sum() if window_tokens is None else window_tokens)),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref_logp
    return grpo_trainer.GRPOTrainer._compute_loss(stub, None, inputs)


# Per-row mean log-ratio and advantage sign, so that at token AND sequence (GSPO) level some rows are clipped high
# with A > 0, capped by delta with A < 0, clipped low with A < 0, and inside the clip range
# (test_inputs_exercise_every_branch checks it).
ROW_SHIFT = [0.9, 0.9, 0.0, -0.9, 0.0, 0.9, 0.0, -0.9]
ADV_SIGN = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]


def _batch(lengths, seed, holes=()):
    """Log-probs with ratios well outside the clip range, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    for r, c in holes:
        mask[r, c] = 0.0
    old = -0.05 - 3.0 * torch.rand(b, T, generator=g)
    shift = torch.tensor(ROW_SHIFT[:b])[:, None] + 0.1 * torch.randn(b, 1, generator=g)
    noise = 0.6 * torch.randn(b, T, generator=g)
    noise = noise - (noise * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    logp = old + shift + noise                            # the row's mean log-ratio over its mask is `shift`
    ref = old + 0.4 * torch.randn(b, T, generator=g)
    adv = torch.tensor(ADV_SIGN[:b]) * (0.3 + torch.randn(b, generator=g).abs())
    return SimpleNamespace(mask=mask, logp=logp, old=old, ref=ref, adv=adv)


def _junk(x, mask):
    return torch.where(mask.bool(), x, torch.full_like(x, float("nan")))


def _clean(x, mask):
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _ours_sum(loss_type, d, *, is_level="token", beta=0.0, delta=None, eps_high=EPS_HIGH):
    """Our loss sum of one micro-batch on NaN-padded inputs → ``(loss_sum, units, logp leaf)``."""
    objective, aggregation = GRPO_LOSS_TYPES[loss_type]
    leaf = _junk(d.logp, d.mask).requires_grad_()
    loss, _ = grpo_loss(leaf, _junk(d.old, d.mask), d.adv, d.mask, aggregation=aggregation, objective=objective,
                        clip_eps_low=EPS_LOW, clip_eps_high=eps_high, delta=delta, importance_sampling=is_level,
                        ref_logp=_junk(d.ref, d.mask), beta=beta, kl_estimator="k3", max_completion_length=T)
    return loss, grpo_units(d.mask, aggregation), leaf


def _trl(loss_type, d, *, is_level="token", beta=0.0, delta=None, eps_high=EPS_HIGH, **kw):
    """trl's loss of one micro-batch on cleanly padded inputs → ``(loss, logp leaf)``."""
    leaf = _clean(d.logp, d.mask).requires_grad_()
    trl_eps_high = 1.0 + eps_high if loss_type == "cispo" else eps_high
    loss = _trl_loss(loss_type, leaf, _clean(d.old, d.mask), d.adv, d.mask, ref_logp=_clean(d.ref, d.mask),
                     beta=beta, eps_high=trl_eps_high, delta=delta, is_level=is_level, **kw)
    return loss, leaf


def _grad(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


def _loss_cases():
    for loss_type in GRPO_LOSS_TYPES:
        for is_level in ("token", "sequence"):
            for beta in (0.0, BETA):
                for delta in ((None,) if loss_type == "cispo" else (None, DELTA)):
                    yield pytest.param(loss_type, is_level, beta, delta,
                                       id=f"{loss_type}-{is_level}-beta{beta}-delta{delta}")


def test_inputs_exercise_every_branch():
    """The fixed inputs reach the lower and upper clip, the delta cap and the CISPO cap, at token and at sequence
    level, so the comparisons below cannot pass on an inactive branch."""
    for seed in range(6):
        _assert_every_branch(_batch(LENGTHS, seed, HOLES))
        _assert_every_branch(_batch(EMPTY_ROW_LENGTHS, seed, HOLES))


def _assert_every_branch(d):
    m = d.mask.bool()
    a = d.adv[:, None].expand_as(d.logp)
    log_r = d.logp - d.old
    seq_r = ((log_r * d.mask).sum(-1) / d.mask.sum(-1).clamp(min=1)).exp()[:, None].expand_as(d.logp)
    for r in (log_r.exp(), seq_r):
        assert ((r < 1 - EPS_LOW) & (a < 0) & m).any()
        assert ((r > 1 + EPS_HIGH) & (a > 0) & m).any()
        assert ((r > DELTA) & (a < 0) & m).any()
        assert ((r > 1 + CISPO_EPS_HIGH) & (a > 0) & m).any()
        assert ((r > 1 - EPS_LOW) & (r < 1 + EPS_HIGH) & m).any()   # and some tokens are not clipped


@pytest.mark.parametrize("loss_type,is_level,beta,delta", list(_loss_cases()))
def test_micro_batch_loss_matches_trl(loss_type, is_level, beta, delta):
    """One micro-batch: ``grpo_loss / grpo_units`` equals trl's loss, value and gradient; ours receives NaN in the
    padded slots and its loss and gradient stay finite there (gradient exactly 0)."""
    eps_high = CISPO_EPS_HIGH if loss_type == "cispo" else EPS_HIGH
    for seed in range(3):
        d = _batch(LENGTHS, seed, HOLES)
        s, units, ours_leaf = _ours_sum(loss_type, d, is_level=is_level, beta=beta, delta=delta, eps_high=eps_high)
        ours = s / units
        theirs, trl_leaf = _trl(loss_type, d, is_level=is_level, beta=beta, delta=delta, eps_high=eps_high)
        g_ours, g_trl = _grad(ours, ours_leaf), _grad(theirs, trl_leaf)
        assert torch.isfinite(ours) and torch.isfinite(g_ours).all()
        assert (g_ours[~d.mask.bool()] == 0).all()
        _close(ours, theirs)
        _close(g_ours, g_trl)


@pytest.mark.parametrize("loss_type", list(GRPO_LOSS_TYPES))
def test_zero_length_completion_row(loss_type):
    """A row with no loss token (all NaN for us). bnpo, dr_grpo, dapo, cispo: equal to trl. grpo: trl's mean over
    the rows counts the empty row, ours counts only sequences with a loss token (documented difference), so
    ours = trl * B / (non-empty rows) exactly, values and gradients."""
    lengths = EMPTY_ROW_LENGTHS
    eps_high = CISPO_EPS_HIGH if loss_type == "cispo" else EPS_HIGH
    delta = None if loss_type == "cispo" else DELTA
    for is_level in ("token", "sequence"):
        d = _batch(lengths, 5, HOLES)
        s, units, ours_leaf = _ours_sum(loss_type, d, is_level=is_level, beta=BETA, delta=delta, eps_high=eps_high)
        ours = s / units
        theirs, trl_leaf = _trl(loss_type, d, is_level=is_level, beta=BETA, delta=delta, eps_high=eps_high)
        g_ours, g_trl = _grad(ours, ours_leaf), _grad(theirs, trl_leaf)
        assert torch.isfinite(ours) and torch.isfinite(g_ours).all() and (g_ours[2] == 0).all()
        scale = 1.0
        if loss_type == "grpo":
            assert units == len(lengths) - 1
            scale = len(lengths) / units
            assert abs(ours.item() - theirs.item()) > 1e-3      # the difference is real, not within tolerance
        _close(ours, theirs * scale)
        _close(g_ours, g_trl * scale)


def _window(loss_type, parts, *, beta=BETA, is_level="token"):
    """One accumulation window of micro-batches: ours = sum of the micro-batch sums / the window's units, trl =
    the sum of its per-micro-batch losses (each already scaled for accumulation). Returns values and the
    gradients w.r.t. every micro-batch's log-probs, concatenated."""
    eps_high = CISPO_EPS_HIGH if loss_type == "cispo" else EPS_HIGH
    delta = None if loss_type == "cispo" else DELTA
    tokens = sum(float(d.mask.sum()) for d in parts)
    ours_out = [_ours_sum(loss_type, d, is_level=is_level, beta=beta, delta=delta, eps_high=eps_high) for d in parts]
    trl_out = [_trl(loss_type, d, is_level=is_level, beta=beta, delta=delta, eps_high=eps_high,
                    accumulation=len(parts), window_tokens=tokens) for d in parts]
    ours = sum(o[0] for o in ours_out) / sum(o[1] for o in ours_out)
    theirs = sum(o[0] for o in trl_out)
    g_ours = torch.cat(torch.autograd.grad(ours, [o[2] for o in ours_out]))
    g_trl = torch.cat(torch.autograd.grad(theirs, [o[1] for o in trl_out]))
    return ours, theirs, g_ours, g_trl


def _split(lengths, sizes, seed):
    d = _batch(lengths, seed, HOLES)
    out, start = [], 0
    for n in sizes:
        out.append(SimpleNamespace(**{k: v[start:start + n] for k, v in vars(d).items()}))
        start += n
    return d, out


@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(GRPO_LOSS_TYPES))
def test_window_of_equal_micro_batches_matches_trl(loss_type, is_level):
    """Two micro-batches of 4 sequences (no empty row): every loss type agrees with trl's accumulation."""
    for seed in range(2):
        _, parts = _split(LENGTHS, [4, 4], seed)
        ours, theirs, g_ours, g_trl = _window(loss_type, parts, is_level=is_level)
        _close(ours, theirs)
        _close(g_ours, g_trl)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo", "cispo"])
def test_window_of_unequal_micro_batches_matches_trl(loss_type):
    """Micro-batches of 4 and 2 sequences, one with an empty row: bnpo (mean of micro-batch token means), dapo and
    cispo (window token mean) still agree with trl."""
    _, parts = _split(EMPTY_ROW_LENGTHS, [4, 2], 3)
    ours, theirs, g_ours, g_trl = _window(loss_type, parts)
    _close(ours, theirs)
    _close(g_ours, g_trl)


def _clip_per_token(d):
    """-min(rho A, clip(rho) A) with rho' = min(rho, delta), written out independently (beta = 0, token IS)."""
    r = torch.exp(_clean(d.logp, d.mask) - _clean(d.old, d.mask))
    a = d.adv[:, None]
    return -torch.minimum(torch.clamp(r, max=DELTA) * a, torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH) * a)


def test_grpo_window_of_unequal_micro_batches_is_the_mean_over_sequences():
    """Documented difference: with micro-batches of 4 and 2 sequences (one empty), ours is the mean over the
    window's sequences with >= 1 loss token of their token means; trl is the mean of the two micro-batch means,
    each dividing by all its rows."""
    full, parts = _split(EMPTY_ROW_LENGTHS, [4, 2], 3)
    ours, theirs, _, _ = _window("grpo", parts, beta=0.0)
    seq_mean = (_clip_per_token(full) * full.mask).sum(-1) / full.mask.sum(-1).clamp(min=1)
    has_tokens = full.mask.sum(-1) > 0
    assert ours.item() == pytest.approx(seq_mean[has_tokens].mean().item(), rel=1e-5, abs=1e-6)
    assert theirs.item() == pytest.approx((seq_mean[:4].mean() + seq_mean[4:].mean()).item() / 2, rel=1e-5,
                                          abs=1e-6)
    assert abs(ours.item() - theirs.item()) > 1e-2


def test_dr_grpo_window_of_unequal_micro_batches_divides_by_the_window_sequences():
    """Documented difference: ours is sum l / (S * L) over the window's S sequences; trl averages the micro-batches'
    sum l / (B * L)."""
    full, parts = _split([7, 4, 2, 5, 3, 6], [4, 2], 4)
    ours, theirs, _, _ = _window("dr_grpo", parts, beta=0.0)
    tok = _clip_per_token(full) * full.mask
    assert ours.item() == pytest.approx(tok.sum().item() / (6 * T), rel=1e-5, abs=1e-6)
    trl_hand = (tok[:4].sum() / (4 * T) + tok[4:].sum() / (2 * T)) / 2
    assert theirs.item() == pytest.approx(trl_hand.item(), rel=1e-5, abs=1e-6)
    assert abs(ours.item() - theirs.item()) > 1e-3


def test_ppo_policy_loss_matches_trl_token_level_surrogate():
    """PPO's clipped surrogate with per-token (GAE-style) advantages and clip-higher, summed over tokens and
    divided by the tokens, equals trl's dapo loss with advantages [B, T] (values and gradients); ours receives
    NaN junk in padded slots of log-probs and advantages."""
    for seed in range(3):
        d = _batch(LENGTHS, seed, HOLES)
        adv = torch.randn(d.mask.shape, generator=torch.Generator().manual_seed(100 + seed))
        leaf = _junk(d.logp, d.mask).requires_grad_()
        s, _ = ppo_policy_loss(leaf, _junk(d.old, d.mask), _junk(adv, d.mask), d.mask, clip_eps=EPS_LOW,
                               clip_eps_high=EPS_HIGH)
        ours = s / d.mask.sum()
        trl_leaf = _clean(d.logp, d.mask).requires_grad_()
        theirs = _trl_loss("dapo", trl_leaf, _clean(d.old, d.mask), _clean(adv, d.mask), d.mask)
        g_ours = _grad(ours, leaf)
        assert torch.isfinite(g_ours).all() and (g_ours[~d.mask.bool()] == 0).all()
        _close(ours, theirs)
        _close(g_ours, _grad(theirs, trl_leaf))
