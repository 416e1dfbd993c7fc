"""Exported files get the usual permissions (``0o666 & ~umask``), not the owner-only 0600 the ``safetensors`` writer
creates, so a model folder can be shared; checked with os.stat under umasks set for the test."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from llm_trainer.model import LlmModel
from llm_trainer.model.hf import current_umask, save_pretrained
from trainer_utils import tiny_model_config, train_config, write_pretrain_tokens


@pytest.fixture(params=[0o002, 0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))}


def test_current_umask_reads_the_mask_without_changing_it(umask):
    assert current_umask() == umask and current_umask() == umask
    assert os.umask(umask) == umask                                   # still what the fixture set


def test_single_and_sharded_exports(tmp_path, umask):
    model = LlmModel(tiny_model_config())
    save_pretrained(model, tmp_path / "one")
    save_pretrained(model, tmp_path / "many", max_shard_size=20_000)
    save_pretrained(model, tmp_path / "one")                          # into an existing folder: files are replaced
    for folder in ("one", "many"):
        modes = _modes(tmp_path / folder)
        assert any(name.endswith(".safetensors") for name in modes)
        assert modes == {name: 0o666 & ~umask for name in modes}, (folder, {k: oct(v) for k, v in modes.items()})
    assert len([n for n in _modes(tmp_path / "many") if n.endswith(".safetensors")]) > 1
    assert stat.S_IMODE((tmp_path / "one").stat().st_mode) == 0o777 & ~umask


def test_a_trainer_export_with_lora_and_the_vlm_writers(tmp_path, umask):
    from llm_trainer import Trainer
    from llm_trainer.configs import LoRAConfig
    from llm_trainer.model.vision import VisionConfig, VisionEncoder
    from llm_trainer.model.vlm import VLMConfig, VlmModel

    data = write_pretrain_tokens(tmp_path / "t.npy")
    cfg = train_config(tmp_path, data, max_steps=1, lora=LoRAConfig(r=2))
    Trainer(train_config=cfg).train()
    out = tmp_path / "out"
    for folder in ("final", "lora_adapter"):
        modes = _modes(out / folder)
        assert modes and modes == {name: 0o666 & ~umask for name in modes}, (folder, modes)
    vision = VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                          image_size=16, patch_size=4)
    torch.manual_seed(0)
    VisionEncoder(vision).save_pretrained(tmp_path / "vision")
    VlmModel(VLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=64, vision_config=vision, image_token_id=63,
                       tokens_per_image=4)).save_pretrained(tmp_path / "vlm")
    for folder in ("vision", "vlm"):
        modes = _modes(tmp_path / folder)
        assert modes == {name: 0o666 & ~umask for name in modes}, (folder, modes)
