"""QLoRA: quantized frozen base (nf4 / int8 via bitsandbytes) under full-precision LoRA adapters.

Oracles: the codes and scales equal those `transformers` stores when it loads the same folder with
`BitsAndBytesConfig`; gradients equal autograd through `F.linear` with the dequantized weight; the merged
full-precision export loads in `transformers` with the logits of our quantized + LoRA model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_trainer.configs import LoRAConfig
from llm_trainer.model import LlmModel, ModelConfig
from llm_trainer.model.lora import (LoRALinear, apply_lora, lora_disabled, lora_parameters, merge_lora,
                                    remove_lora)
from llm_trainer.model.quant import (QuantLinear, QuantLoRALinear, dequantize_base, quantize_base,
                                     quantized_weight_nbytes)

VOCAB = 97
try:
    import bitsandbytes  # noqa: F401
    HAS_BNB = True
except ImportError:
    HAS_BNB = False
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (extra 'quant') is not installed")
QUANT = [pytest.param("nf4", marks=needs_bnb), "int8"]


def _config(tie=False):
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, attention_bias=True,
                       tie_word_embeddings=tie, architecture="qwen2")


def _model(seed=0, tie=False):
    torch.manual_seed(seed)
    return LlmModel(_config(tie))


def _batch(seed=0, n=4, s=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, s), generator=g)


def _loss(model, ids):
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _train(model, steps=12, lr=3e-3):
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = _loss(model, _batch(step % 3))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_codes_equal_transformers_bitsandbytes(tmp_path, quant_type):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _model().save_pretrained(tmp_path)
    if quant_type == "nf4":
        bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                     bnb_4bit_compute_dtype=torch.float32)
    else:
        bnb_cfg = BitsAndBytesConfig(load_in_8bit=True)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_cfg, device_map="cpu",
                                              dtype=torch.float32)
    ours = quantize_base(apply_lora(LlmModel.from_pretrained(tmp_path), r=4, alpha=8), quant_type)
    checked = 0
    for name, m in ours.named_modules():
        if isinstance(m, (QuantLinear, QuantLoRALinear)):
            w = hf.get_submodule(name).weight
            ours_scales = m.weight_absmax.view(torch.float32)
            if quant_type == "nf4":
                assert torch.equal(m.weight_codes.reshape(-1), w.data.reshape(-1)), name
                assert torch.equal(ours_scales, w.quant_state.absmax), name
            else:  # bnb's Int8Params rounds the weight to fp16 before quantizing; we quantize the fp32 weight
                assert m.weight_codes.shape == w.data.shape and m.weight_codes.dtype == w.data.dtype == torch.int8
                assert (m.weight_codes.int() - w.data.int()).abs().max() <= 1, name
                torch.testing.assert_close(ours_scales, w.SCB.float(), rtol=1e-3, atol=0)
            checked += 1
    assert checked == 2 * 7 and ours.lm_head is not None and not isinstance(ours.lm_head, QuantLinear)


@pytest.mark.parametrize("quant_type", QUANT)
def test_quantized_layers_memory_and_error(quant_type):
    model = _model()
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize_base(apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"]), quant_type)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantLoRALinear) and isinstance(attn.o_proj, QuantLinear)
    nbytes, numel = quantized_weight_nbytes(model)
    assert numel == sum(v.numel() for n, v in full.items() if n.endswith("proj.weight"))
    ratio = nbytes / (2 * numel)                       # against bf16
    assert ratio <= (0.3 if quant_type == "nf4" else 0.56)
    # no full-precision copy of a quantized weight is left as a parameter or buffer
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())
    rel = (attn.o_proj.weight - full["model.layers.0.self_attn.o_proj.weight"]).norm() / \
        full["model.layers.0.self_attn.o_proj.weight"].norm()
    assert 0 < rel < (0.12 if quant_type == "nf4" else 0.01)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("quant_type", QUANT)
@pytest.mark.parametrize("autocast", [False, True])
def test_gradients_equal_autograd_through_dequantized_weight(quant_type, autocast):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    lin.requires_grad_(False)
    q = QuantLinear(lin, quant_type)
    w = q.weight
    x = torch.randn(5, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = q(x)
        y_ref = F.linear(x_ref, w, lin.bias)
    assert y.dtype == y_ref.dtype
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0 if not autocast else 1e-2, rtol=0 if not autocast else 1e-2)


@pytest.mark.parametrize("quant_type", QUANT)
def test_qlora_trains_close_to_full_precision_lora(quant_type):
    ref = apply_lora(_model(), r=8, alpha=16)
    torch.manual_seed(1)
    for p in lora_parameters(ref):                      # B != 0 so both runs start from the same adapted model
        torch.nn.init.normal_(p, std=0.02)
    q = apply_lora(_model(), r=8, alpha=16)
    for a, b in zip(lora_parameters(q), lora_parameters(ref)):
        a.data.copy_(b.data)
    quantize_base(q, quant_type)
    q.set_gradient_checkpointing(True)                  # recomputed forward goes through the quantized layers too
    ref_losses, q_losses = _train(ref), _train(q)
    assert q_losses[-1] < q_losses[0] - 0.05            # it learns
    gap = max(abs(a - b) for a, b in zip(q_losses, ref_losses))
    assert gap < (0.05 if quant_type == "nf4" else 0.01), (q_losses, ref_losses)


@pytest.mark.parametrize("quant_type", QUANT)
def test_state_dict_is_full_precision_and_reload_is_exact(quant_type):
    model = quantize_base(apply_lora(_model(), r=4, alpha=8), quant_type)
    _train(model, steps=2)
    plain_keys = set(_model().state_dict())
    sd = model.state_dict()
    assert {k for k in sd if ".lora_" not in k} == plain_keys       # the nn.Linear contract: `<name>.weight`
    assert sd["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32
    fresh = quantize_base(apply_lora(_model(seed=5), r=4, alpha=8), quant_type)
    fresh.load_state_dict(sd)                                         # re-quantizes: same codes, exactly
    for (n, a), b in zip(model.named_modules(), fresh.modules()):
        if isinstance(a, (QuantLinear, QuantLoRALinear)):
            assert torch.equal(a.weight_codes, b.weight_codes) and torch.equal(a.weight_absmax, b.weight_absmax), n
    model.eval(), fresh.eval()
    ids = _batch(7)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
    bad = dict(sd)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.up_proj.weight"):
        fresh.load_state_dict(bad)


@needs_bnb
def test_dtype_cast_keeps_scales_exact():
    model = quantize_base(apply_lora(_model(), r=4, alpha=8), "nf4")
    layer = model.model.layers[0].mlp.down_proj
    scales = layer.weight_absmax.clone()
    model.to(torch.bfloat16)
    assert torch.equal(layer.weight_absmax, scales) and layer.weight.dtype == torch.bfloat16
    assert model(_batch()).logits.dtype == torch.bfloat16


@needs_bnb
@pytest.mark.parametrize("tie", [False, True])
def test_merged_full_precision_export_loads_in_transformers(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from llm_trainer.trainers.setup import merge_lora_state

    model = quantize_base(apply_lora(_model(tie=tie), r=4, alpha=8), "nf4")
    _train(model, steps=4)
    model.eval()
    ids = _batch(9)
    with torch.no_grad():
        want = model(ids).logits
        with lora_disabled(model):
            base = model(ids).logits
    assert (want - base).abs().max() > 1e-3                       # the adapters matter
    with pytest.raises(ValueError, match="dequantize_base"):
        merge_lora(model)
    # the trainers' export: full state dict (dequantized) + LoRA folded in
    exported = LlmModel(model.config)
    exported.load_state_dict(merge_lora_state(model.state_dict(), model))
    exported.save_pretrained(tmp_path / "via_state")
    # the explicit route: dequantize, merge, save
    remove_lora(dequantize_base(model))
    assert not any(isinstance(m, (QuantLinear, QuantLoRALinear, LoRALinear)) for m in model.modules())
    model.save_pretrained(tmp_path / "via_modules")
    for folder in ("via_state", "via_modules"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, want, atol=2e-5, rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="quantize_base"):
        quantize_base(apply_lora(_model()), "fp4")
    with pytest.raises(ValueError, match="LoRAConfig.quantize_base"):
        LoRAConfig(quantize_base="int4")
    assert LoRAConfig(quantize_base="nf4").quantize_base == "nf4"
    with pytest.raises(ValueError, match="no frozen linear"):
        quantize_base(_model(), "int8")                            # nothing frozen: nothing to quantize
    model = apply_lora(_model(), r=4, alpha=8)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        quantize_base(model, "int8")
