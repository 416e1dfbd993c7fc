"""Continuous batching: one thread owns the model and decodes every running sequence together, one token per step,
while new requests join the running batch and finished or abandoned ones leave it.

The batch keeps one preallocated :class:`~llm_trainer.model.cache.KVCache` ``[rows, kv_heads, columns, head_dim]``
per layer, its rows **right-aligned**: every row's latest token sits in the same column, and a row shorter than
the batch has padding columns on its left, masked out by a per-row key mask (what ``generate`` does with left
padding). A step appends one column for all rows through ``LlmModel.decode_step`` with per-row RoPE positions.

- **Joining**: waiting sequences (up to the free slots) are prefilled together in one left-padded forward pass
  (VLM images included), their first token is chosen from the prefill logits, and their cache rows are copied in,
  right-aligned to the batch's current column; if their prompts are longer, the batch gains columns on the left.
- **Leaving**: a sequence leaves after its stop token, at ``max_new_tokens``, or as soon as it is cancelled (its
  client disconnected, or a stop string ended it): its cache rows are dropped, then columns that are padding for
  every remaining row are cut off the left.
- **Same tokens as alone**: logits are processed and sampled per row exactly as :func:`~llm_trainer.generation.
  generate` does for a batch of one (suppression, repetition penalty, temperature, top-k, top-p), each sequence
  with its own ``torch.Generator`` seeded from its request, so a request's tokens equal ``generate`` on that prompt
  alone with the same settings and seed (up to floating-point summation order in batched matmuls, which the tests
  show does not change greedy tokens). Plain greedy rows share one batched ``argmax``. Models with dynamic NTK
  RoPE (whose angles depend on the longest position in the batch) are prefilled one sequence at a time and get
  per-row RoPE tables, so that they too match.

Events go to each sequence's queue as ``(index, "token", id)``, then ``(index, "end", "stop" | "length")``, or
``(index, "error", message)``.
"""
from __future__ import annotations

import collections
import functools
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import cpu_prepack
from ..generation import GenerateConfig, choose_tokens, lm_head_logits, process_logits
from ..model.cache import KVCache
from ..model.layers import rope_cos_sin
from .loading import Prompt, ServedModel

__all__ = ["Sequence", "BatchEngine", "Overloaded"]

_GREEDY = GenerateConfig(do_sample=False)
_HEADROOM = 64  # cache columns allocated beyond the current need


class Overloaded(RuntimeError):
    """Too many sequences are waiting; the request should be retried later."""


