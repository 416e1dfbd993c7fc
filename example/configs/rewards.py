"""Reward functions for ``grpo.toml`` / ``ppo.toml`` (``[run] reward = "rewards:exact_match"``; the config file's
folder is importable). The arguments a reward function may take: ``docs/rl.md``."""
from __future__ import annotations

from llm_trainer.quickstart.task import extract_answer


def exact_match(completions: list[str], answers: list[str | None]) -> list[float]:
    """1.0 when the completion's first integer is the reference answer."""
    return [float(a is not None and extract_answer(c) == a.strip()) for c, a in zip(completions, answers)]


def short(completion_ids: list[list[int]]) -> list[float]:
    """A small bonus for short completions (an example of a second, weighted reward)."""
    return [1.0 / (1 + len(c)) for c in completion_ids]
