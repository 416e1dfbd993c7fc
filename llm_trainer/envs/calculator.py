"""A task that needs a tool: adding numbers too large for a tiny model to add in its head, with a calculator.

Records ``{"prompt": [{"role": "user", "content": "4821+3907=?"}], "answer": "8728", "a": 4821, "b": 3907}``;
the tool is :func:`add`. A solved episode, in the Hermes/Qwen tool-call syntax (what :func:`demonstration` writes
for a supervised warm-up)::

    user       4821+3907=?
    assistant  <tool_call>
               {"name": "add", "arguments": {"a": 4821, "b": 3907}}
               </tool_call>
    tool       8728
    assistant  8728

:func:`answer_reward` (a ``RewardFun``) scores the final reply (1 when its first integer is the sum);
:func:`correct_tool_call_rate` measures how often the first tool call of an episode is ``add`` with the record's
operands. ``example/agentic_grpo.py`` and ``tests/test_agentic_learning.py`` train on it.
"""
from __future__ import annotations

import json
import random
import re
from typing import Any, Sequence

__all__ = ["add", "records", "demonstration", "direct_answer", "warmup_conversations", "answer_reward",
           "correct_tool_call_rate", "tool_call_text", "chatml_corpus"]

_INT = re.compile(r"-?\d+")


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def records(n: int, digits: int = 3, seed: int = 0) -> list[dict]:
    """``n`` problems ``a+b`` with ``digits``-digit operands."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    out = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append({"prompt": [{"role": "user", "content": f"{a}+{b}=?"}], "answer": str(a + b), "a": a, "b": b})
    return out


def tool_call_text(a: int, b: int) -> str:
    """The assistant's reply calling the calculator, in the Hermes/Qwen syntax."""
    return "<tool_call>\n" + json.dumps({"name": "add", "arguments": {"a": a, "b": b}}) + "\n</tool_call>"


def demonstration(record: dict) -> list[dict]:
    """The solved conversation of ``record`` (for supervised warm-up data)."""
    a, b = record["a"], record["b"]
    return record["prompt"] + [{"role": "assistant", "content": tool_call_text(a, b)},
                               {"role": "tool", "name": "add", "content": str(a + b)},
                               {"role": "assistant", "content": str(a + b)}]


def direct_answer(record: dict) -> list[dict]:
    """The conversation of ``record`` answered without the tool (the model must add in its head)."""
    return record["prompt"] + [{"role": "assistant", "content": record["answer"]}]


def warmup_conversations(recs: Sequence[dict], tool_fraction: float, seed: int = 0) -> list[list[dict]]:
    """Supervised warm-up conversations: a share ``tool_fraction`` of the records solved with the tool
    (:func:`demonstration`), the others answered directly (:func:`direct_answer`)."""
    rng = random.Random(seed)
    return [demonstration(r) if rng.random() < tool_fraction else direct_answer(r) for r in recs]


def chatml_corpus(recs: Sequence[dict]) -> str:
    """The solved conversations rendered with the built-in ``chatml`` template: tokenizer training text in which
    the role names and the tool-call syntax occur, so that they become few tokens."""
    from ..chat import get_builtin
    from ..chat.jinja import prepare_messages, render
    source = get_builtin("chatml").source
    return "".join(render(source, prepare_messages(demonstration(r)), True, {}).text for r in recs)


def answer_reward(*, completions: Sequence[str], answers: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when the final reply's first integer is the answer."""
    out = []
    for c, a in zip(completions, answers):
        m = _INT.search(c)
        out.append(1.0 if a is not None and m is not None and m.group(0) == str(a) else 0.0)
    return out


def correct_tool_call_rate(messages: Sequence[Sequence[dict]], recs: Sequence[dict]) -> float:
    """Share of episodes (conversations ``messages``, one per record of ``recs``) whose first assistant turn calls
    ``add`` with the record's operands."""
    hits = 0
    for msgs, rec in zip(messages, recs):
        first = next((m for m in msgs if m.get("role") == "assistant"), None)
        calls = (first or {}).get("tool_calls") or []
        fn = calls[0].get("function", {}) if calls else {}
        hits += fn.get("name") == "add" and fn.get("arguments") == {"a": rec["a"], "b": rec["b"]}
    return hits / max(len(recs), 1)
