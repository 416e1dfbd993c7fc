"""Sandboxed Jinja rendering of chat templates, with the environment ``transformers`` gives them.

A model's ``chat_template`` is untrusted code from a model repository. It is compiled in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (no attribute access to ``__class__``/``__globals__`` & co., no
mutation of the inputs, bounded ``range``), with the settings and helpers of ``transformers``'
``render_jinja_template``, so that a template renders the same string here as under
``transformers.PreTrainedTokenizerBase.apply_chat_template``:

- ``trim_blocks=True``, ``lstrip_blocks=True``, the ``loopcontrols`` extension (``{% break %}``/``{% continue %}``);
- globals ``raise_exception(msg)``, ``strftime_now(fmt)``, ``dict(...)``, ``namespace(...)`` (refusing
  underscore-prefixed attributes); filter ``tojson`` (``json.dumps`` without HTML escaping, with ``indent``,
  ``separators``, ``sort_keys``);
- the ``{% generation %}…{% endgeneration %}`` tag, whose output spans (character offsets in the rendered string) are
  recorded exactly as ``transformers`` records them for ``return_assistant_tokens_mask``;
- inputs rebuilt from plain JSON types (anything else becomes an inert ``"<TypeName>"`` placeholder), keys whose value
  is ``None`` dropped from each message, and a message's reasoning copied under ``reasoning_content`` and
  ``thinking`` from whichever of ``reasoning_content``/``thinking``/``reasoning`` it has (we also read ``think``).
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "compile_template", "render", "prepare_messages", "written_control_tokens",
           "has_generation_blocks", "REASONING_FIELDS"]

#: names a message's reasoning may come under; the first two are the ones chat templates read
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning", "think")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """A chat template failed (``raise_exception``, a bad input, an unsafe operation stopped by the sandbox) or cannot
    be used with this tokenizer. The message names the template and, where known, the message index."""


class _GenerationTracker(jinja2.ext.Extension):
    """``{% generation %}`` body ``{% endgeneration %}``: renders the body and records its character span while a
    render is being tracked (same bookkeeping as ``transformers``' ``AssistantTracker``)."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self._tracking: ContextVar = ContextVar("generation_tracker", default=None)
        environment.extend(track_generation=self.track)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        out = caller()
        state = self._tracking.get()
        if state is not None:
            blocks, spans = state
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(out)))
        return out

    @contextmanager
    def track(self, blocks: list[str], spans: list[tuple[int, int]]):
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


def _raise_exception(message: Any):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` inside a template: builds plain dicts, exposes nothing else."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (a way into interpreter internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 -- jinja's own signature trick, so `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold underscore-prefixed attributes ({name!r})")


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile (cached by source) in the sandbox; a syntax error raises :class:`ChatTemplateError`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"syntax error at line {e.lineno}: {e.message}") from None


def has_generation_blocks(source: str) -> bool:
    return _GENERATION_TAG.search(source) is not None


# Spellings of control tokens in a template's literal text: <|...|>, <|...>, <...|> (Gemma 4), <｜...｜> (DeepSeek),
# <..._of_...> (Gemma, SmolVLM).
_CONTROL_TOKEN = re.compile(r"<\|[^\s<>|]*\|?>|<[^\s<>|]+\|>|<｜[^<>｜]*｜>|<[a-z]+(?:_[a-z]+)*_of_[a-z_]+>")


@lru_cache(maxsize=64)
def written_control_tokens(source: str) -> tuple[str, ...]:
    """Control tokens spelled out in the template's literal text and string constants (the tokens it writes)."""
    env = compile_template(source).environment
    ast = env.parse(source)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return tuple(sorted({m for lit in literals for m in _CONTROL_TOKEN.findall(lit)}))


def _plain(value: Any) -> Any:
    """Rebuild from plain JSON types; anything else becomes ``"<TypeName>"`` (templates never read media values, and
    rich objects carry methods the sandbox cannot vet)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Any) -> list[dict]:
    """Validate the conversation's shape and return the copy a template sees (see the module docstring)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no 'role' (got {role!r})")
        msg = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((msg[k] for k in REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


@dataclass
class Rendered:
    """A rendered conversation: the text, and the ``{% generation %}`` spans (character offsets) in it."""

    text: str
    spans: list[tuple[int, int]]


def render(source: str, messages: list[dict], add_generation_prompt: bool, variables: Mapping[str, Any],
           tools: list | None = None, documents: list | None = None) -> Rendered:
    """Render already-prepared ``messages``. Template failures propagate as raised (the caller names the message)."""
    template = compile_template(source)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    kwargs = _plain(dict(variables))
    with template.environment.track_generation(blocks, spans):
        for block in template.generate(messages=messages, tools=_plain(tools), documents=_plain(documents),
                                       add_generation_prompt=add_generation_prompt, **kwargs):
            blocks.append(block)
    return Rendered("".join(blocks), spans)
