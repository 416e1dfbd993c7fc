"""Render a conversation and find what the model should learn in it: the assistant spans behind every mask.

:func:`render_conversation` is the one path from messages to ``(text, character spans of assistant output)``:

- a template with ``{% generation %}`` blocks: the spans are those blocks' output, exactly as ``transformers``
  records them for ``return_assistant_tokens_mask``;
- any other template: each assistant message ``i`` is located by rendering prefixes of the conversation (the method
  TRL and LLaMA-Factory use). Its span starts where ``messages[:i]`` rendered with the generation prompt ends (or,
  when the generation prompt writes a prefill the conversation lacks at that turn, such as ``<think>\n``, where the
  two stop agreeing), and ends where ``messages[:i+1]`` rendered alone ends, when that is a prefix of the whole.
  Some templates render a turn differently when it is the last one (Qwen3 and Nemotron drop earlier turns'
  reasoning; Phi-3 closes the conversation with eos). Then the turn's end is found by a marker appended to its
  content (or its last tool call's name, or standing for an empty content): the span ends after the text that
  follows the marker both when the turn is last and in the conversation. A template that cannot be split either way
  raises :class:`ChatTemplateError` naming the message. Prefix comparisons never end inside a control token.

:func:`spans_to_mask` turns character spans into a token mask the way ``transformers`` does: a token is trained when
it overlaps a span.

Earlier turns' reasoning (``reasoning_history``): ``"template"`` renders as the template does (Qwen3 drops the
reasoning of turns before the last user message); ``"drop"`` removes the reasoning fields of those turns before
rendering (whatever the template would do); ``"keep"`` renders every assistant turn as the template renders it when it
is the last message — reasoning included and trained — and the rest of the conversation as the template renders it
(what LLaMA-Factory does for multi-turn reasoning data).
"""
from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from jinja2.exceptions import SecurityError, TemplateError

from llm_trainer.chat.jinja import (REASONING_FIELDS, ChatTemplateError, Rendered, prepare_messages, render,
                                    written_control_tokens)
from llm_trainer.chat.templates import ChatTemplate

__all__ = ["render_conversation", "spans_to_mask", "check_control_tokens", "end_of_turn", "REASONING_HISTORY"]

REASONING_HISTORY = ("template", "keep", "drop")
_MARK = "\U0010fffd"  # a private-use character: the anchor appended to a turn's content


class _Renderer:
    """Renders message lists with one template and fixed variables; turns failures into errors naming the message."""

    def __init__(self, template: ChatTemplate, variables: Mapping[str, Any], tools: Any, documents: Any):
        self.template, self.variables, self.tools, self.documents = template, variables, tools, documents

    def __call__(self, msgs: list[dict], gen: bool) -> Rendered:
        return render(self.template.source, msgs, gen, self.variables, self.tools, self.documents)

    def _ok(self, msgs: list[dict], gen: bool) -> bool:
        try:
            self(msgs, gen)
            return True
        except Exception:  # noqa: BLE001 -- any failure of the template counts
            return False

    def checked(self, msgs: list[dict], gen: bool) -> Rendered:
        try:
            return self(msgs, gen)
        except Exception as e:  # noqa: BLE001 -- a template is user code: every failure is reported as its failure
            raise self._error(msgs, gen, e) from None

    def _error(self, msgs: list[dict], gen: bool, exc: Exception) -> ChatTemplateError:
        if isinstance(exc, SecurityError):
            reason = f"an unsafe operation was stopped by the sandbox ({exc})"
        elif type(exc) is TemplateError:  # raise_exception(...)
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        where = self._where(msgs, gen)
        return ChatTemplateError(f"chat template {self.template} failed {where}: {reason}")

    def _where(self, msgs: list[dict], gen: bool) -> str:
        """The first message the template cannot render: the one after the longest prefix that renders."""
        if gen and self._ok(msgs, False):
            return f"at the generation prompt after message {len(msgs) - 1}"
        k = next((k for k in range(len(msgs) - 1, 0, -1) if self._ok(msgs[:k], False)), 0)
        return f"at message {k} (role {msgs[k].get('role')!r})"


def _common_prefix(a: str, b: str, atoms: re.Pattern | None) -> int:
    """Length of the common prefix of ``a`` and ``b``, never ending inside a control token (``atoms``)."""
    n = len(os.path.commonprefix((a, b)))
    moved = atoms is not None
    while moved:
        moved = False
        for s in (a, b):
            for m in atoms.finditer(s, max(0, n - 256), min(len(s), n + 256)):
                if m.start() < n < m.end():
                    n, moved = m.start(), True
    return n


