"""The environment protocol of multi-turn RL, and the checks applied to what an environment returns.

An environment plays the other side of a conversation with the policy, one episode per instance::

    class MyEnv:
        tools = None                  # optional: JSON schemas handed to the chat template (tool-calling models)

        def reset(self, record: dict) -> list[dict]:
            # the first messages of the episode (e.g. system + user), from one record of the RL data
            return [{"role": "user", "content": record["question"]}]

        def step(self, assistant_text: str):
            # the policy's reply (decoded, special tokens skipped) -> (observation messages | None, reward, done)
            return [{"role": "user", "content": "Try again."}], 0.0, False

``step`` may also return a :class:`StepResult` (which can carry the parsed assistant message, e.g. with its
``tool_calls``, and counters for the logs). An optional ``bind_template(chat_template)`` is called once, before
``reset``, with the chat template the episode is rendered with (the tool environment reads its tool-call syntax
off it). ``observation`` None or ``done=True`` ends the episode. The rewards of
all steps are added into the episode's environment reward. The trainer takes an environment *factory* — a class or a
zero-argument callable — and builds one environment per episode, so environments may keep per-episode state.

Whatever an environment does wrong is reported as :class:`EnvironmentFailure` naming the environment, the episode
(its index in the rollout and its record) and the turn: an exception in ``reset``/``step``, a reward that is not a
finite number, observation messages that are not ``{"role", "content"}`` dicts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["Environment", "StepResult", "EnvironmentFailure", "checked_step", "checked_reset", "env_name",
           "build_environment", "read_records"]


@runtime_checkable
class Environment(Protocol):
    """See the module docstring."""

    def reset(self, record: dict) -> list[dict]: ...

    def step(self, assistant_text: str) -> Any: ...


@dataclass
class StepResult:
    """What one environment step returns. ``assistant``: the policy's reply as a message for the conversation
    record (e.g. ``{"role": "assistant", "content": ..., "tool_calls": [...]}``; None → the plain text);
    ``info``: counters summed over the rollout and logged as ``env/<key>`` (e.g. ``tool_calls``)."""

    observation: list[dict] | None
    reward: float = 0.0
    done: bool = False
    assistant: dict | None = None
    info: dict[str, float] = field(default_factory=dict)


class EnvironmentFailure(RuntimeError):
    """An environment raised or returned something unusable; the message names it, the episode and the turn."""


def env_name(env: Any) -> str:
    return getattr(env, "name", None) or type(env).__name__


def _where(env: Any, episode: int, record: Any, turn: int | None) -> str:
    rec = repr(record)
    rec = rec if len(rec) <= 120 else rec[:117] + "..."
    at = "in reset" if turn is None else f"at turn {turn}"
    return f"environment {env_name(env)!r} {at} of episode {episode} (record {rec})"


def _check_messages(msgs: Any, what: str) -> list[dict]:
    if not isinstance(msgs, (list, tuple)) or not all(isinstance(m, dict) for m in msgs):
        raise TypeError(f"{what} must be a list of message dicts, got {type(msgs).__name__}")
    for i, m in enumerate(msgs):
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{what}[{i}] has no 'role'")
        if "content" not in m and "tool_calls" not in m:
            raise ValueError(f"{what}[{i}] (role {m['role']!r}) has no 'content'")
    return [dict(m) for m in msgs]


def checked_reset(env: Any, record: Any, episode: int) -> list[dict]:
    """``env.reset(record)``, validated; any failure becomes :class:`EnvironmentFailure`."""
    try:
        msgs = _check_messages(env.reset(record), "the first messages")
        if not msgs:
            raise ValueError("reset returned no messages")
        return msgs
    except Exception as e:  # noqa: BLE001 - an environment is user code: every failure is reported as its failure
        raise EnvironmentFailure(f"{_where(env, episode, record, None)}: {type(e).__name__}: {e}") from e


def checked_step(env: Any, text: str, record: Any, episode: int, turn: int) -> StepResult:
    """``env.step(text)`` as a validated :class:`StepResult`; any failure becomes :class:`EnvironmentFailure`."""
    try:
        raw = env.step(text)
        if isinstance(raw, StepResult):
            res = raw
        elif isinstance(raw, tuple) and len(raw) == 3:
            res = StepResult(*raw)
        else:
            raise TypeError(f"step returned {type(raw).__name__}; expected (observation | None, reward, done) or a "
                            f"StepResult")
        if isinstance(res.reward, bool) or not isinstance(res.reward, (int, float)) \
                and not (hasattr(res.reward, "item") and getattr(res.reward, "shape", None) == ()):
            raise TypeError(f"the reward must be a number, got {type(res.reward).__name__}")
        reward = float(res.reward)
        if not math.isfinite(reward):
            raise ValueError(f"the reward is not finite ({reward})")
        obs = None if res.observation is None else _check_messages(res.observation, "the observation")
        return StepResult(obs, reward, bool(res.done), res.assistant, dict(res.info))
    except Exception as e:  # noqa: BLE001
        raise EnvironmentFailure(f"{_where(env, episode, record, turn)}: {type(e).__name__}: {e}") from e


def read_records(path: str) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file (environment data: records handed to ``environment.reset``)."""
    from ..data.formats import DataError
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not JSON: {e.msg}", file=path, line=n) from None
            if not isinstance(rec, dict):
                raise DataError(f"a record must be a JSON object, got {type(rec).__name__}", file=path, line=n)
            out.append(rec)
    return out


def build_environment(factory: Callable[[], Any]) -> Any:
    """One environment from ``factory``; refuses an object that is not an environment factory."""
    env = factory()
    if not callable(getattr(env, "reset", None)) or not callable(getattr(env, "step", None)):
        raise TypeError(f"environment factory {factory!r} returned {type(env).__name__}, which has no reset/step; "
                        f"pass a class or a zero-argument callable that builds an environment")
    return env
