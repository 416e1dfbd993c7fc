import math
import warnings

import pytest
import torch

from llm_trainer.configs import OptimConfig
from llm_trainer.scheduler import Schedule, WarmupCosineScheduler, lr_at, schedule_preview


def cfg(**kw):
    base = dict(initial_lr=1e-4, max_lr=1e-3, min_lr=1e-5, warmup_iters=4, enable_lr_scheduler=True,
                cosine_annealing_period=8, cosine_annealing_period_mul=0)
    base.update(kw)
    return OptimConfig(**base)


def cos(t, T, hi=1e-3, lo=1e-5):
    return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * t / T))


def test_warmup_values_by_hand():
    lrs = schedule_preview(cfg(), 20)
    assert lrs[:5] == pytest.approx([1e-4, 3.25e-4, 5.5e-4, 7.75e-4, 1e-3])  # update 0 uses initial_lr


def test_single_cycle_then_min():
    lrs = schedule_preview(cfg(), 20)
    assert lrs[4 + 4] == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through the cosine
    assert lrs[4 + 2] == pytest.approx(cos(2, 8))
    assert lrs[4 + 8:] == pytest.approx([1e-5] * 8)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_equal_restarts():
    lrs = schedule_preview(cfg(cosine_annealing_period_mul=1), 4 + 24)
    for k in range(3):
        assert lrs[4 + 8 * k] == pytest.approx(1e-3)
        assert lrs[4 + 8 * k + 3] == pytest.approx(cos(3, 8))


def test_doubling_restarts_sgdr():
    lrs = schedule_preview(cfg(warmup_iters=0, cosine_annealing_period_mul=2), 8 + 16 + 32 + 1)
    starts = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]]
    assert starts == [8, 24, 56]  # cycles of 8, 16, 32
    assert lrs[8 + 8] == pytest.approx(cos(8, 16))
    assert lrs[24 + 8] == pytest.approx(cos(8, 32))
    assert lrs[56] == pytest.approx(1e-3)


def test_non_integer_mul_and_long_horizon_are_cheap():
    s = Schedule.from_config(cfg(cosine_annealing_period_mul=1.5), None)
    assert 1e-5 <= s.lr_at(10**9) <= 1e-3
    s1 = Schedule.from_config(cfg(cosine_annealing_period_mul=1), None)
    assert s1.lr_at(4 + 8 * 10**9) == pytest.approx(1e-3)


def test_disabled_is_constant_initial_lr():
    assert schedule_preview(OptimConfig(initial_lr=3e-4), 5) == [3e-4] * 5


def test_period_none_uses_total_steps_and_ratio():
    c = OptimConfig(initial_lr=0.0, max_lr=1.0, min_lr=0.0, warmup_ratio=0.1, enable_lr_scheduler=True)
    lrs = schedule_preview(c, 100)
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)  # half-way through the 90-step cosine
    assert lrs[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    # no total steps known: constant max_lr after warmup
    s = Schedule.from_config(OptimConfig(initial_lr=1e-4, max_lr=1e-3, warmup_iters=2, enable_lr_scheduler=True))
    assert s.lr_at(1000) == 1e-3


def test_defaults_min_lr_tenth_of_max():
    s = Schedule.from_config(OptimConfig(initial_lr=1e-3, enable_lr_scheduler=True, cosine_annealing_period=10))
    assert s.lr_at(10) == pytest.approx(1e-4)


def test_scheduler_sets_optimizer_lr_with_scale():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_scale": 0.5}], lr=123.0)
    sch = WarmupCosineScheduler(opt, cfg())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 5e-5])  # applied at construction
    sch.step()
    assert sch.get_last_lr() == pytest.approx([3.25e-4, 3.25e-4 / 2])
    assert sch.last_epoch == 1


def test_resume_is_exact_no_off_by_one():
    def run(n, sch=None, opt=None):
        seen = []
        for _ in range(n):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        return seen

    c = cfg(cosine_annealing_period_mul=2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    straight = run(40, WarmupCosineScheduler(opt, c), opt)

    opt1 = torch.optim.SGD([p], lr=1.0)
    sch1 = WarmupCosineScheduler(opt1, c)
    first = run(13, sch1, opt1)
    state = sch1.state_dict()
    opt2 = torch.optim.SGD([p], lr=1.0)
    sch2 = WarmupCosineScheduler(opt2, c)
    sch2.load_state_dict(state)
    second = run(27, sch2, opt2)
    assert first + second == straight  # bit-identical, including the update right after resume


def test_resume_with_changed_schedule_warns():
    p = torch.nn.Parameter(torch.zeros(1))
    sch = WarmupCosineScheduler(torch.optim.SGD([p], lr=1.0), cfg())
    state = sch.state_dict()
    other = WarmupCosineScheduler(torch.optim.SGD([p], lr=1.0), cfg(max_lr=2e-3))
    with pytest.warns(UserWarning, match="different schedule"):
        other.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WarmupCosineScheduler(torch.optim.SGD([p], lr=1.0), cfg()).load_state_dict(state)


def test_lr_at_rejects_negative_step():
    with pytest.raises(ValueError):
        lr_at(-1, Schedule.from_config(cfg()))