def _anchors(message: dict) -> Iterator[dict]:
    """``message`` with the marker at the end of its content, at the end of its last tool call's name, or as its
    whole content (for a content the template renders as nothing): the places a turn can be located by."""
    content = message.get("content")
    if isinstance(content, str) and content.strip():
        yield {**message, "content": content + _MARK}
    if isinstance(content, list):
        for j in range(len(content) - 1, -1, -1):
            part = content[j]
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) \
                    and part["text"].strip():
                yield {**message, "content": content[:j] + [{**part, "text": part["text"] + _MARK}] + content[j + 1:]}
                break
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls and isinstance(calls[-1], dict):
        call = calls[-1]
        nested = isinstance(call.get("function"), dict)
        fn = call["function"] if nested else call
        if isinstance(fn.get("name"), str) and fn["name"]:
            fn = {**fn, "name": fn["name"] + _MARK}
            yield {**message, "tool_calls": calls[:-1] + [{**call, "function": fn} if nested else fn]}
    yield {**message, "content": _MARK}


@dataclass
class _Turn:
    """An assistant message spans ``[start, end)`` of the conversation. When it renders differently as the last
    message, ``last`` is that rendering: it agrees with the conversation up to ``splice``, and the turn's output
    (after any generation-prompt prefill) is ``[last_start, last_end)`` in it."""

    start: int
    end: int
    last: Rendered | None = None
    splice: int = 0
    last_start: int = 0
    last_end: int = 0


class _Splitter:
    def __init__(self, r: _Renderer, msgs: list[dict], full: str, gen: bool, atoms: re.Pattern | None):
        self.r, self.msgs, self.full, self.gen, self.atoms = r, msgs, full, gen, atoms

    def _fail(self, i: int, why: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"chat template {self.r.template} cannot be split into turns at message {i} (role 'assistant'): {why}. "
            "The assistant mask needs {% generation %} blocks in the template, or a template that renders the "
            "conversation up to each assistant message as a prefix of the whole; pass such a template with "
            "template=... (e.g. TRL's *_training variants)")

    def _render(self, i: int, msgs: list[dict], gen: bool) -> Rendered:
        try:
            return self.r(msgs, gen)
        except Exception as e:  # noqa: BLE001
            raise self._fail(i, f"rendering messages[:{len(msgs)}] alone fails ({type(e).__name__}: {e})") from None

    def turns(self) -> list[_Turn]:
        out: list[_Turn] = []
        for i, m in enumerate(self.msgs):
            if m["role"] == "assistant":
                out.append(self._turn(i, out[-1].end if out else 0))
        return out

    def _turn(self, i: int, prev_end: int) -> _Turn:
        full, msgs = self.full, self.msgs
        if i == 0:
            raise self._fail(0, "the conversation starts with it, so there is no prompt to split at")
        prompt = self._render(i, msgs[:i], True).text
        last = self._render(i, msgs[:i + 1], False)
        # the turn starts where the generation prompt ends (or stops agreeing: a prefill such as "<think>\n" that the
        # template writes only before a new turn), and ends where the conversation cut after it ends
        start = len(prompt) if full.startswith(prompt) else _common_prefix(prompt, full, self.atoms)
        if full.startswith(last.text):
            turn = _Turn(start, len(last.text))
        else:  # rendered differently as the last message: locate its end by an anchor
            turn = self._anchored_turn(i, prompt, last, start)
        if not prev_end <= min(turn.start, turn.splice if turn.last else turn.start) <= turn.end:
            raise self._fail(i, "the generation prompt does not match where the message starts")
        return turn

    def _anchored_turn(self, i: int, prompt: str, last: Rendered, start: int) -> _Turn:
        full = self.full
        if _MARK not in full:
            for anchored in _anchors(self.msgs[i]):
                marked = self.msgs[:i] + [anchored] + self.msgs[i + 1:]
                full_m = self._render(i, marked, self.gen).text
                last_m = self._render(i, marked[:i + 1], False).text
                if full_m.count(_MARK) == last_m.count(_MARK) == 1 and full_m.replace(_MARK, "") == full \
                        and last_m.replace(_MARK, "") == last.text:
                    pos, pos_last = full_m.index(_MARK), last_m.index(_MARK)
                    tail = _common_prefix(last.text[pos_last:], full[pos:], self.atoms)
                    splice = min(start, _common_prefix(last.text, full, self.atoms))
                    last_start = max(splice, _common_prefix(prompt, last.text, self.atoms))
                    return _Turn(start, pos + tail, last, splice, last_start, pos_last + tail)
        raise self._fail(i, "the template renders it differently when it is the last message, and no marker in its "
                            "content or tool calls locates it")


def _drop_history_reasoning(msgs: list[dict]) -> list[dict]:
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    return [{k: v for k, v in m.items() if k not in REASONING_FIELDS} if i < last_user and m["role"] == "assistant"
            else m for i, m in enumerate(msgs)]


