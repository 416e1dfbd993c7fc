"""Datasets over the token formats of :mod:`llm_trainer.data.formats`.

Items are dicts of 1-D ``torch.long`` tensors (``docs/architecture.md``):

- :class:`PretrainDataset`: ``{"input_ids"}``, windows of ``block_size`` tokens every ``stride`` tokens;
- :class:`SFTDataset`: ``{"input_ids", "labels"}`` (labels −100 where the loss mask is 0) [+ ``"images"``: list of
  paths];
- :class:`DPODataset` (also reward-model data): ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids",
  "rejected_labels"}`` [+ ``"images"``];
- :class:`RLDataset`: ``{"prompt_ids"}`` [+ ``"answer_ids"``, ``"answer_text"`` (str)] [+ ``"images"``].

All map-style datasets give O(1) random access: item ``i`` reads only its own bytes, so resuming can jump to any
position. They open their files lazily and drop the mapping when pickled, so DataLoader workers re-map instead of
copying. :class:`StreamingPretrainDataset` streams a ``.jsonl`` text file (tokenised on the fly).
"""
from __future__ import annotations

import bisect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from llm_trainer.data.formats import (DataError, MappedArray, first_out_of_range, load_legacy, open_token_array,
                                      out_of_range_reason, read_npy_header)
from llm_trainer.data.collate import IGNORE_INDEX
from llm_trainer.data.indexed import IndexedData
from llm_trainer.data.provenance import check_tokenizer, read_flat_meta

__all__ = ["FileDataset", "PretrainDataset", "StreamingPretrainDataset", "SFTDataset", "DPODataset",
           "RewardDataset", "RLDataset", "ConcatFileDataset", "open_dataset"]


class FileDataset:
    """A list of data files; training visits them in order, one dataset per file (``TrainConfig.file_dataset``).

    Pass a list of paths, or subclass and override ``__len__`` / ``__getitem__`` (returning a path) to produce
    file names lazily — e.g. files that another job is still writing."""

    def __init__(self, files: Sequence[str | os.PathLike] | None = None):
        if files is None:
            if type(self).__len__ is FileDataset.__len__ or type(self).__getitem__ is FileDataset.__getitem__:
                raise TypeError("FileDataset needs a list of files, or a subclass that overrides __len__ and "
                                "__getitem__")
            self.files: list[str] = []
            return
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        self.files = [str(f) for f in files]
        if not self.files:
            raise ValueError("FileDataset got an empty list of files")
        missing = [f for f in self.files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"FileDataset: file(s) not found: {missing}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> str:
        return self.files[idx]

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[self[i] for i in range(len(self))]!r})"


def _index(i: int, n: int) -> int:
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} items")
    return i


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------- pretraining
class PretrainDataset(Dataset):
    """Windows of ``block_size`` tokens from a flat token file (``.npy``, or a raw dump with ``dtype=``).

    ``len = (N - block_size) // stride + 1`` (``stride`` defaults to ``block_size``: non-overlapping windows; the tail
    that does not fill a window is not used). A file shorter than one block gives one shorter item. ``vocab_size``:
    every id of the file is checked once, at open (chunked positioned reads: 0.04–0.07 s per 100M ``uint16`` ids from
    the page cache, ``scripts/bench/token_scan.py``), so an id ``>= vocab_size`` anywhere fails before training,
    naming its position. ``tokenizer``: compared
    with the tokenizer recorded in the file's ``NAME.npy.meta.json`` sidecar, if there is one
    (:mod:`llm_trainer.data.provenance`). Old pickled token lists need ``allow_pickle=True``."""

    def __init__(self, path: str | os.PathLike, block_size: int, stride: int | None = None, *, dtype: Any = None,
                 vocab_size: int | None = None, allow_pickle: bool = False, tokenizer: Any = None):
        self.path = str(path)
        if self.path.endswith(".jsonl"):
            raise DataError("a .jsonl text file has no random access: stream it with StreamingPretrainDataset "
                            "(open_dataset('pretrain', ..., tokenizer=...) does this), or run prepare_data "
                            "--stage pretrain once to get a memory-mapped .npy", file=self.path)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.stride = int(stride or block_size)
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.dtype, self.allow_pickle = dtype, allow_pickle
        meta = read_flat_meta(self.path)
        if meta is not None:
            check_tokenizer(meta, tokenizer, file=self.path)
        self._tokens: MappedArray | None = None
        tokens = self._open()
        n = len(tokens)
        if n == 0:
            raise DataError("the file holds no tokens", file=self.path)
        found = first_out_of_range(tokens, vocab_size)
        if found is not None:
            raise DataError(out_of_range_reason(found[1], found[0], vocab_size), file=self.path)
        self.num_tokens = n
        self._len = 1 if n < self.block_size else (n - self.block_size) // self.stride + 1

    def _open(self) -> MappedArray:
        if self._tokens is None:
            self._tokens = MappedArray(open_token_array(self.path, dtype=self.dtype, allow_pickle=self.allow_pickle))
        return self._tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = _index(i, self._len)
        start = i * self.stride
        ids = self._open().read(start, min(start + self.block_size, self.num_tokens))
        return {"input_ids": torch.from_numpy(ids)}

    def __repr__(self) -> str:
        return (f"PretrainDataset({self.path!r}, block_size={self.block_size}, stride={self.stride}, "
                f"tokens={self.num_tokens}, items={self._len})")


