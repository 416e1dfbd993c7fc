"""Shared builders for trainer tests: tiny models and data written with the library's own writers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llm_trainer.configs import OptimConfig, TrainConfig
from llm_trainer.data.formats import IndexedWriter
from llm_trainer.model import ModelConfig

VOCAB = 96


def tiny_model_config(**overrides) -> ModelConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    return ModelConfig(**kw)


def write_pretrain_tokens(path: Path, n: int = 4000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(1, VOCAB, n).astype(np.uint16))
    return path


def write_sft(path: Path, n: int = 32, seed: int = 0, min_len: int = 4, max_len: int = 20) -> Path:
    """SFT records of uneven length; the first third of each sequence is an untrained prompt."""
    rng = np.random.default_rng(seed)
    with IndexedWriter(path, stage="sft", vocab_size=VOCAB) as w:
        for _ in range(n):
            length = int(rng.integers(min_len, max_len + 1))
            ids = rng.integers(1, VOCAB, length)
            mask = np.zeros(length, dtype=np.int64)
            mask[length // 3:] = 1
            w.add_sft(ids, mask)
    return path


def train_config(tmp: Path, data, **overrides) -> TrainConfig:
    kw = dict(model_config=tiny_model_config(), file_dataset=[str(data)], dataset_block_size=32, batch_size=4,
              output_dir=str(tmp / "out"), ds_config=None, dtype="fp32", optim_config=OptimConfig(initial_lr=1e-3),
              log_interval=1, save_interval=None, eval_interval=None, seed=7)
    kw.update(overrides)
    return TrainConfig(**kw)
