"""Collate functions: lists of dataset items → batches of ``torch.long`` tensors.

Label convention: ``labels`` are *unshifted* (``labels[t]`` is token ``t`` or −100); the loss predicts ``labels[t]``
from the logits at ``t - 1``. So setting the label of a document's first token to −100 means "never predict this
token from whatever came before it".

- :class:`PadCollate` — right padding for training (pretrain/SFT): ``input_ids`` (pad id), ``labels`` (−100 on
  padding; ``input_ids`` when the items have no labels), ``attention_mask``. With ``eos_token_id`` it also splits
  pretraining windows into their documents at each EOS (``document_ids``, ``position_ids``, first token of each later
  document not predicted).
- :class:`PackingCollate` — SFT/pretraining packing: the batch's samples are placed first-fit-decreasing into rows
  of at most ``block_size`` tokens; ``document_ids`` (0, 1, … per row, −1 on padding) and ``position_ids`` restarting
  at 0 per document make the model treat each sample exactly as if it were alone (``LlmModel`` attends only within a
  document), and the first token of every document has label −100.
- :class:`DPOCollate` — chosen rows then rejected rows in one ``[2B, L]`` batch padded to a common length.
- :class:`PromptCollate` — RL prompts as token-id lists (generation pads them itself), answers, images.

All are plain picklable classes, safe for DataLoader worker processes. Items may carry ``"images"`` (a list of paths
per sample); the batch then has ``"images"``: one list per row.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["pad_sequences", "pad_with_mask", "length_mask", "pack_sequences", "PadCollate", "PackingCollate",
           "DPOCollate", "PromptCollate", "collate_for", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _as_long(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {tuple(t.shape)}")
    return t if t.dtype == torch.long else t.long()


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def pad_sequences(seqs: Sequence[Any], padding_value: int, side: str = "right", length: int | None = None,
                  pad_to_multiple_of: int | None = None) -> torch.Tensor:
    """Stack 1-D sequences into ``[B, L]``, padding on ``side`` ('right' or 'left') to ``length`` (default: the
    longest, rounded up to ``pad_to_multiple_of``)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    seqs = [_as_long(s) for s in seqs]
    lengths = [s.shape[0] for s in seqs]
    longest = max(lengths, default=0)
    L = _round_up(longest if length is None else length, pad_to_multiple_of)
    if L < longest:
        raise ValueError(f"length {L} is shorter than the longest sequence ({longest})")
    return _pad(seqs, lengths, L, padding_value, side)


