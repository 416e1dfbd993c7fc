"""A chat session over a loaded model: the conversation so far (and its images), rendered with the model's chat
template at every turn and answered token by token with :func:`~llm_trainer.generation.streaming_generate`.
Used by ``llm-trainer chat``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..generation import GenerateConfig, streaming_generate
from .loading import ServedModel
from .text import TextStream

__all__ = ["ChatSession"]


class ChatSession:
    """``reply(text, images=(), write=print-like)`` streams the answer to ``write`` and returns it; ``reset()``
    forgets the conversation (the system prompt stays). ``seed`` seeds sampling once for the whole session."""

    def __init__(self, served: ServedModel, config: GenerateConfig, system: str | None = None,
                 seed: int | None = None):
        if served.kind == "reward":
            raise ValueError(f"{served.name} is a reward model; it scores text but does not chat (serve it and use "
                             "/v1/rewards)")
        self.served, self.config, self.system = served, config, system
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=served.device).manual_seed(seed)
        self.messages: list[dict] = []
        self.images: list = []
        self.interrupted = False

    def reset(self) -> None:
        self.messages, self.images = [], []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self, text: str, images: Sequence = (), write: Callable[[str], None] = print) -> str:
        """Add a user turn (with ``images``, VLM only), stream the answer through ``write``, keep both in the
        history. Ctrl-C stops the answer early: what was written so far is kept (``self.interrupted``)."""
        served = self.served
        if images and served.kind != "vlm":
            raise ValueError(f"{served.name} is a text model; it does not accept images")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}] if images else text
        self.messages.append({"role": "user", "content": content})
        try:
            prompt = served.chat_prompt(self.conversation(), self.images + list(images))
        except Exception:
            self.messages.pop()
            raise
        room = served.max_model_len - len(prompt.ids)
        if room < 1:
            self.messages.pop()
            raise ValueError(f"the conversation has {len(prompt.ids)} tokens and the model's context is "
                             f"{served.max_model_len} tokens; /reset to start over")
        self.images += list(images)
        config = GenerateConfig(**{**vars(self.config), "max_new_tokens": min(self.config.max_new_tokens, room)})
        stream = TextStream(served.tokenizer, strip_leading_space=served.tokenizer.chat_template == "plain")
        tokens = streaming_generate(served.model, prompt.ids, config, eos_token_ids=served.stop_token_ids,
                                    generator=self.generator, pixel_values=prompt.pixel_values)
        self.interrupted = False
        try:
            for token in tokens:
                write(stream.push(token)[0])
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            tokens.close()
            write(stream.flush())
            self.messages.append({"role": "assistant", "content": stream.text})
        return stream.text
