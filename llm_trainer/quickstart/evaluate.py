"""Held-out exact-match accuracy of an exported model on the synthetic arithmetic task."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..generation import GenerateConfig, generate
from .task import exact_match


def load_test_set(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompts_for(records: list[dict], tokenizer, chat: bool) -> list[list[int]]:
    """Chat prompts (the SFT/DPO/GRPO format) or plain ``a+b=`` completions (the pretraining format)."""
    if chat:
        return [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True).input_ids for r in records]
    return [tokenizer.encode(r["prompt"][-1]["content"].replace("=?", "=")) for r in records]


def accuracy(model: torch.nn.Module, tokenizer, records: list[dict], *, chat: bool = True, batch_size: int = 64,
             max_new_tokens: int = 6) -> float:
    """Greedy-decode each held-out prompt; the fraction whose first integer equals the answer."""
    return _mean_exact_match(model, tokenizer, records, GenerateConfig(max_new_tokens=max_new_tokens, do_sample=False),
                             chat=chat, batch_size=batch_size)


def sampled_reward(model: torch.nn.Module, tokenizer, records: list[dict], *, samples: int = 4, seed: int = 0,
                   max_new_tokens: int = 6) -> float:
    """GRPO's objective on held-out prompts: the mean exact-match reward of ``samples`` completions per prompt at
    temperature 1 (a fixed seed, so before/after compare the same random numbers)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    return _mean_exact_match(model, tokenizer, [r for r in records for _ in range(samples)], cfg, chat=True,
                             generator=generator)


@torch.no_grad()
def _mean_exact_match(model, tokenizer, records: list[dict], cfg: GenerateConfig, *, chat: bool,
                      batch_size: int = 64, generator: torch.Generator | None = None) -> float:
    was_training = model.training
    model.eval()
    stops = tokenizer.chat_stop_token_ids() if chat else tokenizer.stop_token_ids
    prompts = prompts_for(records, tokenizer, chat)
    hits = 0.0
    for i in range(0, len(prompts), batch_size):
        out = generate(model, prompts[i:i + batch_size], cfg, eos_token_ids=stops,
                       pad_token_id=tokenizer.pad_token_id, generator=generator)
        for rec, ids in zip(records[i:i + batch_size], out.completions):
            text = tokenizer.decode(ids)
            if not chat:   # a plain completion runs on past the answer: keep its first line
                text = text.split("\n")[0]
            hits += exact_match(text, rec["answer"])
    model.train(was_training)
    return hits / max(1, len(records))