def pad_with_mask(seqs: Sequence[Any], padding_value: int, side: str = "right",
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_sequences` plus its ``attention_mask`` (1 on the sequences' tokens): the one padding routine of
    the package (collates, RL sequences, reward-model scoring, generation prompts)."""
    ids = pad_sequences(seqs, padding_value, side=side, length=length)
    return ids, length_mask([len(s) for s in seqs], ids.shape[1], side=side)


def _pad(seqs: list[torch.Tensor], lengths: list[int], L: int, value: int, side: str = "right") -> torch.Tensor:
    if seqs and min(lengths) == L:
        return torch.stack(seqs)
    out = torch.full((len(seqs), L), value, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        if n:
            if side == "right":
                out[i, :n] = s
            else:
                out[i, L - n:] = s
    return out


def length_mask(lengths: Sequence[int], L: int, side: str = "right") -> torch.Tensor:
    """``[B, L]`` 0/1 long mask of sequences of ``lengths`` padded on ``side``."""
    if lengths and min(lengths) == L:
        return torch.ones((len(lengths), L), dtype=torch.long)
    n = torch.tensor(list(lengths), dtype=torch.long)[:, None]
    ar = torch.arange(L)[None, :]
    return (ar < n).long() if side == "right" else (ar >= L - n).long()


def _images(batch: Sequence[dict]) -> list[list[str]] | None:
    if not any("images" in item for item in batch):
        return None
    return [list(item.get("images") or []) for item in batch]


class PadCollate:
    """Right-padded training batch from pretrain/SFT items (see the module docstring)."""

    def __init__(self, pad_token_id: int, *, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None,
                 eos_token_id: int | None = None):
        if pad_token_id is None:
            raise ValueError("PadCollate needs a pad_token_id (the tokenizer's pad or eos id)")
        self.pad_token_id, self.ignore_index = int(pad_token_id), ignore_index
        self.pad_to_multiple_of, self.eos_token_id = pad_to_multiple_of, eos_token_id

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        ids = [_as_long(item["input_ids"]) for item in batch]
        labels = [_as_long(item["labels"]) if "labels" in item else ids[i] for i, item in enumerate(batch)]
        lengths = [a.shape[0] for a in ids]
        for i, (n, b) in enumerate(zip(lengths, labels)):
            if b.shape[0] != n:
                raise ValueError(f"item {i}: {n} input_ids but {b.shape[0]} labels")
        L = _round_up(max(lengths, default=0), self.pad_to_multiple_of)
        out: dict[str, Any] = {
            "input_ids": _pad(ids, lengths, L, self.pad_token_id),
            "labels": _pad(labels, lengths, L, self.ignore_index),
            "attention_mask": length_mask(lengths, L),
        }
        if self.eos_token_id is not None:
            self._split_documents(out)
        images = _images(batch)
        if images is not None:
            out["images"] = images
        return out

    def _split_documents(self, out: dict[str, Any]) -> None:
        ids, mask = out["input_ids"], out["attention_mask"].bool()
        is_eos = (ids == self.eos_token_id) & mask
        # a document ends with its EOS; the next one starts right after it
        starts = torch.zeros_like(mask)
        starts[:, 1:] = is_eos[:, :-1]
        doc = torch.cumsum(starts.long(), dim=1)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        start_pos = torch.where(starts, pos, torch.zeros_like(pos))
        start_pos = torch.cummax(start_pos, dim=1).values
        out["document_ids"] = torch.where(mask, doc, torch.full_like(doc, -1))
        out["position_ids"] = torch.where(mask, pos - start_pos, torch.zeros_like(pos))
        out["labels"] = out["labels"].masked_fill(starts & mask, self.ignore_index)


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: indices of ``lengths`` grouped into rows of total length ≤ ``capacity``
    (each row lists its items in their original order). Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than the row capacity {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return [sorted(r) for r in rows]


class PackingCollate:
    """Pack a batch of pretrain/SFT items into rows of ≤ ``block_size`` tokens (first-fit decreasing). The number of
    rows varies from batch to batch; normalise the loss by the number of label tokens. Items longer than
    ``block_size`` are truncated (counted in ``num_truncated``). ``pad_to_block`` pads rows to exactly ``block_size``
    (static shapes), otherwise to the longest row rounded up to ``pad_to_multiple_of``."""

    def __init__(self, block_size: int, pad_token_id: int, *, ignore_index: int = IGNORE_INDEX,
                 pad_to_block: bool = False, pad_to_multiple_of: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if pad_token_id is None:
            raise ValueError("PackingCollate needs a pad_token_id")
        self.block_size, self.pad_token_id, self.ignore_index = int(block_size), int(pad_token_id), ignore_index
        self.pad_to_block, self.pad_to_multiple_of = pad_to_block, pad_to_multiple_of
        self.num_truncated = 0

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        ids, labels = [], []
        for item in batch:
            a = _as_long(item["input_ids"])
            b = _as_long(item["labels"]) if "labels" in item else a
            if len(a) > self.block_size:
                a, b = a[:self.block_size], b[:self.block_size]
                self.num_truncated += 1
            ids.append(a)
            labels.append(b)
        rows = pack_sequences([len(a) for a in ids], self.block_size)
        longest = max((sum(len(ids[i]) for i in r) for r in rows), default=0)
        L = self.block_size if self.pad_to_block else min(_round_up(longest, self.pad_to_multiple_of),
                                                          max(self.block_size, longest))
        R = len(rows)
        out_ids = torch.full((R, L), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((R, L), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((R, L), dtype=torch.long)
        pos = torch.zeros((R, L), dtype=torch.long)
        doc = torch.full((R, L), -1, dtype=torch.long)
        row_images: list[list[str]] = []
        for r, members in enumerate(rows):
            t = 0
            imgs: list[str] = []
            for d, i in enumerate(members):
                n = len(ids[i])
                out_ids[r, t:t + n] = ids[i]
                out_labels[r, t:t + n] = labels[i]
                out_labels[r, t] = self.ignore_index  # never predicted from the previous document
                mask[r, t:t + n] = 1
                pos[r, t:t + n] = torch.arange(n)
                doc[r, t:t + n] = d
                imgs += list(batch[i].get("images") or [])
                t += n
            row_images.append(imgs)
        out: dict[str, Any] = {"input_ids": out_ids, "labels": out_labels, "attention_mask": mask,
                               "position_ids": pos, "document_ids": doc}
        if any("images" in item for item in batch):
            out["images"] = row_images
        return out


class DPOCollate:
    """DPO / reward-model batch: ``input_ids``, ``labels``, ``attention_mask`` of shape ``[2B, L]`` — rows ``0..B-1``
    the chosen sequences, rows ``B..2B-1`` the rejected ones — padded on the right to one common length, so a
    single forward pass scores both."""

    def __init__(self, pad_token_id: int, *, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("DPOCollate needs a pad_token_id")
        self.pad_token_id, self.ignore_index, self.pad_to_multiple_of = int(pad_token_id), ignore_index, \
            pad_to_multiple_of

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        ids = [_as_long(b["chosen_input_ids"]) for b in batch] + [_as_long(b["rejected_input_ids"]) for b in batch]
        labels = [_as_long(b["chosen_labels"]) for b in batch] + [_as_long(b["rejected_labels"]) for b in batch]
        m = self.pad_to_multiple_of
        out: dict[str, Any] = {
            "input_ids": pad_sequences(ids, self.pad_token_id, pad_to_multiple_of=m),
            "labels": pad_sequences(labels, self.ignore_index, pad_to_multiple_of=m),
        }
        out["attention_mask"] = length_mask([len(a) for a in ids], out["input_ids"].shape[1])
        images = _images(batch)
        if images is not None:
            out["images"] = images + images
        return out


class PromptCollate:
    """RL prompt batches: ``prompt_ids`` (unpadded token-id lists, what ``generate`` takes), ``answer_ids`` (lists,
    None where an item has none), ``answer_text`` (strings or None) and, when the items have them, ``images``."""

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        def ids(x):
            return None if x is None else _as_long(x).tolist()
        out: dict[str, Any] = {"prompt_ids": [ids(b["prompt_ids"]) for b in batch],
                               "answer_ids": [ids(b.get("answer_ids")) for b in batch],
                               "answer_text": [b.get("answer_text") for b in batch]}
        images = _images(batch)
        if images is not None:
            out["images"] = images
        return out


def collate_for(stage: str, pad_token_id: int, *, packing: bool = False, block_size: int | None = None,
                eos_token_id: int | None = None, pad_to_multiple_of: int | None = None):
    """The collate function a trainer of ``stage`` uses: pretrain/sft → :class:`PadCollate` (or
    :class:`PackingCollate` with ``packing``), dpo/reward → :class:`DPOCollate`, rl → :class:`PromptCollate`.
    For pretraining, ``eos_token_id`` turns on document masking inside windows."""
    if stage in ("pretrain", "sft"):
        if packing:
            if block_size is None:
                raise ValueError("packing needs block_size")
            return PackingCollate(block_size, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        return PadCollate(pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                          eos_token_id=eos_token_id if stage == "pretrain" else None)
    if stage in ("dpo", "reward"):
        return DPOCollate(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    if stage == "rl":
        return PromptCollate()
    raise ValueError(f"unknown stage {stage!r}")