def _clip(spans: Sequence[tuple[int, int]], a: int, b: int, shift: int) -> list[tuple[int, int]]:
    return [(max(s, a) - a + shift, min(e, b) - a + shift) for s, e in spans if s < b and e > a]


def _keep(template: ChatTemplate, full: Rendered, turns: list[_Turn]) -> Rendered:
    """Splice each turn's as-last rendering into the conversation in place of its in-conversation rendering."""
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    cursor = size = 0
    for t in turns:
        a, b = (t.start, t.end) if t.last is None else (t.splice, t.end)
        if template.has_generation:
            spans += _clip(full.spans, cursor, a, size)
        text.append(full.text[cursor:a])
        size += a - cursor
        if t.last is None:
            body, out = full.text[a:b], (a, b)
            body_spans = _clip(full.spans, a, b, size)
        else:  # the as-last rendering agrees with the conversation up to `a` (= splice)
            body, out = t.last.text[a:t.last_end], (t.last_start, t.last_end)
            body_spans = _clip(t.last.spans, a, t.last_end, size)
        spans += body_spans if template.has_generation else [(size + out[0] - a, size + out[1] - a)]
        text.append(body)
        size += len(body)
        cursor = b
    if template.has_generation:
        spans += _clip(full.spans, cursor, len(full.text), size)
    text.append(full.text[cursor:])
    return Rendered("".join(text), spans)


def render_conversation(template: ChatTemplate, messages: Any, *, add_generation_prompt: bool = False,
                        variables: Mapping[str, Any] | None = None, tools: Any = None, documents: Any = None,
                        reasoning_history: str = "template", with_spans: bool = True,
                        atoms: re.Pattern | None = None) -> Rendered:
    """Render ``messages``; with ``with_spans`` also the character spans of assistant output (see the module
    docstring). ``atoms`` matches the tokenizer's control tokens (prefix comparisons never split one)."""
    if reasoning_history not in REASONING_HISTORY:
        raise ValueError(f"reasoning_history must be one of {REASONING_HISTORY}, got {reasoning_history!r}")
    msgs = prepare_messages(messages)
    if reasoning_history == "drop":
        msgs = _drop_history_reasoning(msgs)
    r = _Renderer(template, variables or {}, tools, documents)
    full = r.checked(msgs, add_generation_prompt)
    if reasoning_history == "keep":
        return _keep(template, full, _Splitter(r, msgs, full.text, add_generation_prompt, atoms).turns())
    if not with_spans:
        return Rendered(full.text, [])
    if template.has_generation:
        return full
    turns = _Splitter(r, msgs, full.text, add_generation_prompt, atoms).turns()
    return Rendered(full.text, [(t.start, t.end) for t in turns])


def spans_to_mask(spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token (character ``offsets``, in order) overlapping a span (``start < span end`` and ``end > span
    start``) — ``transformers``' rule for ``assistant_masks``; two binary searches per span."""
    mask = [0] * len(offsets)
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    for s, e in spans:
        lo, hi = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)
        mask[lo:hi] = [1] * max(0, hi - lo)
    return mask


def check_control_tokens(template: ChatTemplate, text: str, has_token: Callable[[str], bool], messages: Any,
                         **render_kwargs: Any) -> None:
    """Raise if ``text`` holds a control token the template writes (``<|...|>``, ``<｜...｜>``, ``<..._of_...>``) that
    is not a token of the vocabulary (``has_token``): encoding would split it into pieces."""
    missing = [t for t in written_control_tokens(template.source) if t in text and not has_token(t)]
    if not missing:
        return
    where = "in the generation prompt"
    for k in range(1, len(messages) + 1):
        try:
            part = render_conversation(template, messages[:k], with_spans=False, **render_kwargs).text
        except ValueError:  # a template that cannot render this prefix
            continue
        if missing[0] in part:
            where = f"first for message {k - 1}"
            break
    raise ChatTemplateError(
        f"chat template {template} needs the special tokens {missing}, which this tokenizer lacks ({missing[0]!r} is "
        f"written {where}); use a template made for this tokenizer, or add the tokens with add_special_tokens() and "
        "resize the model's embeddings")


def end_of_turn(template: ChatTemplate, variables: Mapping[str, Any], control_tokens: re.Pattern,
                special: set[str]) -> str | None:
    """The first special token the template writes after an assistant's content (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ...): what ends a generated turn. None if the template cannot render a probe conversation."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text = render_conversation(template, probe, variables=variables, with_spans=False).text
    except (ValueError, TypeError):
        return None
    if "Hello" not in text:
        return None
    after = text[text.rfind("Hello") + len("Hello"):]
    return next((m.group(0) for m in control_tokens.finditer(after) if m.group(0) in special), None)
