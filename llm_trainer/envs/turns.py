"""Token ids of environment turns, appended to a trajectory without re-tokenising it (token in, token out).

A multi-turn trajectory is ``prompt ids + generated ids + appended ids + generated ids + ...``: the generated ids
are exactly what the policy sampled (ending with its stop token), never decoded and encoded again. The ids of the
environment's turns are found with the chat template, as :mod:`llm_trainer.chat.turns` finds assistant spans:

1. render the conversation so far (ending with the assistant's reply) and the conversation extended by the new
   messages plus the generation prompt;
2. the reply ends at its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``; the template's, as
   ``Tokenizer.chat_stop_token_ids`` finds it): the ``k``-th one of the first render, where ``k`` is the number of
   end-of-turn tokens in it (only whitespace may follow the last one);
3. the appended text is everything after the ``k``-th end-of-turn token of the extended render — the separator
   after the turn (``"\\n"`` in ChatML), the new messages and the next generation prompt — encoded on its own. It
   starts right after a special token, so its tokens are those the whole conversation would have there.

Counting end-of-turn tokens instead of comparing prefixes makes step 3 correct also for templates that render the
history differently once a message follows (e.g. Qwen3 drops the reasoning of turns before the last user message):
that is reported (:attr:`Appended.history_rerendered`) but changes nothing in the trajectory, which keeps what the
model actually saw. :attr:`Appended.prefix_matches` says whether re-rendering and re-tokenising the conversation
would have given the trajectory's ids — False whenever the model's reply is not the template's canonical rendering
of the parsed message (tool-call JSON spacing, a non-canonical tokenisation of the same text, an EOS instead of the
end-of-turn token): exactly the drift that decoding and re-encoding between turns would bring into training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["TurnEncoder", "Appended"]


@dataclass
class Appended:
    """``ids``: the tokens to append; ``prefix_matches``: the rendered conversation so far tokenises to the
    trajectory; ``history_rerendered``: the template renders the history differently once the new turns follow."""

    ids: list[int]
    prefix_matches: bool
    history_rerendered: bool


class TurnEncoder:
    """Encodes an episode's first prompt and its appended environment turns with ``tokenizer``'s chat template
    (``template``: a name or Jinja source, None → the tokenizer's; ``template_kwargs``: extra template variables)."""

    def __init__(self, tokenizer: Any, template: str | None = None, **template_kwargs: Any):
        self.tokenizer = tokenizer
        self.template = template
        self.template_kwargs = template_kwargs

    def chat_template(self, tools: Sequence[dict] | None = None):
        """The :class:`~llm_trainer.chat.ChatTemplate` that renders an episode with ``tools``."""
        return self.tokenizer.get_chat_template(self.template, tools)

    def end_of_turn(self, tools: Sequence[dict] | None = None) -> str:
        tpl = self.chat_template(tools)
        stops = self.tokenizer.chat_stop_token_ids(tpl.source if tpl.name == "custom" else tpl.name)
        if not stops:
            raise ValueError(f"chat template {tpl} has no end-of-turn token and the tokenizer no EOS: the end of an "
                             f"assistant turn cannot be located")
        return self.tokenizer.id_to_token(stops[0])

    def _render(self, messages: list[dict], gen: bool, tools) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False,
                                                  template=self.template, tools=tools, **self.template_kwargs)

    def prompt_ids(self, messages: list[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """Ids of the first messages followed by the generation prompt."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, template=self.template,
                                                       tools=tools, **self.template_kwargs).input_ids)

    def append(self, history: list[dict], new: list[dict], trajectory: Sequence[int],
               tools: Sequence[dict] | None = None) -> Appended:
        """The ids of ``new`` messages plus the next generation prompt, after ``history`` (which ends with the
        assistant's reply; ``trajectory``: all ids so far, prompt included)."""
        eot = self.end_of_turn(tools)
        base = self._render(history, False, tools)
        k = base.count(eot)
        last = base.rfind(eot)
        if k == 0 or base[last + len(eot):].strip():
            raise ValueError(f"chat template {self.chat_template(tools)} does not end the last assistant turn with "
                             f"its end-of-turn token {eot!r} (followed by whitespace only), so the turns the "
                             f"environment appends cannot be located")
        ext = self._render(history + new, True, tools)
        pos = -len(eot)
        for _ in range(k):
            pos = ext.find(eot, pos + len(eot))
            if pos < 0:
                raise ValueError(f"chat template {self.chat_template(tools)} renders fewer end-of-turn tokens "
                                 f"{eot!r} once the environment's messages follow; the appended turns cannot be "
                                 f"located")
        cut = pos + len(eot)
        ids = self.tokenizer.encode(ext[cut:])
        head = base[:last + len(eot)]
        return Appended(ids, prefix_matches=self.tokenizer.encode(head) == list(trajectory),
                        history_rerendered=ext[:cut] != head)
