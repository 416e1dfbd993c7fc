"""LoRA: trainable set, merge == unmerged, disabled == base, save/load adapters, errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llm_trainer.model import LlmModel, ModelConfig, MoEConfig
from llm_trainer.model.lora import (LoRALinear, apply_lora, load_lora, lora_disabled, lora_parameters,
                                    lora_state_dict, merge_lora, remove_lora, save_lora, unmerge_lora)

IDS = torch.tensor([[3, 9, 27, 81, 4, 1], [0, 0, 5, 6, 7, 8]])
MASK = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])


def _model(seed=0, moe=False, tie=False):
    torch.manual_seed(seed)
    return LlmModel(ModelConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, attention_bias=True,
                                tie_word_embeddings=tie,
                                moe=MoEConfig(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16)
                                if moe else None))


def _logits(model):
    with torch.no_grad():
        return model(IDS, attention_mask=MASK).logits


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_apply_lora_trainable_set_and_identity_at_init():
    model = _model()
    base = _logits(model)
    base_keys = set(model.state_dict())
    apply_lora(model, r=8, alpha=16, dropout=0.0)
    torch.testing.assert_close(_logits(model), base)  # B = 0: the adapted model starts equal to the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable == {n for n in model.state_dict() if ".lora_" in n}
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    # base keys unchanged (HF export and optimizer references keep working)
    assert base_keys == {n for n in model.state_dict() if ".lora_" not in n}
    c = model.config
    per_layer = sum(8 * (i + o) for i, o in [(48, 48), (48, 24), (48, 24), (48, 48),
                                             (48, c.intermediate_size), (48, c.intermediate_size),
                                             (c.intermediate_size, 48)])
    assert model.num_parameters(trainable_only=True) == 2 * per_layer
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scaling == 2.0 and q.bias is not None
    assert torch.all(q.lora_B.weight == 0) and q.lora_A.weight.abs().sum() > 0
    # gradients reach only the adapters
    model.train()
    model(IDS, attention_mask=MASK).logits.float().pow(2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert q.lora_B.weight.grad is not None and q.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("moe", [False, True])
def test_merged_equals_unmerged(moe):
    model = apply_lora(_model(moe=moe), r=4, alpha=8, target_modules="all-linear")
    _randomise_b(model)
    base_w = model.model.layers[1].mlp.state_dict()
    unmerged = _logits(model)
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    for k, v in model.model.layers[1].mlp.state_dict().items():
        torch.testing.assert_close(v, base_w[k], atol=1e-6, rtol=0)
    if moe:  # routers are never wrapped (their weight is read directly)
        assert not isinstance(model.model.layers[0].mlp.gate, LoRALinear)
    assert model.lm_head is not None and not isinstance(model.lm_head, LoRALinear)


def test_lora_disabled_gives_base_model():
    model = _model()
    base = _logits(model)
    apply_lora(model, r=4, alpha=4, dropout=0.1)
    _randomise_b(model)
    model.eval()
    adapted = _logits(model)
    assert (adapted - base).abs().max() > 1e-3
    with lora_disabled(model):
        torch.testing.assert_close(_logits(model), base)
    torch.testing.assert_close(_logits(model), adapted)
    merge_lora(model)
    with lora_disabled(model):  # also from a merged state; merged again afterwards
        torch.testing.assert_close(_logits(model), base, atol=1e-5, rtol=1e-5)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_save_load_adapters(tmp_path):
    model = apply_lora(_model(), r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])
    _randomise_b(model)
    model.eval()
    want = _logits(model)
    save_lora(model, tmp_path, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.05
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["peft_type"] == "LORA"
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{k}" for k in lora_state_dict(model)}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8

    fresh = _model()  # same base weights, no adapters yet: load applies them from adapter_config.json
    load_lora(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(_logits(fresh), want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(lora_state_dict(model))

    merged = apply_lora(_model(), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    merge_lora(merged)
    load_lora(merged, tmp_path)  # loading into a merged model keeps it merged, with the new adapters
    torch.testing.assert_close(_logits(merged.eval()), want, atol=1e-5, rtol=1e-5)

    other = apply_lora(_model(), r=4, alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="missing"):
        load_lora(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(_model(), tmp_path / "nope")


def test_remove_lora_exports_plain_model(tmp_path):
    model = apply_lora(_model(tie=True), r=2, alpha=4)
    base_keys = set(_model(tie=True).state_dict())
    _randomise_b(model)
    want = _logits(model)
    remove_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=1e-5)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_errors():
    model = _model(moe=True)
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(model, target_modules=["qkv"])
    with pytest.raises(ValueError, match=r"\['nope'\] matched no"):
        apply_lora(model, target_modules=["q_proj", "nope"])
    with pytest.raises(ValueError, match="router"):
        apply_lora(model, target_modules=["gate"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, r=0)
    apply_lora(model, r=2, alpha=2, target_modules=r".*\.self_attn\.(q|k)_proj")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="no LoRA"):
        lora_state_dict(_model())
