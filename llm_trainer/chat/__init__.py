"""Chat templates: a model's own Jinja template (rendered sandboxed, as ``transformers`` renders it) or a built-in
one, and the assistant spans behind SFT/DPO loss masks. :class:`llm_trainer.tokenizer.Tokenizer` is the entry point
(``apply_chat_template``); this package is its engine.

- :mod:`~llm_trainer.chat.jinja`: the sandboxed environment, message preparation, ``{% generation %}`` tracking;
- :mod:`~llm_trainer.chat.templates`: :class:`ChatTemplate`, the built-ins, loading a tokenizer folder's templates;
- :mod:`~llm_trainer.chat.turns`: rendering a conversation with its assistant spans (generation blocks or prefix
  renders), earlier turns' reasoning, spans → token mask.
"""
from llm_trainer.chat.jinja import REASONING_FIELDS, ChatTemplateError, Rendered
from llm_trainer.chat.templates import TEMPLATES, ChatTemplate, detect_builtin, get_builtin
from llm_trainer.chat.turns import REASONING_HISTORY, render_conversation, spans_to_mask

__all__ = ["ChatTemplate", "ChatTemplateError", "Rendered", "TEMPLATES", "REASONING_FIELDS", "REASONING_HISTORY",
           "detect_builtin", "get_builtin", "render_conversation", "spans_to_mask"]
