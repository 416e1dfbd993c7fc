"""`SFTTrainer`: supervised fine-tuning on chat data (prompt tokens masked), optional packing, VLM images."""
from __future__ import annotations

from typing import Any

import torch

from ..data.collate import collate_for
from ..data.datasets import open_dataset
from .images import attach_pixel_values, expand_items
from .lm import LanguageModelingTrainer


class SFTTrainer(LanguageModelingTrainer):
    """``SFTTrainer(train_config=..., eval_prompts=[...], eval_image_tags=None).train()``."""

    stage = "sft"
    stage_slot = "sft_config"

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        sc = self.stage_config
        freeze = getattr(model, "freeze", None)
        if freeze is not None and (sc.freeze_llm_model or sc.freeze_vision_encoder):
            freeze(llm=sc.freeze_llm_model or None, vision=sc.freeze_vision_encoder or None)
        elif sc.freeze_llm_model:
            raise ValueError("SFTConfig.freeze_llm_model=True needs a VLM (model_config=VLMConfig(...)): freezing "
                             "the whole LLM would leave nothing to train")
        return model

    def build_dataset(self, files: Any, split: str):
        return open_dataset("sft", files, self.config.block_size, vocab_size=self.model_config.vocab_size,
                            tokenizer=self.tokenizer)

    def build_collate(self):
        return collate_for("sft", self.pad_token_id(), packing=self.stage_config.packing,
                           block_size=self.config.block_size)

    def collate(self, items: list[dict]) -> dict:
        if not self.stage_config.mask_prompt:
            items = [{**it, "labels": it["input_ids"].clone()} for it in items]
        # VLM: each <image> placeholder becomes tokens_per_image image tokens (label -100) before padding/packing
        items = expand_items(items, self.model_config, [("input_ids", "labels")], max_length=self.config.block_size)
        batch = self.collate_fn(items)
        rows = batch.get("images")
        if rows is None and any(it.get("images") for it in items):
            rows = [list(it.get("images") or []) for it in items]
        return attach_pixel_values(batch, rows, self.pixel_provider, self.model_config)

    def format_eval_prompt(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids
