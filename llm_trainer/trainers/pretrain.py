"""`Trainer`: pretraining on flat token files (memory-mapped .npy, raw .bin or streamed .jsonl)."""
from __future__ import annotations

from typing import Any

from ..data.collate import collate_for
from ..data.datasets import open_dataset
from .lm import LanguageModelingTrainer


class Trainer(LanguageModelingTrainer):
    """Pretraining: ``Trainer(train_config=..., eval_prompts=[...]).train()``."""

    stage = "pretrain"
    stage_slot = "pretrain_config"

    def build_dataset(self, files: Any, split: str):
        vocab = self.model_config.vocab_size
        return open_dataset("pretrain", files, self.config.block_size, tokenizer=self.tokenizer, vocab_size=vocab)

    def build_collate(self):
        # packing=True: windows span several documents; attention and positions restart after each EOS
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.stage_config.packing else None
        return collate_for("pretrain", self.pad_token_id(), eos_token_id=eos)
