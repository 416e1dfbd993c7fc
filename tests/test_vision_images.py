"""DefaultPixelValuesProvider: exact normalisation, resize/crop, and clear errors for bad images."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from llm_trainer.images import DefaultPixelValuesProvider, ImageError, PixelValuesProvider
from llm_trainer.model.vision import VisionConfig

PIXELS = [[(255, 0, 10), (0, 128, 20)], [(30, 60, 90), (200, 100, 50)]]  # rows of (R, G, B)


def _save_2x2(path, mode="RGB"):
    img = Image.new("RGB", (2, 2))
    for y, row in enumerate(PIXELS):
        for x, rgb in enumerate(row):
            img.putpixel((x, y), rgb)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def test_normalisation_matches_hand_computation(tmp_path):
    path = _save_2x2(tmp_path / "a.png")
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    provider = DefaultPixelValuesProvider(2, mean=mean, std=std)
    got = provider([str(path)])
    assert got.shape == (1, 3, 2, 2) and got.dtype == torch.float32
    for y in range(2):
        for x in range(2):
            for c in range(3):
                expected = (PIXELS[y][x][c] / 255.0 - mean[c]) / std[c]
                assert got[0, c, y, x].item() == pytest.approx(expected, abs=1e-6)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = _save_2x2(tmp_path / "g.png", mode="L")
    rgba = _save_2x2(tmp_path / "r.png", mode="RGBA")
    out = DefaultPixelValuesProvider(2)([str(gray), str(rgba)])
    assert out.shape == (2, 3, 2, 2)
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])  # gray → equal channels
    assert torch.allclose(out[1], DefaultPixelValuesProvider(2)([str(_save_2x2(tmp_path / "c.png"))])[0])


def test_shortest_side_resize_centre_crop(tmp_path):
    # 12x6 image: left third red, middle third green, right third blue. Shortest side 6 -> 4: 8x4, crop centre 4x4.
    img = Image.new("RGB", (12, 6))
    for x in range(12):
        for y in range(6):
            img.putpixel((x, y), [(255, 0, 0), (0, 255, 0), (0, 0, 255)][x // 4])
    img.save(tmp_path / "wide.png")
    provider = DefaultPixelValuesProvider(4, mean=(0, 0, 0), std=(1, 1, 1), resample="nearest")
    out = provider([str(tmp_path / "wide.png")])[0]
    assert out.shape == (3, 4, 4)
    # centre crop of the 8-wide resized image keeps columns 2..5: mostly green, red/blue only at the edges
    assert torch.all(out[1, :, 1:3] == 1.0) and torch.all(out[0, :, 1:3] == 0.0)
    squash = DefaultPixelValuesProvider(4, mean=(0, 0, 0), std=(1, 1, 1), resize="squash", resample="nearest")
    sq = squash([str(tmp_path / "wide.png")])[0]
    assert sq[0, :, 0].eq(1).all() and sq[2, :, 3].eq(1).all()  # squash keeps all three stripes


def test_image_root_pil_input_and_empty_batch(tmp_path):
    _save_2x2(tmp_path / "a.png")
    provider = DefaultPixelValuesProvider(2, image_root=tmp_path)
    by_name = provider(["a.png"])
    assert torch.equal(by_name, provider([Image.open(tmp_path / "a.png")]))
    assert provider([]).shape == (0, 3, 2, 2)
    assert isinstance(provider, PixelValuesProvider)


def test_missing_image_names_file_and_sample(tmp_path):
    provider = DefaultPixelValuesProvider(2)
    _save_2x2(tmp_path / "ok.png")
    with pytest.raises(ImageError) as err:
        provider([str(tmp_path / "ok.png"), str(tmp_path / "missing.png")], sample_indices=[3, 7])
    assert "missing.png" in str(err.value) and "sample 7" in str(err.value) and "not found" in str(err.value)
    assert err.value.sample_index == 7 and err.value.path.endswith("missing.png")
    with pytest.raises(ImageError, match="missing.png"):
        provider([str(tmp_path / "missing.png")])


def test_corrupt_and_truncated_images(tmp_path):
    provider = DefaultPixelValuesProvider(2)
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError) as err:
        provider([str(tmp_path / "junk.jpg")], sample_indices=[12])
    assert "junk.jpg" in str(err.value) and "sample 12" in str(err.value)
    big = Image.new("RGB", (64, 64), (10, 200, 30))
    big.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.png"):
        provider([str(tmp_path / "trunc.png")])


def test_from_vision_config_and_validation():
    p = DefaultPixelValuesProvider.from_vision_config(VisionConfig(style="clip", image_size=16, patch_size=4))
    assert p.image_size == 16 and p.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    with pytest.raises(ValueError):
        DefaultPixelValuesProvider(0)
    with pytest.raises(ValueError):
        DefaultPixelValuesProvider(4, resize="pad")
    with pytest.raises(ValueError):
        DefaultPixelValuesProvider(4, std=(1, 0, 1))


def test_load_pixel_values_checks_user_providers(tmp_path):
    from llm_trainer.images import load_pixel_values

    _save_2x2(tmp_path / "a.png")
    default = DefaultPixelValuesProvider(2)
    with pytest.raises(ImageError, match="sample 5"):
        load_pixel_values(default, [str(tmp_path / "a.png"), "nope.png"], sample_indices=[4, 5])
    assert load_pixel_values(default, [str(tmp_path / "a.png")], image_size=2).shape == (1, 3, 2, 2)

    def simple(paths):  # a user provider without sample_indices
        return torch.zeros(len(paths), 3, 8, 8)

    assert load_pixel_values(simple, ["x", "y"], sample_indices=[0, 1]).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="expects 4x4"):
        load_pixel_values(simple, ["x"], image_size=4)
    with pytest.raises(ValueError, match=r"expected a float tensor \[3, 3, H, W\]"):
        load_pixel_values(lambda p: torch.zeros(1, 3, 8, 8), ["x", "y", "z"])
