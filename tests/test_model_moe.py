"""Sparse MoE: router losses against a hand computation, weighting into aux_loss, batch independence, jitter."""
import math

import pytest
import torch

from llm_trainer.model import LlmModel, ModelConfig, MoEConfig
from llm_trainer.model.moe import SparseMoE

# Router input: hidden = 4, gate = identity, so router logits are the rows below.
ROWS = [[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0], [0.0, 2.0, 1.0, 0.0], [5.0, 0.0, 1.0, 0.5]]
REAL = [True, True, True, False]  # last token is padding


def hand_losses(rows, real, k):
    """Plain-Python Switch aux loss and z-loss over the real rows."""
    rows = [r for r, keep in zip(rows, real) if keep]
    E, T = len(rows[0]), len(rows)
    probs = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in rows]
    counts = [0] * E
    for p in probs:
        for e in sorted(range(E), key=lambda e: -p[e])[:k]:
            counts[e] += 1
    p_mean = [sum(p[e] for p in probs) / T for e in range(E)]
    aux = E * sum(counts[e] / (T * k) * p_mean[e] for e in range(E))
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / T
    return aux, z


def moe_layer(**kw):
    cfg = ModelConfig(vocab_size=16, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                      moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, **kw))
    layer = SparseMoE(cfg).eval()
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    return layer


def test_router_losses_match_hand_computation():
    layer = moe_layer()
    x = torch.tensor(ROWS)[None]
    _, aux, z = layer(x, token_mask=torch.tensor([REAL]))
    hand_aux, hand_z = hand_losses(ROWS, REAL, k=2)
    # the same numbers written out: top-2 sets {0,1}, {3,2}, {1,2} -> counts [1, 2, 2, 1] / 6
    assert hand_aux == pytest.approx(0.9537, abs=1e-4) and hand_z == pytest.approx(7.5829, abs=1e-4)
    assert aux.item() == pytest.approx(hand_aux, rel=1e-6)
    assert z.item() == pytest.approx(hand_z, rel=1e-6)
    # without the mask the padding row changes both numbers
    _, aux_all, z_all = layer(x)
    assert aux_all.item() == pytest.approx(hand_losses(ROWS, [True] * 4, k=2)[0], rel=1e-6)
    assert z_all.item() != pytest.approx(hand_z, rel=1e-3)


def test_model_aux_loss_is_coefficient_weighted_sum_over_layers():
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      moe=MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                    aux_loss_coef=0.1, z_loss_coef=0.01, first_k_dense=1))
    model = LlmModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 5))
    out = model(ids)
    m = out.moe_metrics
    # recompute each sparse layer's raw losses from its own input
    aux = z = 0.0
    h = model.model.embed_tokens(ids)
    from llm_trainer.model.layers import rope_cos_sin
    cos, sin = rope_cos_sin(cfg, torch.arange(5).expand(2, 5), h.dtype)
    for layer in model.model.layers:
        x = h + layer.self_attn(layer.input_layernorm(h), cos, sin, None, True)
        if layer.is_moe:
            _, a, b = layer.mlp(layer.post_attention_layernorm(x))
            aux, z = aux + a.item(), z + b.item()
        h, _, _ = layer(h, cos, sin, None, True)
    assert m["moe_aux_loss"].item() == pytest.approx(aux, rel=1e-5)
    assert m["moe_z_loss"].item() == pytest.approx(z, rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.1 * aux + 0.01 * z, rel=1e-5)
    assert out.aux_loss.requires_grad


def test_moe_eval_output_independent_of_batch_composition():
    layer = moe_layer(n_shared_experts=1, shared_expert_gate=True)
    torch.nn.init.normal_(layer.gate.weight)
    x = torch.randn(6, 5, 4)
    with torch.no_grad():
        together, _, _ = layer(x)
        for i in range(6):
            alone, _, _ = layer(x[i:i + 1])
            torch.testing.assert_close(together[i], alone[0], atol=1e-6, rtol=0)
    # no capacity: every token is routed even when all pick the same experts
    same = x[:1, :1].expand(1, 20, 4).contiguous()
    out, _, _ = layer(same)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)


def test_router_jitter_only_in_training():
    layer = moe_layer(router_jitter=0.5)
    x = torch.randn(1, 8, 4)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], layer(x)[0])
        layer.train()
        assert not torch.equal(layer(x)[1], layer(x)[1])


def test_unused_experts_still_get_gradients_in_training():
    layer = moe_layer().train()
    x = torch.tensor([ROWS[0]] * 3)[None]  # every token picks experts 0 and 1
    out, aux, _ = layer(x)
    (out.sum() + aux).backward()
    assert layer.experts[3].up_proj.weight.grad is not None  # called on zero rows: DDP / ZeRO-3 friendly
    assert layer.experts[3].up_proj.weight.grad.abs().sum() == 0
