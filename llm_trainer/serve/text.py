"""Token ids → text, one token at a time: what streaming outputs (the terminal chat, server-sent events) print.

:class:`TextStream` turns generated ids into text deltas that are safe to show as they come:

- a token that ends in the middle of a UTF-8 character (byte-level BPE splits multi-byte characters) is held back
  until the character is complete (the decoder returns U+FFFD for an incomplete one);
- only a window of recent tokens is decoded per token (the prefix/read offsets of vLLM's incremental
  detokenizer), so a long answer costs O(1) per token, and decoders that drop a word's leading space at the start
  of a string still give the right spacing;
- ``stop`` strings (OpenAI's ``stop``) end the text before the first occurrence, which is never shown: text that
  could still become a stop string is held back until it cannot.

Special tokens (the end-of-turn token) are skipped, as in the final text of a chat completion.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["TextStream"]

_INCOMPLETE = "\ufffd"


class TextStream:
    """``push(token_id) -> (delta, stopped)``; ``flush() -> delta`` at the end of generation; ``text`` = all shown.

    ``strip_leading_space``: drop one space at the very start (the ``plain`` chat template's generation prompt
    ends in ``Assistant:`` and the model writes the separating space itself)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), strip_leading_space: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.strip_leading_space = strip_leading_space
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # decoded text not yet shown (stop-string look-ahead)
        self.text = ""  # text shown so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; returns the text that may be shown now and whether a stop string ended it."""
        if self.stopped:
            return "", True
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return "", False  # nothing new yet, or a character is still incomplete
        self.pending += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """All held-back text (generation ended without a stop string)."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):  # an incomplete character at the very end: show what decodes
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self.pending += full[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self.pending
        if self.strip_leading_space and not self.text:
            if text == " " and not final:
                return "", False  # wait: the space may be all there is so far
            if text.startswith(" "):
                text = text[1:]
                self.pending = text
        # a stop string may start inside text already shown only if it began in the held-back part
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out = text[:cut]
            self.text += out
            self.pending = ""
            self.stopped = True
            return out, True
        hold = 0 if final else self._stop_prefix_len(text)
        out = text[:len(text) - hold]
        self.pending = text[len(text) - hold:]
        self.text += out
        return out, False

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of a stop string (it must wait)."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
