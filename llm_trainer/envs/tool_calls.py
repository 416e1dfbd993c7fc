"""Tool calls in a model's reply, in the syntax its chat template renders them.

Supported formats (``tool_format``):

* ``"hermes"`` — Hermes 2 Pro / Qwen2.5 / Qwen3 (``qwen2_5``, ``qwen3``, ``qwen3_instruct_2507``, ``qwen3_vl``
  templates) and our built-in ``chatml``: one block per call, anywhere in the reply, the rest is the content::

      <tool_call>
      {"name": "add", "arguments": {"a": 1, "b": 2}}
      </tool_call>

* ``"llama3_json"`` — Llama 3.1 / 3.2 / 3.3 JSON tool calling (``llama3_1``, ``llama3_2`` templates) and our
  built-in ``llama3``: the whole reply is the call (several separated by ``;``), ``"parameters"`` (or
  ``"arguments"``) holding the arguments; a reply that does not start with ``{`` is plain content::

      {"name": "add", "parameters": {"a": 1, "b": 2}}

:func:`detect_format` reads the format off the template source. Formats we recognise but do not parse, named in
the error (pass ``tool_format`` explicitly only if the model was trained on one of the supported ones):
:data:`UNSUPPORTED` — DeepSeek V3/R1 (``<｜tool▁calls▁begin｜>``), Gemma 4 (``<|tool_call>call:``), LFM2 pythonic
(``<|tool_call_start|>``), GLM-4.5 (``<arg_key>``), Qwen3-Coder / Qwen3.5 / Nemotron 3 XML (``<function=...>``),
GPT-OSS harmony (``to=functions.* ... <|call|>``), Llama 3.1 built-in tools (``<|python_tag|>name.call(...)``) and Mistral
(``[TOOL_CALLS]``).

A malformed call (not JSON, no name, arguments that are not an object, an unterminated block) is not an exception:
it is returned in :attr:`ParsedReply.errors`, and the tool environment answers with an error turn the model sees.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ToolCall", "ParsedReply", "parse_tool_calls", "detect_format", "TOOL_FORMATS", "UNSUPPORTED"]

#: unsupported formats: marker in the template source -> what it is
UNSUPPORTED = {
    "tool▁calls▁begin": "DeepSeek V3/R1 tool calls (<｜tool▁calls▁begin｜>)",
    "<|tool_call>": "Gemma 4 tool calls (<|tool_call>call:...)",
    "<|tool_call_start|>": "LFM2 pythonic tool calls (<|tool_call_start|>[f(x=1)])",
    "<arg_key>": "GLM-4.5 tool calls (<tool_call>name<arg_key>...)",
    "<function=": "Qwen3-Coder / Qwen3.5 / Nemotron 3 XML tool calls (<function=name><parameter=...>)",
    "<|call|>": "GPT-OSS harmony tool calls (<|channel|>commentary to=functions.name ... <|call|>)",
    "[TOOL_CALLS]": "Mistral tool calls ([TOOL_CALLS][...])",
}
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def as_message_call(self) -> dict:
        """The OpenAI-style entry of an assistant message's ``tool_calls`` (what chat templates render)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedReply:
    """``content``: the reply without its tool calls; ``calls``: the well-formed calls; ``errors``: one message per
    malformed call."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def message(self) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.calls:
            msg["tool_calls"] = [c.as_message_call() for c in self.calls]
        return msg


def _call_from_json(body: str, args_keys: tuple[str, ...]) -> ToolCall | str:
    """A :class:`ToolCall` from one call's JSON text, or the error message describing what is wrong with it."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"tool call is not valid JSON ({e.msg} at character {e.pos}): {body[:120]!r}"
    return _call_from_obj(obj, args_keys)


def _call_from_obj(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | str:
    if not isinstance(obj, dict):
        return f"a tool call must be a JSON object with 'name' and {args_keys[0]!r}, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return f"tool call has no 'name': {json.dumps(obj)[:120]}"
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):                         # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return f"the arguments of tool call {name!r} are a string that is not JSON: {args[:120]!r}"
    if not isinstance(args, dict):
        return f"the arguments of tool call {name!r} must be a JSON object, got {type(args).__name__}"
    return ToolCall(name, args)


def _add(result: ToolCall | str, reply: ParsedReply) -> None:
    (reply.calls if isinstance(result, ToolCall) else reply.errors).append(result)


def parse_hermes(text: str) -> ParsedReply:
    reply = ParsedReply(content="")
    for m in _HERMES.finditer(text):
        _add(_call_from_json(m.group(1).strip(), ("arguments", "parameters")), reply)
    rest = _HERMES.sub("", text)
    if "<tool_call>" in rest:
        reply.errors.append("unterminated <tool_call> block (no </tool_call>): "
                            f"{rest[rest.index('<tool_call>'):][:120]!r}")
        rest = rest[:rest.index("<tool_call>")]
    reply.content = rest.strip()
    return reply


def parse_llama3_json(text: str) -> ParsedReply:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return ParsedReply(content=text.strip())
    reply = ParsedReply(content="")
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as e:
            reply.errors.append(f"tool call is not valid JSON ({e.msg} at character {e.pos}): {body[pos:][:120]!r}")
            break
        _add(_call_from_obj(obj, ("parameters", "arguments")), reply)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return reply


TOOL_FORMATS: dict[str, Callable[[str], ParsedReply]] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


def parse_tool_calls(text: str, tool_format: str = "hermes") -> ParsedReply:
    """The tool calls of ``text`` in ``tool_format`` (see the module docstring)."""
    try:
        return TOOL_FORMATS[tool_format](text)
    except KeyError:
        raise ValueError(f"unknown tool-call format {tool_format!r}; supported: {sorted(TOOL_FORMATS)}") from None


def detect_format(template_source: str, template_name: str = "") -> str:
    """The tool-call format a chat template renders (``"hermes"`` or ``"llama3_json"``). Raises ``ValueError`` for
    the formats of :data:`UNSUPPORTED` and for a template that renders no tool calls at all."""
    for marker, what in UNSUPPORTED.items():
        if marker in template_source:
            raise ValueError(f"chat template {template_name!r} renders {what}, which is not supported; supported "
                             f"formats: {sorted(TOOL_FORMATS)}")
    if template_name == "llama3" or '"parameters": ' in template_source:
        return "llama3_json"
    if template_name in ("chatml", "plain") or "<tool_call>" in template_source:
        return "hermes"
    raise ValueError(f"chat template {template_name!r} renders no tool calls; pass tool_format= one of "
                     f"{sorted(TOOL_FORMATS)} if the model was trained to write one of them")
