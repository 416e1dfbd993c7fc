"""VlmModel: image-token expansion, feature placement, freezing, cached generation with images, save/load."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm_trainer.model.llm import LlmModel
from llm_trainer.model.vision import VisionConfig
from llm_trainer.model.vlm import (VLMConfig, VlmModel, count_images, expand_image_tokens,
                                   expand_image_tokens_and_labels)

IMG = 63  # image token id
TPI = 4  # tokens per image (2x2 pooled from a 4x4 patch grid)


def tiny_config(**overrides) -> VLMConfig:
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0,
              vision_config=VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4),
              image_token_id=IMG, tokens_per_image=TPI)
    kw.update(overrides)
    return VLMConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> VlmModel:
    torch.manual_seed(seed)
    return VlmModel(tiny_config(**overrides)).eval()


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def batch():
    """Sample 0: two images; sample 1: one image, right-padded. Already expanded."""
    s0 = expand_image_tokens([1, IMG, 5, 6, IMG, 7, 8], IMG, TPI)
    s1 = expand_image_tokens([2, 3, IMG, 9], IMG, TPI)
    width = max(len(s0), len(s1))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, s in enumerate((s0, s1)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ token helpers

def test_expand_image_tokens_lists_tensors_and_placeholder():
    assert expand_image_tokens([5, IMG, 6], IMG, 3) == [5, IMG, IMG, IMG, 6]
    assert expand_image_tokens([IMG, IMG], IMG, 2) == [IMG] * 4  # two images back to back
    assert expand_image_tokens([5, 6], IMG, 3) == [5, 6]
    t = expand_image_tokens(torch.tensor([7, 50, 8, 50]), IMG, 2, placeholder_id=50)
    assert t.dtype == torch.long and t.tolist() == [7, IMG, IMG, 8, IMG, IMG]
    ids, labels = expand_image_tokens_and_labels([1, IMG, 4, 5], [-100, -100, 4, 5], IMG, 3)
    assert ids == [1, IMG, IMG, IMG, 4, 5] and labels == [-100, -100, -100, -100, 4, 5]
    ids, labels = expand_image_tokens_and_labels(torch.tensor([IMG, 4]), torch.tensor([9, 4]), IMG, 2)
    assert ids.tolist() == [IMG, IMG, 4] and labels.tolist() == [-100, -100, 4]  # image labels never trained
    assert count_images(torch.tensor([[IMG] * 4 + [1], [1, 2, 3, 4, 5]]), IMG, 2) == [2, 0]
    with pytest.raises(ValueError, match="sample 1 has 3 image tokens"):
        count_images(torch.tensor([[IMG, IMG, 1], [IMG, IMG, IMG]]), IMG, 2)


# ------------------------------------------------------------------------------------------ config

def test_vlm_config_validation_and_dict_roundtrip():
    cfg = tiny_config(tie_word_embeddings=True, projector_hidden_size=40, vision_feature_layer=-2)
    again = VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.llm_config().hidden_size == 32 and type(cfg.llm_config()).__name__ == "ModelConfig"
    with pytest.raises(ValueError, match="perfect square"):
        tiny_config(tokens_per_image=6)
    with pytest.raises(ValueError, match="only 4x4 patches"):
        tiny_config(tokens_per_image=25)
    with pytest.raises(ValueError, match="image_token_id"):
        tiny_config(image_token_id=64)
    with pytest.raises(ValueError, match="image_token_id"):
        tiny_config(image_token_id=0)  # == pad_token_id
    with pytest.raises(ValueError, match="projector_type"):
        tiny_config(projector_type="qformer")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny_config(vision_feature_layer=5)
    with pytest.raises(TypeError):
        VlmModel(tiny_config().llm_config())


# ------------------------------------------------------------------------------------------ forward

def test_image_features_replace_image_token_embeddings_in_order():
    model = tiny_model()
    ids, mask = batch()
    pv = pixels(3)
    with torch.no_grad():
        emb = model.embed(ids, pv, image_counts=[2, 1])
        feats = model.image_features(pv)  # [3, TPI, H]
        plain = model.get_input_embeddings()(ids)
    assert feats.shape == (3, TPI, 32)
    is_img = ids == IMG
    assert torch.equal(emb[~is_img], plain[~is_img])
    assert torch.equal(emb[0][is_img[0]], feats[:2].reshape(-1, 32))  # sample 0: images 0 and 1, in order
    assert torch.equal(emb[1][is_img[1]], feats[2])
    out = model(ids, pixel_values=pv, attention_mask=mask)
    assert out.logits.shape == (2, ids.shape[1], 64)


def test_images_only_affect_their_own_sample_and_later_tokens():
    model = tiny_model()
    ids, mask = batch()
    pv = pixels(3)
    pv2 = pv.clone()
    pv2[2] = torch.randn(3, 16, 16)  # change sample 1's image only
    pv3 = pv.clone()
    pv3[1] = torch.randn(3, 16, 16)  # change sample 0's second image
    with torch.no_grad():
        a = model(ids, pixel_values=pv, attention_mask=mask).logits
        b = model(ids, pixel_values=pv2, attention_mask=mask).logits
        c = model(ids, pixel_values=pv3, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1], atol=1e-4)
    second = int((ids[0] == IMG).nonzero()[TPI])  # first token of sample 0's second image
    assert torch.allclose(a[0, :second], c[0, :second], atol=1e-6)
    assert not torch.allclose(a[0, second:], c[0, second:], atol=1e-4)


def test_text_only_forward_equals_llm_forward():
    model = tiny_model()
    llm = LlmModel(model.config.llm_config()).eval()
    llm.load_state_dict(model.llm.state_dict())
    ids = torch.randint(1, 60, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, llm(ids, attention_mask=mask).logits)


def test_image_count_mismatches_are_clear_errors():
    model = tiny_model()
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"sample 1: image_counts says 2 image\(s\) = 8 image tokens, but the text "
                                         r"has 4 image tokens"):
        model(ids, pixel_values=pixels(4), image_counts=[2, 2])
    with pytest.raises(ValueError, match="sum to 3 but pixel_values has 2 images"):
        model(ids, pixel_values=pixels(2), image_counts=[2, 1])
    with pytest.raises(ValueError, match=r"the text has 3 image\(s\) \(per sample \[2, 1\].*pixel_values has 4"):
        model(ids, pixel_values=pixels(4))
    with pytest.raises(ValueError, match="sample 0 has 8 image tokens .* no pixel_values"):
        model(ids)
    cut = ids.clone()
    cut[1, 3] = 5  # a partial image in sample 1
    with pytest.raises(ValueError, match="sample 1 has 3 image tokens, not a multiple"):
        model(cut, pixel_values=pixels(3))
    with pytest.raises(ValueError, match="out of range for vocab_size 64"):
        model(torch.tensor([[1, 64]]))


def test_gradient_checkpointing_gives_same_gradients():
    ids, mask = batch()
    pv = pixels(3)
    grads = []
    for ckpt in (False, True):
        model = tiny_model().train()
        model.set_gradient_checkpointing(ckpt)
        model(ids, pixel_values=pv, attention_mask=mask).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


# ------------------------------------------------------------------------------------------ freezing

def _train_step(model: VlmModel):
    ids, mask = batch()
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    logits = model(ids, pixel_values=pixels(3), attention_mask=mask).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return with_grad, changed


def test_frozen_llm_and_encoder_only_projector_learns():
    model = tiny_model()
    model.freeze(llm=True, vision=True)
    assert model.num_parameters(trainable_only=True) == sum(p.numel() for p in model.projector.parameters())
    with_grad, changed = _train_step(model)
    projector = {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    assert with_grad == changed == projector


def test_frozen_llm_trains_projector_and_encoder():
    model = tiny_model()
    model.freeze(llm=True, vision=False)
    with_grad, changed = _train_step(model)
    assert changed and all(n.startswith(("projector.", "vision_model.")) for n in changed)
    assert any(n.startswith("vision_model.") for n in changed) and any(n.startswith("projector.") for n in changed)
    assert with_grad == changed
    model.freeze(llm=False)  # unfreeze again
    assert all(p.requires_grad for p in model.llm.parameters())


# ------------------------------------------------------------------------------------------ generation

def _greedy(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    logits[:, IMG] = float("-inf")  # never generate an image token
    return logits.argmax(-1)


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_generation_with_image_kv_cache_equals_recompute(tie):
    """Prefill (left-padded, images in the prompt) then decode with the KV cache == full recompute each step."""
    model = tiny_model(seed=3, tie_word_embeddings=tie)
    p0 = expand_image_tokens([1, IMG, 5, 6, IMG, 7], IMG, TPI)
    p1 = expand_image_tokens([2, IMG, 9], IMG, TPI)
    width = max(len(p0), len(p1))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate((p0, p1)):  # left padding, as generation does
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    pv = pixels(3, seed=7)
    steps = 6
    with torch.no_grad():
        # cached: one prefill with the images, then one token at a time without them
        out = model(ids, pixel_values=pv, attention_mask=mask, use_cache=True)
        cache, cached_mask = out.past_key_values, mask
        nxt = _greedy(out.logits[:, -1])
        cached_tokens, cached_logits = [nxt], [out.logits[:, -1]]
        for _ in range(steps - 1):
            cached_mask = torch.cat([cached_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = model(nxt[:, None], attention_mask=cached_mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = _greedy(out.logits[:, -1])
            cached_tokens.append(nxt)
            cached_logits.append(out.logits[:, -1])
        # recompute: the whole sequence (with the images) every step
        seq, full_mask = ids, mask
        full_tokens, full_logits = [], []
        for _ in range(steps):
            logits = model(seq, pixel_values=pv, attention_mask=full_mask).logits[:, -1]
            nxt = _greedy(logits)
            full_tokens.append(nxt)
            full_logits.append(logits)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert torch.equal(torch.stack(cached_tokens, 1), torch.stack(full_tokens, 1))
    for a, b in zip(cached_logits, full_logits):
        assert (a - b).abs().max().item() < 1e-4
    # and the image matters: a different image changes the prefill logits
    with torch.no_grad():
        other = model(ids, pixel_values=pixels(3, seed=8), attention_mask=mask).logits[:, -1]
    assert not torch.allclose(other, full_logits[0], atol=1e-4)


def test_generate_accepts_pixel_values():
    generation = pytest.importorskip("llm_trainer.generation")
    import inspect

    if "pixel_values" not in inspect.signature(generation.generate).parameters:
        pytest.skip("generation.generate does not take pixel_values yet")
    model = tiny_model(seed=3)
    prompts = [expand_image_tokens([1, IMG, 5], IMG, TPI), expand_image_tokens([2, 3, IMG, 9], IMG, TPI)]
    pv = pixels(2, seed=7)
    cfg = generation.GenerateConfig(max_new_tokens=5, do_sample=False, suppress_tokens=[IMG])
    out = generation.generate(model, prompts, cfg, eos_token_ids=[], pad_token_id=0, pixel_values=pv)
    # reference: greedy recompute per prompt, batch of one
    for b, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(5):
                nxt = _greedy(model(seq, pixel_values=pv[b:b + 1]).logits[:, -1])
                seq = torch.cat([seq, nxt[:, None]], dim=1)
        assert out.completions[b] == seq[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------ save / load

@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_roundtrip(tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie, projector_type="linear" if tie else "mlp")
    model.save_pretrained(tmp_path / "vlm")
    loaded = VlmModel.from_pretrained(tmp_path / "vlm").eval()
    assert loaded.config == model.config
    ids, mask = batch()
    pv = pixels(3)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pv, attention_mask=mask).logits,
                           loaded(ids, pixel_values=pv, attention_mask=mask).logits)


def test_load_errors_name_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path / "vlm")
    state = load_file(tmp_path / "vlm" / "model.safetensors")
    del state["projector.linear_2.bias"]
    state["vision_model.post_layernorm.weight"] = torch.ones(5)
    save_file(state, tmp_path / "vlm" / "model.safetensors")
    with pytest.raises(ValueError) as err:
        VlmModel.from_pretrained(tmp_path / "vlm")
    assert "projector.linear_2.bias" in str(err.value) and "vision_model.post_layernorm.weight" in str(err.value)
    with pytest.raises(ValueError, match="not a VLM config"):
        VLMConfig.from_dict({"model_type": "llama"})


def test_from_pretrained_parts(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16,
        patch_size=4)).eval()
    hf.save_pretrained(tmp_path / "siglip")
    llm = LlmModel(tiny_config().llm_config())
    llm.save_pretrained(tmp_path / "llm")
    model = VlmModel.from_pretrained_parts(tmp_path / "llm", tmp_path / "siglip", image_token_id=IMG,
                                           tokens_per_image=TPI).eval()
    x = pixels(2)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        assert (model.vision_model(x).last_hidden_state - ref).abs().max() <= 1e-4
        ids = torch.randint(1, 60, (1, 6))
        assert torch.allclose(model(ids).logits, llm.eval()(ids).logits, atol=1e-6)


def test_clip_style_tower_with_penultimate_features():
    vision = VisionConfig(style="clip", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, image_size=16, patch_size=4)
    model = tiny_model(vision_config=vision, vision_feature_layer=-2, tokens_per_image=16, projector_norm=False)
    pv = pixels(2)
    with torch.no_grad():
        feats = model.image_features(pv)
        hidden = model.vision_model(pv, output_hidden_states=True).hidden_states[-2][:, 1:]  # no class token
        assert feats.shape == (2, 16, 32)
        assert torch.allclose(feats, model.projector.linear_2(F.gelu(model.projector.linear_1(hidden))), atol=1e-6)
        ids = torch.tensor([expand_image_tokens([1, IMG, 2], IMG, 16), expand_image_tokens([IMG, 3, 4], IMG, 16)])
        assert model(ids, pixel_values=pv).logits.shape == (2, 18, 64)


def test_projector_pools_patch_grid_row_major():
    model = tiny_model()
    grid = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 24)  # patch (r, c) has value 4r + c
    pooled = model.projector.pool(grid)[0, :, 0]
    # 2x2 average of each quadrant of [[0,1,2,3],[4,5,6,7],[8,...],[12,...]]
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]
