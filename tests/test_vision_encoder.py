"""Vision encoder: config validation, parity with transformers' SigLIP/CLIP vision towers, loading errors."""
from __future__ import annotations

import json

import pytest
import torch

from llm_trainer.model.vision import VisionConfig, VisionEncoder

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=4)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (LayerNorm weights/biases included) so a mapping error cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else noise)


def _siglip_folder(tmp_path, **overrides):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**{**TINY, **overrides})).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "siglip")
    return hf, tmp_path / "siglip"


def test_siglip_vision_parity(tmp_path):
    hf, folder = _siglip_folder(tmp_path)
    ours = VisionEncoder.from_pretrained(folder).eval()
    assert ours.config.style == "siglip" and ours.config.hidden_act == "gelu_pytorch_tanh"
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels).last_hidden_state
    assert got.shape == ref.shape == (3, 16, 32)
    assert (got - ref).abs().max().item() <= 1e-4


def test_clip_vision_parity_and_patch_features(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    _randomise(hf, seed=3)
    hf.save_pretrained(tmp_path / "clip")
    ours = VisionEncoder.from_pretrained(tmp_path / "clip").eval()
    assert ours.config.style == "clip" and ours.config.hidden_act == "quick_gelu"
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels, output_hidden_states=True)
        feats = ours.patch_features(pixels, feature_layer=-2)
    assert got.last_hidden_state.shape == (2, 17, 32)  # class token + 16 patches
    assert (got.last_hidden_state - ref.last_hidden_state).abs().max().item() <= 1e-4
    assert len(got.hidden_states) == len(ref.hidden_states)
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert (a - b).abs().max().item() <= 1e-4
    assert feats.shape == (2, 16, 32)
    assert (feats - ref.hidden_states[-2][:, 1:]).abs().max().item() <= 1e-4


def test_full_siglip_config_vision_config_is_read(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(vision_config=dict(TINY), text_config=dict(hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, vocab_size=64, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0))
    hf = SiglipModel(cfg).eval()
    _randomise(hf, seed=4)
    hf.save_pretrained(tmp_path / "full")
    ours = VisionEncoder.from_pretrained(tmp_path / "full").eval()
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=pixels).last_hidden_state
        got = ours(pixels).last_hidden_state
    assert (got - ref).abs().max().item() <= 1e-4


def test_prefixed_keys_and_own_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    hf, folder = _siglip_folder(tmp_path)
    # Older transformers saved SiglipVisionModel under a "vision_model." prefix.
    state = load_file(folder / "model.safetensors")
    save_file({"vision_model." + k: v for k, v in state.items()}, folder / "model.safetensors")
    ours = VisionEncoder.from_pretrained(folder).eval()
    ours.save_pretrained(tmp_path / "ours")
    again = VisionEncoder.from_pretrained(tmp_path / "ours").eval()
    assert again.config == ours.config
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x).last_hidden_state, again(x).last_hidden_state)
        assert (ours(x).last_hidden_state - hf(pixel_values=x).last_hidden_state).abs().max() <= 1e-4


def test_missing_and_mismatched_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = _siglip_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["encoder.layers.1.mlp.fc2.bias"]
    state["post_layernorm.weight"] = torch.ones(31)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError) as err:
        VisionEncoder.from_pretrained(folder)
    msg = str(err.value)
    assert "encoder.layers.1.mlp.fc2.bias" in msg and "missing" in msg
    assert "post_layernorm.weight" in msg and "[31]" in msg


def test_config_mismatch_and_bad_folder(tmp_path):
    _, folder = _siglip_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoder.layers.2"):
        VisionEncoder.from_pretrained(folder)
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        VisionEncoder.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VisionEncoder.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [dict(hidden_size=30), dict(image_size=18), dict(hidden_act="relu"),
                                 dict(style="dino"), dict(num_hidden_layers=0), dict(image_mean=(0.5, 0.5))])
def test_vision_config_validation(bad):
    with pytest.raises(ValueError):
        VisionConfig(**bad)


def test_defaults_construct_and_check_pixel_shape():
    enc = VisionEncoder(VisionConfig())
    assert enc.config.image_mean == (0.5, 0.5, 0.5)
    out = enc(torch.randn(2, 3, 32, 32)).last_hidden_state
    assert out.shape == (2, 16, 64)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        enc(torch.randn(2, 3, 28, 28))
