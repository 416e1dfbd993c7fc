"""Chat templates: the model's own (Jinja from ``tokenizer_config.json`` / ``chat_template.jinja``) and our built-ins.

A :class:`ChatTemplate` is Jinja source plus where it came from. Every template, built-in or not, renders through the
one sandboxed engine in :mod:`llm_trainer.chat.jinja`.

Where a tokenizer folder's templates come from (the order ``transformers`` uses)
------------------------------------------------------------------------------
``chat_template.jinja`` (the template named ``default``) and ``additional_chat_templates/NAME.jinja`` beside
``tokenizer.json``; when neither exists, ``tokenizer_config.json``'s ``chat_template``: a string (named ``default``)
or a list of ``{"name", "template"}`` (named templates). Without any, a built-in is used (below).
Choosing among named templates (:func:`select`): the name asked for; else ``tool_use`` when tools are passed and it
exists; else ``default``.

Built-in templates (for tokenizers trained here)
------------------------------------------------
``chatml`` (Qwen)::

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

  An assistant message with reasoning (``reasoning_content``, alias ``think``) renders, Qwen3 style, as
  ``<think>\\n{reasoning stripped of newlines}\\n</think>\\n\\n{content without leading newlines}``.
  Generation prompt: ``<|im_start|>assistant\\n``.

``llama3``::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>

  Contents are stripped of surrounding whitespace, as the Llama 3 template does. Generation prompt:
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.

``plain`` (any tokenizer with an end-of-sequence token)::

    System: Be brief.\\n\\nUser: Hi\\nAssistant: Hello!{eos}\\n

  Generation prompt: ``Assistant:`` (the model generates the leading space).

Contents may be a string or a list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` (an image part
renders as the variable ``image_token``, default ``<image>``). The ``{% generation %}`` block of each built-in covers
an assistant message's body (reasoning block and content) and its end-of-turn token — never the role header, never the
separator after the end-of-turn token. The same source is written to ``tokenizer_config.json`` by
:meth:`llm_trainer.tokenizer.Tokenizer.save`, so ``transformers`` renders saved tokenizers identically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from llm_trainer.chat.jinja import ChatTemplateError, compile_template, has_generation_blocks

__all__ = ["ChatTemplate", "TEMPLATES", "get_builtin", "detect_builtin", "load_model_templates", "select",
           "config_entry"]


@dataclass(frozen=True)
class ChatTemplate:
    """Jinja ``source`` named ``name``; ``origin`` says where it came from (a file, or ``built-in``)."""

    name: str
    source: str
    origin: str
    #: built-ins only: the token that ends an assistant turn (None: the tokenizer's eos)
    end_of_turn: str | None = None
    #: built-ins only: vocabulary entries whose presence identifies the template
    markers: tuple[str, ...] = field(default=())

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"

    @property
    def has_generation(self) -> bool:
        """Whether the template marks assistant output with ``{% generation %}`` blocks."""
        return has_generation_blocks(self.source)

    def __str__(self) -> str:
        return f"{self.name!r} (built-in)" if self.builtin else f"{self.name!r} from {self.origin}"


# Per message, shared by the built-ins: `content` (its text: a string, or a list of text/image parts joined) and
# `think` (its reasoning block, '' if none). Inline rather than macros: a macro call costs more than the rest.
_MESSAGE = (
    r"{%- if message.content is string -%}{%- set content = message.content -%}"
    r"{%- elif message.content is not defined or message.content is none -%}{%- set content = '' -%}"
    r"{%- elif message.content is sequence and message.content is not mapping -%}"
    r"{%- set parts = namespace(text='') -%}"
    r"{%- for part in message.content -%}"
    r"{%- if part is string -%}{%- set parts.text = parts.text + part -%}"
    r"{%- elif part is not mapping or part.type is not defined -%}"
    r"{{- raise_exception('content part ' ~ loop.index0 ~ ' must be a string or a dict with a type key') -}}"
    r"{%- elif part.type == 'text' -%}{%- set parts.text = parts.text + part.text | default('') -%}"
    r"{%- elif part.type == 'image' -%}{%- set parts.text = parts.text + image_token | default('<image>') -%}"
    r'{%- else -%}{{- raise_exception("unsupported content part type " ~ part.type ~ " (expected text or image)") -}}'
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- set content = parts.text -%}"
    r"{%- else -%}{{- raise_exception('content must be a string or a list of parts') -}}"
    r"{%- endif -%}"
    r"{%- set r = message.reasoning_content if message.reasoning_content is defined else message.think -%}"
    r"{%- set think = '' -%}"
    r"{%- if r is defined and r is not none -%}"
    r"{%- if message.role != 'assistant' -%}"
    r"{{- raise_exception('only assistant messages may carry reasoning (role is ' ~ message.role ~ ')') -}}"
    r"{%- elif r is not string -%}{{- raise_exception('reasoning must be a string') -}}"
    r"{%- endif -%}"
    r"{%- set think = '<think>\n' + r.strip('\n') + '\n</think>\n\n' -%}"
    r"{%- endif -%}"
)

# the assistant body: reasoning block (if any) + content, with the content's leading newlines dropped after a block
_BODY = r"{{- think + (content.lstrip('\n') if think else content) -}}"

_CHATML = (
    r"{%- for message in messages -%}" + _MESSAGE +
    r"{%- if message.role == 'assistant' -%}"
    r"{{- '<|im_start|>assistant\n' -}}"
    r"{%- generation -%}" + _BODY + r"{{- '<|im_end|>' -}}{%- endgeneration -%}"
    r"{{- '\n' -}}"
    r"{%- else -%}"
    r"{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_LLAMA3 = (
    r"{{- '<|begin_of_text|>' -}}"
    r"{%- for message in messages -%}" + _MESSAGE +
    r"{%- set content = content | trim -%}"
    r"{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' -}}"
    r"{%- if message.role == 'assistant' -%}"
    r"{%- generation -%}" + _BODY + r"{{- '<|eot_id|>' -}}{%- endgeneration -%}"
    r"{%- else -%}"
    r"{{- content + '<|eot_id|>' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

_PLAIN = (
    r"{%- if eos_token is not defined or not eos_token -%}"
    r'{{- raise_exception("the plain chat template needs an end-of-sequence token; this tokenizer has none") -}}'
    r"{%- endif -%}"
    r"{%- for message in messages -%}" + _MESSAGE +
    r"{%- if message.role == 'assistant' -%}"
    r"{{- 'Assistant:' -}}"
    r"{%- generation -%}{{- ' ' -}}" + _BODY + r"{{- eos_token -}}{%- endgeneration -%}"
    r"{{- '\n' -}}"
    r"{%- elif message.role == 'system' -%}{{- 'System: ' + content + '\n\n' -}}"
    r"{%- else -%}{{- message.role[:1] | upper -}}{{- message.role[1:] + ': ' + content + '\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", _CHATML, "built-in", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate("llama3", _LLAMA3, "built-in", "<|eot_id|>", ("<|start_header_id|>", "<|eot_id|>")),
    "plain": ChatTemplate("plain", _PLAIN, "built-in", None, ()),
}


def get_builtin(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; built-in templates: {sorted(TEMPLATES)}") from None


def detect_builtin(has_token: Callable[[str], bool]) -> str:
    """The built-in whose marker tokens the vocabulary has (chatml, then llama3), else ``plain``."""
    for name in ("chatml", "llama3"):
        if all(has_token(marker) for marker in TEMPLATES[name].markers):
            return name
    return "plain"


def load_model_templates(folder: Path | None, config: Mapping, config_file: str) -> dict[str, ChatTemplate]:
    """The templates a tokenizer folder ships (see the module docstring), by name; empty if none. Each is compiled
    once here, so a syntax error is reported when the tokenizer is loaded, naming the file."""
    found: dict[str, ChatTemplate] = {}
    if folder is not None:
        single = folder / "chat_template.jinja"
        if single.is_file():
            found["default"] = ChatTemplate("default", single.read_text(encoding="utf-8"), str(single))
        extra = folder / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                found[f.name.removesuffix(".jinja")] = ChatTemplate(f.name.removesuffix(".jinja"),
                                                                    f.read_text(encoding="utf-8"), str(f))
    if not found:
        value = config.get("chat_template")
        if isinstance(value, str):
            found["default"] = ChatTemplate("default", value, f"{config_file} (chat_template)")
        elif isinstance(value, list):
            for j, entry in enumerate(value):
                if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise ValueError(f"{config_file}: chat_template[{j}] must be {{'name': str, 'template': str}}")
                found[entry["name"]] = ChatTemplate(entry["name"], entry["template"],
                                                    f"{config_file} (chat_template {entry['name']!r})")
        elif value is not None:
            raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates, "
                             f"got {type(value).__name__}")
    for tpl in found.values():
        try:
            compile_template(tpl.source)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"chat template {tpl}: {e}") from None
    return found


def select(model: Mapping[str, ChatTemplate], builtin: str, name: str | None = None,
           tools: object = None) -> ChatTemplate:
    """The template to render with: ``name`` (a model template's name, a built-in's name, or Jinja source), else the
    model's (``tool_use`` when ``tools`` are given and it exists, else ``default``), else the built-in ``builtin``."""
    if name is not None:
        if name in model:
            return model[name]
        if name in TEMPLATES:
            return TEMPLATES[name]
        if "{{" in name or "{%" in name:
            compile_template(name)
            return ChatTemplate("custom", name, "the template argument")
        raise ValueError(f"unknown chat template {name!r}; this tokenizer's templates: {sorted(model)}, built-in "
                         f"templates: {sorted(TEMPLATES)}, or pass Jinja source")
    if not model:
        return TEMPLATES[builtin]
    if tools is not None and "tool_use" in model:
        return model["tool_use"]
    if "default" in model:
        return model["default"]
    raise ValueError(f"this tokenizer has several chat templates and none is named 'default'; pass template= one of "
                     f"{sorted(model)}")


def config_entry(model: Mapping[str, ChatTemplate]) -> str | list[dict] | None:
    """``tokenizer_config.json``'s ``chat_template`` value for ``model`` templates (a string for a lone ``default``)."""
    if not model:
        return None
    if list(model) == ["default"]:
        return model["default"].source
    return [{"name": n, "template": t.source} for n, t in model.items()]
