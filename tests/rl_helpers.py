"""Shared pieces of the RL tests: a tiny LM config and the "copy the digit" task.

Prompt ``[BOS, d, SEP]`` with ``d`` one of 10 digit tokens; the reward is 1 when the completion starts with ``d``.
A random tiny model gets ~1/16 right, so any policy-gradient method has a clear signal to learn from."""
from __future__ import annotations

import json
import os

import torch

from llm_trainer.configs import GRPOConfig, OptimConfig, PPOConfig, TrainConfig
from llm_trainer.generation import GenerateConfig
from llm_trainer.model import ModelConfig

V, PAD, BOS, EOS, SEP = 16, 0, 1, 2, 13
DIGITS = list(range(3, 13))


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
    base.update(kw)
    return ModelConfig(**base)


def copy_items(n: int, seed: int = 0, prompt_len: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = DIGITS[int(torch.randint(0, len(DIGITS), (1,), generator=g))]
        noise = [DIGITS[int(x)] for x in torch.randint(0, len(DIGITS), (prompt_len - 1,), generator=g)]
        out.append({"prompt_ids": torch.tensor([BOS, *noise, d, SEP]), "answer_ids": torch.tensor([d]),
                    "answer_text": str(d)})
    return out


def copy_reward(completion_ids, answer_ids):
    return [1.0 if len(c) >= 1 and c[0] == a[0] else 0.0 for c, a in zip(completion_ids, answer_ids)]


def grpo_train_config(tmp_path, n_items=256, steps=4, batch_size=4, seed=0, lr=3e-3, **grpo) -> TrainConfig:
    gc = grpo.pop("generate_config", GenerateConfig(max_new_tokens=3, temperature=1.0))
    grpo.setdefault("group_size", 4)
    grpo.setdefault("loss_beta", 0.0)
    return TrainConfig(model_config=model_config(), file_dataset=copy_items(n_items, seed), batch_size=batch_size,
                       output_dir=str(tmp_path), optim_config=OptimConfig(initial_lr=lr), save_interval=None,
                       eval_interval=None, log_interval=1000, max_steps=steps, dtype="fp32", seed=seed,
                       grpo_config=GRPOConfig(generate_config=gc, **grpo))


def ppo_train_config(tmp_path, n_items=512, steps=4, batch_size=8, seed=0, lr=3e-3, **ppo) -> TrainConfig:
    gc = ppo.pop("generate_config", GenerateConfig(max_new_tokens=3, temperature=1.0))
    return TrainConfig(model_config=model_config(), file_dataset=copy_items(n_items, seed), batch_size=batch_size,
                       output_dir=str(tmp_path), optim_config=OptimConfig(initial_lr=lr), save_interval=None,
                       eval_interval=None, log_interval=1000, max_steps=steps, dtype="fp32", seed=seed,
                       ppo_config=PPOConfig(generate_config=gc, **ppo))


def write_rank_result(out_path: str, result: dict) -> None:
    """A 2-rank test worker's report: rank 0 writes ``out_path``; another rank writes ``out_path + ".rank1"`` only
    when it failed (``"error"`` in ``result``). Written to a temporary file first, then renamed."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or "error" in result:
        path = out_path if rank == 0 else out_path + ".rank1"
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
