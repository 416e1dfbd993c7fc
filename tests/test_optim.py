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


# ------------------------------------------------------------------------------------------- precision options
def _lm_and_batch(seed=0):
    from llm_trainer.model import LlmModel, ModelConfig

    torch.manual_seed(seed)
    model = LlmModel(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 initializer_range=0.1))
    return model, torch.randint(0, 64, (4, 16))


def _train(model, ids, opt, steps):
    losses = []
    for _ in range(steps):
        logits = model(ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw_equals_torch_adamw_with_fp32_state():
    """Our AdamW (used for bf16 state or low-precision parameters) is torch's update: same numbers, same keys."""
    from llm_trainer.optim import AdamW

    ref_model, ids = _lm_and_batch()
    model, _ = _lm_and_batch()
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(build_param_groups(ref_model, 0.1), weight_decay=0.1, foreach=False, **kw)
    ours = AdamW(build_param_groups(model, 0.1), weight_decay=0.1, **kw)
    assert _train(model, ids, ours, 5) == _train(ref_model, ids, ref, 5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        assert ours.state[p].keys() == ref.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("optim_type", ["adamw", "lion"])
def test_bf16_optimizer_state_trains_and_has_that_dtype(optim_type):
    lr = 3e-3 if optim_type == "adamw" else 3e-4
    cfg32 = OptimConfig(optim_type=optim_type, initial_lr=lr)
    cfg16 = OptimConfig(optim_type=optim_type, initial_lr=lr, state_dtype="bf16")
    model32, ids = _lm_and_batch()
    model16, _ = _lm_and_batch()
    opt16 = build_optimizer(model16, cfg16)
    loss32 = _train(model32, ids, build_optimizer(model32, cfg32), 40)
    loss16 = _train(model16, ids, opt16, 40)
    keys = ("exp_avg", "exp_avg_sq") if optim_type == "adamw" else ("exp_avg",)
    for p in model16.parameters():
        assert p.dtype == torch.float32 and "master" not in opt16.state[p]
        assert all(opt16.state[p][k].dtype == torch.bfloat16 for k in keys)
    assert loss16[-1] < 0.6 * loss16[0]                  # it trains ...
    assert abs(loss16[-1] - loss32[-1]) < 0.05 * loss32[-1]  # ... about as well as fp32 moments


def test_bf16_parameters_update_through_fp32_master_weights():
    """lr·update = 1e-4 per step is below bf16's rounding step at 1.0 (2^-7): torch's AdamW on bf16 parameters never
    moves them, ours accumulates the steps in the fp32 master and moves the parameter once they add up — the
    master follows fp32 AdamW fed the same gradients."""
    w32 = nn.Parameter(torch.ones(8))
    w16 = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    w16_plain = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    cfg = OptimConfig(initial_lr=1e-4, weight_decay=0.0)
    opt32 = torch.optim.AdamW([w32], lr=1e-4, weight_decay=0.0, betas=cfg.resolved_betas())
    opt16 = build_optimizer([w16], cfg)
    plain = torch.optim.AdamW([w16_plain], lr=1e-4, weight_decay=0.0, betas=cfg.resolved_betas())
    assert not isinstance(opt16, torch.optim.AdamW)
    torch.manual_seed(0)
    for _ in range(100):
        g = torch.randn(8).abs().to(torch.bfloat16)  # bf16-exact, the same for all three
        w32.grad, w16.grad, w16_plain.grad = g.float(), g.clone(), g.clone()
        for opt in (opt32, opt16, plain):
            opt.step()
    master = opt16.state[w16]["master"]
    assert master.dtype == torch.float32 and w16.dtype == torch.bfloat16
    torch.testing.assert_close(master, w32.detach(), atol=1e-6, rtol=0)
    assert torch.equal(w16.detach(), master.to(torch.bfloat16)) and bool((w16 < 1).all())
    assert torch.equal(w16_plain.detach(), torch.ones(8, dtype=torch.bfloat16))  # lost every update


def test_low_precision_state_survives_state_dict_round_trip(tmp_path):
    """torch's load_state_dict casts state to the parameter dtype; bf16 moments and fp32 masters are restored."""
    from llm_trainer.optim import AdamW

    def make():
        torch.manual_seed(0)
        return nn.Linear(4, 4).to(torch.bfloat16)

    def step(m, opt, seed):
        torch.manual_seed(seed)
        m(torch.randn(2, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    m1 = make()
    o1 = AdamW(m1.parameters(), lr=1e-3, state_dtype=torch.bfloat16)
    for s in range(3):
        step(m1, o1, s)
    torch.save(o1.state_dict(), tmp_path / "opt.pt")
    m2 = make()
    m2.load_state_dict(m1.state_dict())
    o2 = AdamW(m2.parameters(), lr=1e-3, state_dtype=torch.bfloat16)
    o2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        st1, st2 = o1.state[p1], o2.state[p2]
        assert st2["master"].dtype == torch.float32 and torch.equal(st2["master"], st1["master"])
        assert st2["exp_avg"].dtype == torch.bfloat16 and torch.equal(st2["exp_avg_sq"], st1["exp_avg_sq"])
    step(m1, o1, 9)
    step(m2, o2, 9)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    # switching dtype on resume: a torch AdamW (fp32) state dict into a bf16-state optimizer
    lin = nn.Linear(4, 4)
    ref = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 4)).sum().backward()
    ref.step()
    o3 = AdamW(lin.parameters(), state_dtype=torch.bfloat16)
    o3.load_state_dict(ref.state_dict())
    assert all(o3.state[p]["exp_avg"].dtype == torch.bfloat16 for p in lin.parameters())


def test_state_dtype_validation():
    with pytest.raises(ValueError, match="OptimConfig.state_dtype"):
        OptimConfig(state_dtype="fp16")
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        Lion([nn.Parameter(torch.ones(1))], state_dtype=torch.float16)
    assert isinstance(build_optimizer(Tiny(), OptimConfig()), torch.optim.AdamW)  # default: torch's own