class StreamingPretrainDataset(IterableDataset):
    """Pretraining windows from ``.jsonl`` files with a ``text`` field, tokenised on the fly and never loaded whole:
    each document is encoded, the EOS token appended, and the token stream cut into ``block_size`` windows (the last
    partial window is dropped).

    Sharding: line ``k`` belongs to shard ``k % (world_size * num_workers)``, so ranks (and DataLoader workers) read
    disjoint documents; shards may yield slightly different numbers of windows. No O(1) resume: ``start`` skips that
    many windows of this shard by reading them. For exact, balanced, resumable runs prepare a ``.npy`` instead."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any, block_size: int, *,
                 text_field: str = "text", rank: int = 0, world_size: int = 1, add_eos: bool = True, start: int = 0,
                 batch_lines: int = 256):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [str(p) for p in paths]
        for p in self.paths:
            if not os.path.isfile(p):
                raise DataError("file not found", file=p)
            if os.path.getsize(p) == 0:
                raise DataError("file is empty (0 bytes)", file=p)
        if isinstance(tokenizer, (str, os.PathLike)):
            from llm_trainer.tokenizer import Tokenizer
            tokenizer = Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.block_size, self.text_field = int(block_size), text_field
        self.rank, self.world_size, self.add_eos, self.start = rank, world_size, add_eos, start
        self.batch_lines = batch_lines
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token to put between documents")

    def _texts(self, shard: int, num_shards: int) -> Iterator[tuple[str, int, str]]:
        k = -1
        for path in self.paths:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    k += 1
                    if k % num_shards != shard:
                        continue
                    try:
                        obj = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(f"malformed JSON ({e})", file=path, line=lineno) from None
                    if not isinstance(obj, dict) or self.text_field not in obj:
                        raise DataError("missing field", file=path, line=lineno, field=self.text_field)
                    text = obj[self.text_field]
                    if not isinstance(text, str):
                        raise DataError(f"expected a string, got {type(text).__name__}", file=path, line=lineno,
                                        field=self.text_field)
                    yield path, lineno, text

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        shard, num_shards = self.rank * workers + wid, self.world_size * workers
        eos = [self.tokenizer.eos_token_id] if self.add_eos else []
        buf: list[int] = []
        skip = self.start
        batch: list[str] = []

        def windows():
            nonlocal buf, skip
            ids = self.tokenizer.batch_encode(batch)
            for one in ids:
                buf.extend(one)
                buf.extend(eos)
            n_full = len(buf) // self.block_size
            out = []
            for w in range(n_full):
                if skip:
                    skip -= 1
                    continue
                out.append(torch.tensor(buf[w * self.block_size:(w + 1) * self.block_size], dtype=torch.long))
            buf = buf[n_full * self.block_size:]
            return out

        for _, _, text in self._texts(shard, num_shards):
            batch.append(text)
            if len(batch) >= self.batch_lines:
                for w in windows():
                    yield {"input_ids": w}
                batch = []
        if batch:
            for w in windows():
                yield {"input_ids": w}


# -------------------------------------------------------------------------------------------- indexed datasets
def _legacy_or_indexed(path: str, stages: tuple[str, ...], vocab_size: int | None, allow_pickle: bool,
                       convert: Callable[[list, str], IndexedData], tokenizer: Any) -> IndexedData:
    p = Path(path)
    if p.suffix in (".pkl", ".pickle") or (p.suffix == ".npy" and p.is_file()):
        if p.suffix == ".npy":
            shape, _, dt, _ = read_npy_header(p)
            if not dt.hasobject:
                raise DataError(f"a plain {dt} array ({shape}) has no sample boundaries or loss masks; "
                                f"{stages[0]} data is an indexed folder (see docs/data.md; prepare_data writes it)",
                                file=path)
        records = load_legacy(path, allow_pickle=allow_pickle)
        if not isinstance(records, (list, tuple)) or not records:
            raise DataError("expected a non-empty list of records in the pickled data", file=path)
        data = convert(list(records), path)
        data.check_ids(vocab_size)
        return data
    return IndexedData(path, vocab_size=vocab_size, stages=stages, tokenizer=tokenizer)


def _ids_list(x: Any, path: str, r: int, field: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError("expected a list of token ids", file=path, record=r, field=field) from None
    return a


def _from_sequences(stage: str, path: str, seqs: list[np.ndarray], masks: list[np.ndarray],
                    prompt_lengths: list[int] | None = None, **extra) -> IndexedData:
    lengths = np.array([len(s) for s in seqs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return IndexedData.from_arrays(stage, tokens, offsets, loss_mask=np.concatenate(masks).astype(np.uint8),
                                   prompt_lengths=None if prompt_lengths is None else np.array(prompt_lengths),
                                   source=path, **extra)


def _convert_legacy_sft(records: list, path: str) -> IndexedData:
    seqs, masks = [], []
    unmasked = 0
    for r, rec in enumerate(records):
        if isinstance(rec, dict):
            ids = _ids_list(rec.get("input_ids"), path, r, "input_ids")
            if "loss_mask" in rec:
                m = _ids_list(rec["loss_mask"], path, r, "loss_mask")
            elif "labels" in rec:
                m = (_ids_list(rec["labels"], path, r, "labels") != IGNORE_INDEX).astype(np.int64)
            else:
                m, unmasked = np.ones_like(ids), unmasked + 1
        else:
            ids = _ids_list(rec, path, r, "input_ids")
            m, unmasked = np.ones_like(ids), unmasked + 1
        if len(m) != len(ids):
            raise DataError(f"{len(m)} mask entries for {len(ids)} tokens", file=path, record=r, field="loss_mask")
        seqs.append(ids)
        masks.append(m)
    if unmasked:
        warnings.warn(f"{path}: {unmasked} legacy SFT record(s) carry no loss mask, so every token (the prompt too) "
                      "is trained; re-create the data with prepare_data to train on answers only", stacklevel=3)
    return _from_sequences("sft", path, seqs, masks)


def _convert_legacy_pairs(records: list, path: str) -> IndexedData:
    seqs, masks, plens = [], [], []
    for r, rec in enumerate(records):
        if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
            raise DataError("expected a dict with 'chosen' and 'rejected' token lists", file=path, record=r)
        prompt = _ids_list(rec.get("prompt", []), path, r, "prompt")
        c = np.concatenate([prompt, _ids_list(rec["chosen"], path, r, "chosen")])
        j = np.concatenate([prompt, _ids_list(rec["rejected"], path, r, "rejected")])
        n = min(len(c), len(j))
        common = int(np.argmax(c[:n] != j[:n])) if (c[:n] != j[:n]).any() else n
        plen = len(prompt) if len(prompt) else common  # no explicit prompt: the shared prefix is the prompt
        for s in (c, j):
            m = np.ones_like(s)
            m[:plen] = 0
            seqs.append(s)
            masks.append(m)
        plens.append(plen)
    return _from_sequences("dpo", path, seqs, masks, plens)


def _convert_legacy_rl(records: list, path: str) -> IndexedData:
    seqs, answers = [], []
    for r, rec in enumerate(records):
        if isinstance(rec, dict):
            if "prompt" not in rec:
                raise DataError("missing field", file=path, record=r, field="prompt")
            seqs.append(_ids_list(rec["prompt"], path, r, "prompt"))
            answers.append(_ids_list(rec.get("answer") or [], path, r, "answer"))
        else:
            seqs.append(_ids_list(rec, path, r, "prompt"))
            answers.append(np.zeros(0, np.int64))
    lengths = np.array([len(s) for s in seqs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    extra = {}
    if any(len(a) for a in answers):
        al = np.array([len(a) for a in answers], np.int64)
        extra = {"answer_tokens": np.concatenate(answers), "answer_offsets": np.concatenate([[0], np.cumsum(al)]),
                 "answer_text": np.zeros(0, np.uint8), "answer_text_offsets": np.zeros(len(seqs) + 1, np.int64)}
    return IndexedData.from_arrays("rl", np.concatenate(seqs), offsets, source=path, **extra)


class _IndexedDataset(Dataset):
    _stages: tuple[str, ...] = ()
    _truncation_note = "are truncated to it (the end is cut off)"
    _convert: Callable[[list, str], IndexedData]

    def __init__(self, path: str | os.PathLike, block_size: int | None = None, *, vocab_size: int | None = None,
                 allow_pickle: bool = False, tokenizer: Any = None):
        self.path = str(path)
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
        self.block_size = block_size
        self.data = _legacy_or_indexed(self.path, self._stages, vocab_size, allow_pickle, type(self)._convert,
                                       tokenizer)
        self.image_token_id = self.data.meta.get("image_token_id")
        self.num_truncated = 0
        if block_size is not None and self.data.num_sequences:
            lengths = self.data.lengths()
            if len(lengths) != self.data.num_sequences:
                raise DataError("offsets do not match meta.json", file=self.path)
            too_long = lengths > block_size
            if self.data.num_sequences != self.data.num_records:  # pairs: a record is truncated if either side is
                too_long = too_long.reshape(-1, 2).any(axis=1)
            self.num_truncated = int(too_long.sum())
            if self.num_truncated:
                warnings.warn(f"{type(self).__name__}({self.path!r}): {self.num_truncated} of {len(self)} samples "
                              f"are longer than block_size={block_size} and {self._truncation_note}", stacklevel=2)

    def __len__(self) -> int:
        return self.data.num_records

    def _seq(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        ids, mask = self.data.sequence(i)
        if self.block_size is not None and len(ids) > self.block_size:
            ids = ids[:self.block_size]
            mask = None if mask is None else mask[:self.block_size]
        return ids, mask

    @staticmethod
    def _labels(ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        return _tensor(np.where(mask.astype(bool), ids, IGNORE_INDEX))

    def _images(self, r: int, *kept: np.ndarray) -> list[str] | None:
        paths = self.data.images(r)
        if paths is None or self.image_token_id is None:
            return paths
        # truncation may cut image placeholders off: keep the images whose placeholder survived
        n = min(int((k == self.image_token_id).sum()) for k in kept) if kept else len(paths)
        return paths[:n]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, block_size={self.block_size}, items={len(self)})"


class SFTDataset(_IndexedDataset):
    """Supervised fine-tuning data: an indexed folder with ``stage = "sft"``. ``block_size`` truncates (the count is
    ``num_truncated``, warned once)."""

    _stages = ("sft",)
    _convert = staticmethod(_convert_legacy_sft)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, len(self))
        ids, mask = self._seq(i)
        item: dict[str, Any] = {"input_ids": _tensor(ids), "labels": self._labels(ids, mask)}
        images = self._images(i, ids)
        if images is not None:
            item["images"] = images
        return item


class DPODataset(_IndexedDataset):
    """Preference pairs (``stage`` ``"dpo"`` or ``"reward"``): each record holds a chosen and a rejected sequence,
    both prompt + response, with loss masks (prompt tokens 0) and the prompt length. ``block_size`` truncates each
    sequence."""

    _stages = ("dpo", "reward")
    _convert = staticmethod(_convert_legacy_pairs)

    def prompt_length(self, i: int) -> int:
        return self.data.prompt_length(_index(i, len(self)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, len(self))
        c, cm = self._seq(2 * i)
        r, rm = self._seq(2 * i + 1)
        item: dict[str, Any] = {"chosen_input_ids": _tensor(c), "chosen_labels": self._labels(c, cm),
                                "rejected_input_ids": _tensor(r), "rejected_labels": self._labels(r, rm)}
        images = self._images(i, c, r)
        if images is not None:
            item["images"] = images
        return item


RewardDataset = DPODataset


class RLDataset(_IndexedDataset):
    """RL prompts (``stage = "rl"``), already ending in the generation prompt (e.g. ``<|im_start|>assistant\\n``),
    with an optional reference answer (ids and text) for reward functions. ``block_size`` here is the maximum prompt
    length: longer prompts keep their *last* ``block_size`` tokens, so the generation prompt survives."""

    _stages = ("rl",)
    _truncation_note = "keep only their last block_size tokens (the generation prompt survives)"
    _convert = staticmethod(_convert_legacy_rl)

    def _seq(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        ids, _ = self.data.sequence(i)
        if self.block_size is not None and len(ids) > self.block_size:
            ids = ids[len(ids) - self.block_size:]
        return ids, None

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _index(i, len(self))
        ids, _ = self._seq(i)
        item: dict[str, Any] = {"prompt_ids": _tensor(ids)}
        ans = self.data.answer(i)
        if ans is not None:
            item["answer_ids"] = _tensor(ans[0])
            item["answer_text"] = ans[1]
        images = self.data.images(i)
        if images is not None:
            item["images"] = images
        return item


# ---------------------------------------------------------------------------------------------------- concatenation
class ConcatFileDataset(Dataset):
    """One dataset over all files of a :class:`FileDataset` (or a list of paths): ``open_fn(path)`` builds each
    file's dataset; index ``i`` is located by binary search over the cumulative lengths (O(log files))."""

    def __init__(self, files: FileDataset | Sequence[str], open_fn: Callable[[str], Dataset]):
        self.files = [files[i] for i in range(len(files))]
        if not self.files:
            raise ValueError("ConcatFileDataset needs at least one file")
        self.datasets = [open_fn(f) for f in self.files]
        self.cumulative: list[int] = []
        total = 0
        for d in self.datasets:
            total += len(d)
            self.cumulative.append(total)

    def __len__(self) -> int:
        return self.cumulative[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(file index, index within that file) of item ``i``."""
        i = _index(i, len(self))
        f = bisect.bisect_right(self.cumulative, i)
        return f, i - (self.cumulative[f - 1] if f else 0)

    def __getitem__(self, i: int):
        f, j = self.locate(i)
        return self.datasets[f][j]

    @property
    def num_truncated(self) -> int:
        return sum(getattr(d, "num_truncated", 0) for d in self.datasets)


_STAGE_CLASSES = {"sft": SFTDataset, "dpo": DPODataset, "reward": DPODataset, "rl": RLDataset}


def open_dataset(stage: str, path: str | os.PathLike | FileDataset | Sequence[str], block_size: int | None = None,
                 *, stride: int | None = None, tokenizer: Any = None, vocab_size: int | None = None,
                 allow_pickle: bool = False, dtype: Any = None):
    """The dataset for ``stage`` (``pretrain``/``sft``/``dpo``/``reward``/``rl``) over one path or several (then
    concatenated). Pretraining ``.jsonl`` files are streamed (needs ``tokenizer``; returns an IterableDataset).
    Prepared files are checked at open: every id against ``vocab_size``, the recorded tokenizer against
    ``tokenizer`` (see :mod:`llm_trainer.data.provenance`)."""
    if not isinstance(path, (str, os.PathLike)):
        files = [path[i] for i in range(len(path))]
        if stage == "pretrain" and any(str(f).endswith(".jsonl") for f in files):
            return StreamingPretrainDataset(files, tokenizer, block_size)
        if len(files) == 1:
            path = files[0]
        else:
            return ConcatFileDataset(files, lambda f: open_dataset(stage, f, block_size, stride=stride,
                                                                   tokenizer=tokenizer, vocab_size=vocab_size,
                                                                   allow_pickle=allow_pickle, dtype=dtype))
    path = str(path)
    if stage == "pretrain":
        if block_size is None:
            raise ValueError("pretraining needs a block_size")
        if path.endswith(".jsonl"):
            if tokenizer is None:
                raise ValueError(f"{path}: a .jsonl pretraining file is tokenised on the fly and needs a tokenizer")
            return StreamingPretrainDataset(path, tokenizer, block_size)
        return PretrainDataset(path, block_size, stride, dtype=dtype, vocab_size=vocab_size, allow_pickle=allow_pickle,
                               tokenizer=tokenizer)
    if stage not in _STAGE_CLASSES:
        raise ValueError(f"unknown stage {stage!r}; expected pretrain, sft, dpo, reward or rl")
    return _STAGE_CLASSES[stage](path, block_size, vocab_size=vocab_size, allow_pickle=allow_pickle,
                                 tokenizer=tokenizer)
