"""`ToolEnvironment`: the policy may call registered Python functions; an episode ends with a reply that calls none.

Each step parses the reply in the chat template's own tool-call syntax (:mod:`.tool_calls`), runs the well-formed
calls (:class:`~.tools.ToolRunner`: time and output limits, errors become text) and answers with one ``tool``
message per call, in the order of the calls. A malformed call, an unknown tool name, bad arguments, an exception or a
timeout are answered with an ``error: ...`` tool message — the model sees what went wrong and may try again (up to
the trainer's ``max_turns``). Counters per step (logged as ``env/<name>`` per episode): ``tool_calls`` (well-formed
calls), ``tool_calls_ok`` (calls that returned a result), ``tool_errors`` (malformed calls and failed ones).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .base import StepResult
from .tool_calls import TOOL_FORMATS, detect_format, parse_tool_calls
from .tools import Tool, ToolRunner

__all__ = ["ToolEnvironment"]


class ToolEnvironment:
    """``tools``: functions (or :class:`Tool`) the model may call. ``tool_format``: ``"auto"`` (read off the chat
    template by the trainer, :func:`~.tool_calls.detect_format`), ``"hermes"`` or ``"llama3_json"``.
    ``timeout_s`` / ``max_output_chars``: limits of one call. ``max_calls_per_turn``: calls run per reply (the rest
    are answered with an error). ``system_prompt``: prepended to the record's prompt when it has no system message.
    ``prompt_field``: the record field holding the prompt (a string or a list of messages). ``reward``:
    ``reward(record, final_reply_text) -> float`` given when the episode ends (None → 0; the trainer's reward
    functions see the final reply too)."""

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool] = (), *, tool_format: str = "auto",
                 timeout_s: float = 5.0, max_output_chars: int = 2000, max_calls_per_turn: int = 4,
                 system_prompt: str | None = None, prompt_field: str = "prompt",
                 reward: Callable[[dict, str], float] | None = None):
        self.tool_list = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
        names = [t.name for t in self.tool_list]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"ToolEnvironment: tool names must be unique, repeated: {dup}")
        if tool_format != "auto" and tool_format not in TOOL_FORMATS:
            raise ValueError(f"ToolEnvironment: tool_format must be 'auto' or one of {sorted(TOOL_FORMATS)}, got "
                             f"{tool_format!r}")
        if isinstance(max_calls_per_turn, bool) or not isinstance(max_calls_per_turn, int) or max_calls_per_turn < 1:
            raise ValueError(f"ToolEnvironment: max_calls_per_turn must be an int >= 1, got {max_calls_per_turn!r}")
        self.by_name = {t.name: t for t in self.tool_list}
        self.tool_format = tool_format
        self.runner = ToolRunner.shared(self.tool_list, timeout_s, max_output_chars)
        self.max_calls_per_turn = max_calls_per_turn
        self.system_prompt, self.prompt_field, self.reward = system_prompt, prompt_field, reward
        self.record: dict | None = None

    @property
    def tools(self) -> list[dict] | None:
        """The tools' JSON schemas for the chat template (None without tools: the template shows none)."""
        return [t.schema() for t in self.tool_list] or None

    def bind_template(self, template: Any) -> None:
        """Called by the trainer with the chat template in use: resolves ``tool_format="auto"``."""
        if self.tool_format == "auto":
            self.tool_format = detect_format(template.source, template.name)

    def reset(self, record: dict) -> list[dict]:
        if not isinstance(record, dict) or self.prompt_field not in record:
            raise KeyError(f"the record has no {self.prompt_field!r} field")
        self.record = record
        prompt = record[self.prompt_field]
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.system_prompt is not None and not (msgs and msgs[0].get("role") == "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def step(self, assistant_text: str) -> StepResult:
        fmt = "hermes" if self.tool_format == "auto" else self.tool_format
        reply = parse_tool_calls(assistant_text, fmt)
        if not reply.calls and not reply.errors:               # a final answer
            reward = float(self.reward(self.record, assistant_text)) if self.reward is not None else 0.0
            return StepResult(None, reward, True, reply.message(), {"tool_calls": 0, "tool_calls_ok": 0,
                                                                    "tool_errors": 0})
        obs = [{"role": "tool", "content": f"error: {e}"} for e in reply.errors]
        ok = 0
        for i, call in enumerate(reply.calls):
            tool = self.by_name.get(call.name)
            if i >= self.max_calls_per_turn:
                text = f"error: only {self.max_calls_per_turn} tool calls per reply are run; {call.name!r} was not"
            elif tool is None:
                known = sorted(self.by_name) or "none"
                text = f"error: unknown tool {call.name!r} (tools: {known})"
            else:
                result = self.runner.run(tool, call.arguments)
                ok += result.ok
                text = result.output if result.ok else f"error: {result.output}"
            obs.append({"role": "tool", "name": call.name, "content": text})
        info = {"tool_calls": len(reply.calls), "tool_calls_ok": ok, "tool_errors": len(obs) - ok}
        return StepResult(obs, 0.0, False, reply.message(), info)
