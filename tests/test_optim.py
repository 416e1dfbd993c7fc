import pytest
import torch
from torch import nn

from llm_trainer.configs import OptimConfig
from llm_trainer.optim import Lion, build_optimizer, build_param_groups


class Tiny(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(groups):
    return {g["group_name"]: sorted(g["names"]) for g in groups}


def test_param_groups_policy():
    groups = _names(build_param_groups(Tiny(tie=True), 0.1))
    assert groups["decay"] == ["proj.weight"]
    assert groups["no_decay"] == ["embed.weight", "norm.bias", "norm.weight", "proj.bias"]
    untied = _names(build_param_groups(Tiny(tie=False), 0.1))
    assert untied["decay"] == ["head.weight", "proj.weight"]
    with_emb = _names(build_param_groups(Tiny(tie=False), 0.1, decay_embeddings=True))
    assert with_emb["decay"] == ["embed.weight", "head.weight", "proj.weight"]


def test_param_groups_use_full_shape_of_zero3_partitioned_params():
    """ZeRO-3 replaces every parameter's data by an empty 1-D partition and keeps the real shape in ``ds_shape``
    (as ``deepspeed.zero.Init`` does); the decay decision must follow the full shape, not the local tensor."""
    m = Tiny(tie=False)
    for p in m.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert all(p.ndim == 1 for p in m.parameters())
    groups = _names(build_param_groups(m, 0.1))
    assert groups["decay"] == ["head.weight", "proj.weight"]
    assert groups["no_decay"] == ["embed.weight", "norm.bias", "norm.weight", "proj.bias"]
    plain = _names(build_param_groups(list(m.parameters()), 0.1))   # the iterable form too
    assert len(plain["decay"]) == 3                                  # embed, proj, head weights


def test_param_groups_weight_decay_values_and_no_frozen():
    m = Tiny()
    groups = build_param_groups(m, 0.3)
    wd = {g["group_name"]: g["weight_decay"] for g in groups}
    assert wd == {"decay": 0.3, "no_decay": 0.0}
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(m.frozen.weight) not in ids and id(m.frozen.bias) not in ids
    assert len(ids) == sum(len(g["params"]) for g in groups)  # no duplicates (tied weight once)


def test_param_groups_from_iterable_and_errors():
    w, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    groups = build_param_groups([w, b, w], 0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]
    with pytest.raises(ValueError, match="no trainable"):
        build_param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)


def test_lion_matches_paper_update_by_hand():
    # Chen et al. 2023, Alg. 2: c = b1*m + (1-b1)*g; θ -= lr*(sign(c) + wd*θ); m = b2*m + (1-b2)*g
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    # step 1: m0 = 0, g = [0.2, -0.4, 0.0] → c = [0.02, -0.04, 0] → sign [1, -1, 0]
    p.grad = torch.tensor([0.2, -0.4, 0.0])
    opt.step()
    # θ = θ - 0.1*(sign + 0.5*θ) = [1 - 0.1*(1+0.5), -2 - 0.1*(-1 - 1), 0.5 - 0.1*(0 + 0.25)]
    assert torch.allclose(p.data, torch.tensor([0.85, -1.8, 0.475]))
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.002, -0.004, 0.0]))
    # step 2: g = [-1, 1, 1e-3]; c = 0.9*m + 0.1*g = [-0.0982, 0.0964, 1e-4] → sign [-1, 1, 1]
    p.grad = torch.tensor([-1.0, 1.0, 1e-3])
    opt.step()
    expected = torch.tensor([0.85 - 0.1 * (-1 + 0.425), -1.8 - 0.1 * (1 - 0.9), 0.475 - 0.1 * (1 + 0.2375)])
    assert torch.allclose(p.data, expected)
    m = torch.tensor([0.99 * 0.002 - 0.01, 0.99 * -0.004 + 0.01, 0.01 * 1e-3])
    assert torch.allclose(opt.state[p]["exp_avg"], m)


def test_lion_uses_interpolation_not_momentum_for_sign():
    # momentum m says +, gradient says strongly -: c = 0.9*m + 0.1*g decides the sign, not m
    p = nn.Parameter(torch.zeros(1))
    opt = Lion([p], lr=1.0, betas=(0.9, 0.0))
    opt.state[p]["exp_avg"] = torch.tensor([0.1])
    p.grad = torch.tensor([-2.0])  # c = 0.09 - 0.2 < 0 → θ increases by lr
    opt.step()
    assert p.item() == 1.0
    assert opt.state[p]["exp_avg"].item() == pytest.approx(-2.0)  # b2 = 0 → m = g


def test_lion_state_dict_round_trip_and_skips_none_grads():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = Lion([a, b], lr=0.01)
    a.grad = torch.ones(2)
    opt.step()
    assert b not in opt.state and torch.equal(b.data, torch.ones(2))
    sd = opt.state_dict()
    opt2 = Lion([a, b], lr=0.01)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[a]["exp_avg"], opt.state[a]["exp_avg"])


def test_build_optimizer_adamw_and_lion():
    m = Tiny()
    adam = build_optimizer(m, OptimConfig(initial_lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6))
    assert isinstance(adam, torch.optim.AdamW)
    g = {pg["group_name"]: pg for pg in adam.param_groups}
    assert g["decay"]["weight_decay"] == 0.1 and g["no_decay"]["weight_decay"] == 0.0
    assert g["decay"]["betas"] == (0.8, 0.9) and g["decay"]["eps"] == 1e-6 and g["decay"]["lr"] == 1e-3
    assert not adam.defaults.get("fused")
    lion = build_optimizer(m, OptimConfig(optim_type="lion", initial_lr=1e-4))
    assert isinstance(lion, Lion) and lion.defaults["betas"] == (0.9, 0.99)
    # pre-built groups are used as given
    groups = [{"params": list(m.proj.parameters()), "weight_decay": 0.0}]
    assert len(build_optimizer(groups, OptimConfig()).param_groups) == 1


def test_adamw_step_decays_only_decay_group():
    m = Tiny()
    opt = build_optimizer(m, OptimConfig(initial_lr=0.1, weight_decay=0.5))
    before_w, before_b = m.proj.weight.detach().clone(), m.norm.weight.detach().clone()
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()  # zero grads: only weight decay moves parameters
    assert torch.allclose(m.proj.weight, before_w * (1 - 0.1 * 0.5))
    assert torch.equal(m.norm.weight, before_b)