@dataclass(eq=False)
class Sequence:
    """One generated completion: its prompt, decoding settings and the queue its events go to."""

    prompt: Prompt
    config: GenerateConfig
    stop_ids: frozenset
    events: "queue.SimpleQueue"
    index: int = 0
    seed: int = 0
    tokens: list = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    generator: Any = None
    seen: Any = None
    suppress: Any = None
    plain_greedy: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class BatchEngine:
    """Owns ``served.model`` on a background thread (``start()`` / ``close()``); ``submit(seqs)`` queues sequences,
    ``cancel(seq)`` makes one leave at the next step. ``max_batch``: sequences decoded together at most;
    ``max_waiting``: queued sequences beyond which ``submit`` raises :class:`Overloaded`; ``batch_wait_s``: when
    idle, wait this long after the first arrival so that requests arriving together start together. ``prepack``: on
    CPU in fp32, serve the linear layers from oneDNN-packed copies of their weights while the engine runs (what
    ``generate`` does per call; here once, as the served weights do not change) — about 1.5x faster decoding."""

    def __init__(self, served: ServedModel, max_batch: int = 16, max_waiting: int = 1024, batch_wait_s: float = 0.0,
                 prepack: bool = True):
        if served.kind not in ("llm", "vlm"):
            raise ValueError(f"BatchEngine generates text; {served.name} is a {served.kind} model")
        if max_batch < 1 or max_waiting < 1 or batch_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_waiting >= 1, batch_wait_s >= 0; got {max_batch}, "
                             f"{max_waiting}, {batch_wait_s}")
        self.served, self.model = served, served.model
        self.llm = served.model.llm if served.kind == "vlm" else served.model
        self.max_batch, self.max_waiting, self.batch_wait_s = max_batch, max_waiting, batch_wait_s
        self.prepack = prepack
        self.device = served.device
        self.head = functools.partial(lm_head_logits, self.model)
        mc = self.llm.config
        self.vocab_size = mc.vocab_size
        image_id = getattr(served.model.config, "image_token_id", None) if served.kind == "vlm" else None
        self.model_suppress = set() if image_id is None else {int(image_id)}  # a VLM never writes its image token
        self.suppress = self._ids_tensor(self.model_suppress)
        self.pad = mc.pad_token_id if mc.pad_token_id is not None else 0
        self.dynamic_rope = mc.rope_scaling is not None and mc.rope_scaling.rope_type == "dynamic"
        self.rope_dtype = self.llm.get_input_embeddings().weight.dtype
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._reset_batch()
        self.stats = {"running": 0, "waiting": 0, "completed": 0, "cancelled": 0, "failed": 0,
                      "generated_tokens": 0, "prefill_tokens": 0, "decode_steps": 0, "peak_batch": 0}

    # ------------------------------------------------------------------------------------------- public
    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._loop, name="llm-trainer-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fail(list(self._waiting) + self.rows, "the server is shutting down")
        self._waiting.clear()
        self._reset_batch()

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} sequences are already waiting (limit {self.max_waiting})")
            self._waiting.extend(seqs)
            self.stats["waiting"] = len(self._waiting)
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Make ``seq`` leave the batch (or the queue) at the next step; no further events are sent for it."""
        seq.cancel()
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        with torch.inference_mode(), cpu_prepack.PrepackedLinears(self.model, self.max_batch, self.prepack):
            while True:
                admit = self._next_admissions()
                if admit is None:
                    return
                try:
                    if admit:
                        self._prefill(admit)
                    if self.rows:
                        self._step()
                except Exception as e:  # one bad batch must not end the server: fail its sequences, go on
                    traceback.print_exc(file=sys.stderr)
                    self._fail(self.rows + [s for s in admit if s not in self.rows],
                               f"generation failed: {type(e).__name__}: {e}")
                    self._reset_batch()

    def _next_admissions(self) -> list[Sequence] | None:
        """Sequences to join the batch now (waits while there is nothing to do); None when closing."""
        with self._cond:
            while not self.rows and not self._waiting and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            if not self.rows and self.batch_wait_s > 0:
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._waiting) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            admit = []
            while self._waiting and len(self.rows) + len(admit) < self.max_batch:
                s = self._waiting.popleft()
                if s.cancelled:
                    self.stats["cancelled"] += 1
                else:
                    admit.append(s)
            self.stats["waiting"] = len(self._waiting)
            return admit

    # ------------------------------------------------------------------------------------------- batch state
    def _reset_batch(self) -> None:
        self.rows: list[Sequence] = []
        self.cache: KVCache | None = None
        self.key_mask: torch.Tensor | None = None  # [rows, capacity] bool, True = a real token
        self.positions: torch.Tensor | None = None  # [rows] position of the token fed next
        self.last: torch.Tensor | None = None  # [rows] token fed next
        self.padded = False

    def _ids_tensor(self, ids) -> torch.Tensor | None:
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.device) if ids else None

    def _init_row(self, s: Sequence) -> None:
        cfg = s.config
        s.generator = None if cfg.greedy else torch.Generator(device=self.device).manual_seed(int(s.seed))
        extra = set(cfg.suppress_tokens or [])
        s.suppress = self.suppress if not extra else self._ids_tensor(extra | self.model_suppress)
        if cfg.repetition_penalty != 1.0:  # tokens of the prompt (image tokens included) count as seen
            s.seen = torch.zeros((1, self.vocab_size), dtype=torch.bool, device=self.device)
            ids = torch.tensor(s.prompt.ids, dtype=torch.long, device=self.device).clamp(max=self.vocab_size - 1)
            s.seen[0, ids] = True
        s.plain_greedy = cfg.greedy and cfg.repetition_penalty == 1.0 and not extra

    def _prefill(self, seqs: list[Sequence]) -> None:
        for group in ([[s] for s in seqs] if self.dynamic_rope else [seqs]):
            try:
                logits, cache, mask, lengths = self._prefill_forward(group)
            except Exception as e:  # e.g. an image the vision tower rejects: only this group fails
                traceback.print_exc(file=sys.stderr)
                self._fail(group, f"generation failed: {type(e).__name__}: {e}")
                continue
            for s in group:
                self._init_row(s)
            tokens = self._pick(logits, group)
            self._join(group, cache, mask, lengths, tokens)
            self.stats["prefill_tokens"] += sum(lengths)
            self._record(group, tokens)
        self._retire()

    def _prefill_forward(self, group: list[Sequence]):
        """One left-padded forward pass over the group's prompts: last-position logits, the new cache, the
        prompts' key mask and their lengths."""
        lengths = [len(s.prompt.ids) for s in group]
        B, P = len(group), max(lengths)
        ids = torch.full((B, P), self.pad, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.bool)
        for i, s in enumerate(group):
            ids[i, P - lengths[i]:] = torch.tensor(s.prompt.ids, dtype=torch.long)
            mask[i, P - lengths[i]:] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs: dict[str, Any] = {}
        pixels = [s.prompt.pixel_values for s in group if s.prompt.pixel_values is not None]
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels)
            kwargs["image_counts"] = torch.tensor([s.prompt.num_images for s in group], dtype=torch.long)
        out = self.model(input_ids=ids, attention_mask=mask.long() if min(lengths) != P else None,
                         past_key_values=KVCache(), use_cache=True, return_hidden_states=True, **kwargs)
        return self.head(out.hidden_states[:, -1]).float(), out.past_key_values, mask, lengths

    def _join(self, group: list[Sequence], cache: KVCache, mask: torch.Tensor, lengths: list[int],
              tokens: torch.Tensor) -> None:
        """Copy a prefilled group's cache rows into the batch, right-aligned to the batch's last column."""
        B, P = mask.shape
        N = len(self.rows)
        C = self.cache.get_seq_length() if N else 0
        width = max(C, P)
        capacity = width + _HEADROOM
        merged = KVCache(max_length=capacity)
        for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
            shape = (N + B, k.shape[1], capacity, k.shape[3])
            kb, vb = k.new_zeros(shape), v.new_zeros(shape)
            if N:
                kb[:N, :, width - C:width] = self.cache.keys[layer][:, :, :C]
                vb[:N, :, width - C:width] = self.cache.values[layer][:, :, :C]
            kb[N:, :, width - P:width] = k[:, :, :P]
            vb[N:, :, width - P:width] = v[:, :, :P]
            merged.keys.append(kb)
            merged.values.append(vb)
            merged.lengths.append(width)
        key_mask = torch.zeros((N + B, capacity), dtype=torch.bool, device=self.device)
        if N:
            key_mask[:N, width - C:width] = self.key_mask[:, :C]
        key_mask[N:, width - P:width] = mask
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self.cache, self.key_mask = merged, key_mask
        self.positions = positions if not N else torch.cat([self.positions, positions])
        self.last = tokens if not N else torch.cat([self.last, tokens])
        self.rows = self.rows + group
        self.padded = not bool(key_mask[:, :width].all())
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self.rows))
        self.stats["running"] = len(self.rows)

    def _ensure_room(self, columns: int) -> None:
        cap = self.cache.max_length
        if columns <= cap:
            return
        C = self.cache.get_seq_length()
        new_cap = columns + max(_HEADROOM, C // 2)
        for layer in range(len(self.cache.keys)):
            for buffers in (self.cache.keys, self.cache.values):
                old = buffers[layer]
                grown = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
                grown[:, :, :C] = old[:, :, :C]
                buffers[layer] = grown
        grown = torch.zeros((len(self.rows), new_cap), dtype=torch.bool, device=self.device)
        grown[:, :C] = self.key_mask[:, :C]
        self.cache.max_length, self.key_mask = new_cap, grown

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[rows, 1, 1, head_dim]`` for one new token per row at ``positions [rows, 1]``."""
        mc = self.llm.config
        if self.dynamic_rope:  # the angles depend on the largest position: compute each row on its own
            parts = [rope_cos_sin(mc, p[None], self.rope_dtype) for p in positions]
            cos, sin = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        else:
            cos, sin = rope_cos_sin(mc, positions, self.rope_dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _step(self) -> None:
        C = self.cache.get_seq_length()
        self._ensure_room(C + 1)
        self.key_mask[:, C] = True
        attn_mask = self.key_mask[:, None, None, :C + 1] if self.padded else None
        cos, sin = self._rope(self.positions[:, None])
        h = self.llm.decode_step(self.last[:, None], self.cache, cos, sin, attn_mask)
        logits = self.head(h[:, -1]).float()
        self.positions = self.positions + 1
        self.last = self._pick(logits, self.rows)
        self.stats["decode_steps"] += 1
        self._record(self.rows, self.last)
        self._retire()

    # ------------------------------------------------------------------------------------------- tokens
    def _pick(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        """One token per row, processed and sampled as ``generate`` does for that row alone."""
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        plain = [i for i, s in enumerate(rows) if s.plain_greedy]
        if plain:
            idx = torch.tensor(plain, device=logits.device)
            sub = logits if len(plain) == len(rows) else logits.index_select(0, idx)
            out[idx] = process_logits(sub, _GREEDY, None, self.suppress).argmax(dim=-1)
        for i, s in enumerate(rows):
            if not s.plain_greedy:
                row = process_logits(logits[i:i + 1], s.config, s.seen, s.suppress)
                out[i] = choose_tokens(row, s.config, s.generator, False)[0][0]
        return out

    def _record(self, rows: list[Sequence], tokens: torch.Tensor) -> None:
        for s, t in zip(rows, tokens.tolist()):
            if s.done or s.cancelled:
                continue
            s.tokens.append(t)
            self.stats["generated_tokens"] += 1
            if s.seen is not None:
                s.seen[0, t] = True
            s.events.put((s.index, "token", t))
            if t in s.stop_ids:
                self._finish(s, "stop")
            elif len(s.tokens) >= s.config.max_new_tokens:
                self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        s.done = True
        s.events.put((s.index, "end", reason))
        self.stats["completed"] += 1

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for s in seqs:
            if not s.done and not s.cancelled:
                s.done = True
                s.events.put((s.index, "error", message))
                self.stats["failed"] += 1

    def _retire(self) -> None:
        """Drop finished and cancelled rows, then the left columns no remaining row uses."""
        keep = [i for i, s in enumerate(self.rows) if not (s.done or s.cancelled)]
        self.stats["cancelled"] += sum(1 for s in self.rows if s.cancelled and not s.done)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset_batch()
            self.stats["running"] = 0
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        C = self.cache.get_seq_length()
        self.cache.index_select(idx)
        self.key_mask = self.key_mask.index_select(0, idx)
        self.positions, self.last = self.positions.index_select(0, idx), self.last.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        first = int(self.key_mask[:, :C].any(dim=0).int().argmax())  # the first column some row still uses
        if first > 0:
            self.cache.keys = [k[:, :, first:] for k in self.cache.keys]
            self.cache.values = [v[:, :, first:] for v in self.cache.values]
            self.cache.lengths = [n - first for n in self.cache.lengths]
            self.cache.max_length -= first
            self.key_mask = self.key_mask[:, first:]
        self.padded = not bool(self.key_mask[:, :C - first].all())
        self.stats["running"] = len(self.rows)
