"""Built-in chat templates, written as Python (no Jinja at run time).

A template renders a conversation into a list of ``(text, trainable)`` segments. ``trainable`` marks the text an SFT
model should learn: an assistant message's body (its optional ``think`` block and content) plus its end-of-turn token
— never the role header, and never the separator written after the end-of-turn token. Joining the texts gives the
prompt string; :meth:`llm_trainer.tokenizer.Tokenizer.apply_chat_template` encodes the segments one by one to build
the assistant mask.

Templates
---------
``chatml`` (Qwen)::

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

  An assistant message with ``think`` renders (Qwen3 style) as
  ``<think>\\n{think stripped of newlines}\\n</think>\\n\\n{content without leading newlines}``.
  Generation prompt: ``<|im_start|>assistant\\n``.

``llama3``::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>

  Contents are stripped of surrounding whitespace, as the Llama 3 template does. Generation prompt:
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.

``plain`` (any tokenizer with an end-of-sequence token)::

    System: Be brief.\\n\\nUser: Hi\\nAssistant: Hello!{eos}\\n

  Generation prompt: ``Assistant:`` (the model generates the leading space).

Messages are mappings with ``role`` (str) and ``content`` (str, None, or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image"}``; an image part renders as the image placeholder token).
Assistant messages may carry ``think`` (alias ``reasoning_content``).
Each template also has an equivalent Jinja source (string contents only) that :meth:`Tokenizer.save` writes to
``tokenizer_config.json`` so that the saved folder works with ``transformers`` too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

Segment = tuple[str, bool]

__all__ = ["ChatTemplate", "TEMPLATES", "get_template", "detect_template", "normalise_messages", "Segment"]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    #: special tokens the template writes literally; tokenizing requires the tokenizer to know them as single tokens
    required_tokens: tuple[str, ...]
    #: token that ends an assistant turn; None → the tokenizer's eos token
    end_of_turn: str | None
    #: render(messages, add_generation_prompt, eos_token, image_token) -> segments
    render: Callable[[list[dict], bool, str | None, str], list[Segment]]
    #: Jinja equivalent for Hugging Face tooling (``chat_template`` in tokenizer_config.json)
    jinja: str
    #: vocabulary entries whose presence identifies the template
    markers: tuple[str, ...]


def _content_text(content: Any, image_token: str, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        out = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, Mapping) or "type" not in part:
                raise ValueError(f"{where}: content part {j} must be a string or a dict with a 'type' key, got {part!r}")
            if part["type"] == "text":
                out.append(str(part.get("text", "")))
            elif part["type"] == "image":
                out.append(image_token)
            else:
                raise ValueError(f"{where}: unsupported content part type {part['type']!r} (expected 'text' or 'image')")
        return "".join(out)
    raise ValueError(f"{where}: content must be a string, None or a list of parts, got {type(content).__name__}")


def normalise_messages(messages: Any, image_token: str = "<image>") -> list[dict]:
    """Validate a conversation and return ``[{"role", "content", "think"}]`` with string content."""
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, Mapping):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where} has no 'role' (got {role!r})")
        if "content" not in m and not (role == "assistant" and ("think" in m or "reasoning_content" in m)):
            raise ValueError(f"{where} (role {role!r}) has no 'content'")
        content = _content_text(m.get("content"), image_token, where)
        think = m.get("think", m.get("reasoning_content"))
        if think is not None:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages may carry 'think' (role is {role!r})")
            if not isinstance(think, str):
                raise ValueError(f"{where}: 'think' must be a string, got {type(think).__name__}")
        out.append({"role": role, "content": content, "think": think})
    return out


def _think_block(think: str | None, content: str) -> str:
    """Qwen3 rendering of a reasoning block before the answer."""
    if think is None:
        return content
    return "<think>\n" + think.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")


# ---------------------------------------------------------------------------------------------------------- chatml
def _render_chatml(messages: list[dict], add_generation_prompt: bool, eos: str | None, image: str) -> list[Segment]:
    segs: list[Segment] = []
    for m in messages:
        header = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            segs += [(header, False), (_think_block(m["think"], m["content"]) + "<|im_end|>", True), ("\n", False)]
        else:
            segs.append((header + m["content"] + "<|im_end|>\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


_CHATML_JINJA = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- if message['role'] == 'assistant' and message['think'] is defined and message['think'] is not none -%}"
    r"{{- '<think>\n' + message['think'].strip('\n') + '\n</think>\n\n' + message['content'].lstrip('\n') -}}"
    r"{%- else -%}{{- message['content'] -}}{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------------- llama3
def _render_llama3(messages: list[dict], add_generation_prompt: bool, eos: str | None, image: str) -> list[Segment]:
    segs: list[Segment] = [("<|begin_of_text|>", False)]
    for m in messages:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segs += [(header, False), (_think_block(m["think"], m["content"].strip()) + "<|eot_id|>", True)]
        else:
            segs.append((header + m["content"].strip() + "<|eot_id|>", False))
    if add_generation_prompt:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segs


_LLAMA3_JINJA = (
    r"{{- '<|begin_of_text|>' -}}"
    r"{%- for message in messages -%}"
    r"{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    r"{%- if message['role'] == 'assistant' and message['think'] is defined and message['think'] is not none -%}"
    r"{{- '<think>\n' + message['think'].strip('\n') + '\n</think>\n\n' + (message['content'] | trim).lstrip('\n') -}}"
    r"{%- else -%}{{- message['content'] | trim -}}{%- endif -%}"
    r"{{- '<|eot_id|>' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)


# ----------------------------------------------------------------------------------------------------------- plain
def _render_plain(messages: list[dict], add_generation_prompt: bool, eos: str | None, image: str) -> list[Segment]:
    if not eos:
        raise ValueError("the 'plain' chat template needs an end-of-sequence token; this tokenizer has none")
    segs: list[Segment] = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            segs += [("Assistant:", False), (" " + _think_block(m["think"], m["content"]) + eos, True), ("\n", False)]
        elif role == "system":
            segs.append((f"System: {m['content']}\n\n", False))
        else:
            segs.append((f"{role[:1].upper() + role[1:]}: {m['content']}\n", False))
    if add_generation_prompt:
        segs.append(("Assistant:", False))
    return segs


_PLAIN_JINJA = (
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'assistant' -%}"
    r"{{- 'Assistant: ' -}}"
    r"{%- if message['think'] is defined and message['think'] is not none -%}"
    r"{{- '<think>\n' + message['think'].strip('\n') + '\n</think>\n\n' + message['content'].lstrip('\n') -}}"
    r"{%- else -%}{{- message['content'] -}}{%- endif -%}"
    r"{{- eos_token + '\n' -}}"
    r"{%- elif message['role'] == 'system' -%}{{- 'System: ' + message['content'] + '\n\n' -}}"
    r"{%- else -%}{{- message['role'][:1] | upper -}}{{- message['role'][1:] + ': ' + message['content'] + '\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", _render_chatml, _CHATML_JINJA,
                           ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate("llama3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                           "<|eot_id|>", _render_llama3, _LLAMA3_JINJA, ("<|start_header_id|>", "<|eot_id|>")),
    "plain": ChatTemplate("plain", (), None, _render_plain, _PLAIN_JINJA, ()),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; built-in templates: {sorted(TEMPLATES)}") from None


def detect_template(has_token: Callable[[str], bool], jinja: str | None = None) -> str:
    """Pick a built-in template name: from a Jinja ``chat_template`` string's markers, else from the vocabulary."""
    if jinja:
        for name in ("chatml", "llama3"):
            if all(marker in jinja for marker in TEMPLATES[name].markers):
                return name
    for name in ("chatml", "llama3"):
        if all(has_token(marker) for marker in TEMPLATES[name].markers):
            return name
    return "plain"
