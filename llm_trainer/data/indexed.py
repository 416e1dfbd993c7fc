"""Reading indexed dataset folders (the layout is in ``docs/data.md``; :class:`~llm_trainer.data.formats.IndexedWriter`
writes them): O(1) access to any sequence, validated when opened.

When a vocabulary size is given, every token id of the folder (``tokens.npy``, ``answer_tokens.npy``) is checked once
at open, in chunks (:func:`~llm_trainer.data.formats.first_out_of_range`), so a bad id fails before the first step
instead of when its record is sampled; with a tokenizer, ``meta.json`` is compared with it
(:func:`~llm_trainer.data.provenance.check_tokenizer`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llm_trainer.data.formats import (INDEXED_FORMAT, INDEXED_STAGES, INDEXED_VERSION, DataError, MappedArray,
                                      first_out_of_range, open_token_array, out_of_range_reason)
from llm_trainer.data.provenance import check_tokenizer

__all__ = ["IndexedData"]


class IndexedData:
    """Read side of the indexed format: O(1) access to sequence ``i`` (tokens, loss mask), a record's prompt length,
    answer and image paths. Arrays are opened lazily (so a dataset pickles cheaply into DataLoader workers) and
    memory-mapped; structure is validated at open with :class:`DataError` naming the file.

    ``vocab_size``: reject data with a token id ``>= vocab_size`` (every id is checked at open, see
    :meth:`check_ids`). ``tokenizer``: reject data that ``meta.json`` says was prepared with another tokenizer."""

    def __init__(self, path: str | os.PathLike, *, vocab_size: int | None = None, stages: Sequence[str] | None = None,
                 tokenizer: Any = None):
        self.path = str(path)
        folder = Path(path)
        if not folder.exists():
            raise DataError("dataset not found", file=self.path)
        if not folder.is_dir():
            raise DataError("expected an indexed dataset folder (with meta.json, tokens.npy, offsets.npy); see "
                            "docs/data.md, or pass allow_pickle=True for an old object-array .npy/.pkl file",
                            file=self.path)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            raise DataError("missing meta.json: not an indexed dataset folder (prepare one with prepare_data)",
                            file=self.path)
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"invalid JSON ({e})", file=meta_file) from None
        if not isinstance(meta, dict) or meta.get("format") != INDEXED_FORMAT:
            raise DataError(f"'format' is not {INDEXED_FORMAT!r}", file=meta_file)
        if meta.get("version") != INDEXED_VERSION:
            raise DataError(f"format version {meta.get('version')!r} is not supported (this llm_trainer reads "
                            f"version {INDEXED_VERSION})", file=meta_file)
        stage = meta.get("stage")
        if stage not in INDEXED_STAGES:
            raise DataError(f"unknown stage {stage!r}", file=meta_file, field="stage")
        if stages is not None and stage not in stages:
            raise DataError(f"this is {stage!r} data; expected {' or '.join(repr(s) for s in stages)}", file=self.path)
        for k in ("num_records", "num_sequences"):
            if not isinstance(meta.get(k), int) or meta[k] < 0:
                raise DataError(f"{k!r} must be a non-negative integer", file=meta_file, field=k)
        check_tokenizer(meta, tokenizer, file=meta_file)
        self.meta = meta
        self.stage: str = stage
        self.num_records: int = meta["num_records"]
        self.num_sequences: int = meta["num_sequences"]
        self._arrays: dict[str, Any] | None = None
        self.check_ids(vocab_size)

    @classmethod
    def from_arrays(cls, stage: str, tokens: np.ndarray, offsets: np.ndarray, *, loss_mask: np.ndarray | None = None,
                    prompt_lengths: np.ndarray | None = None, source: str = "<memory>",
                    **extra: np.ndarray) -> "IndexedData":
        """In-memory instance (used for legacy pickled files)."""
        self = cls.__new__(cls)
        self.path, self.stage = source, stage
        self.num_sequences = len(offsets) - 1
        self.num_records = self.num_sequences // (2 if stage in ("dpo", "reward") else 1)
        self.meta = {"stage": stage, "num_records": self.num_records, "has_images": "images" in extra,
                     "has_answers": "answer_tokens" in extra}
        arrays = {"tokens": MappedArray(tokens), "offsets": np.asarray(offsets, np.int64),
                  "loss_mask": None if loss_mask is None else MappedArray(loss_mask),
                  "prompt_lengths": prompt_lengths}
        for k, v in extra.items():
            arrays[k] = MappedArray(v) if not k.endswith("offsets") else np.asarray(v, np.int64)
        self._arrays = arrays
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path != "<memory>" and Path(self.path).is_dir():
            state["_arrays"] = None  # reopen in the worker instead of pickling mapped arrays
        return state

    def check_ids(self, vocab_size: int | None) -> None:
        """Scan every token id once (sequences and reference answers, chunked): :class:`DataError` naming the file,
        record, position and id of the first negative id or id ``>= vocab_size`` (None: the sign only; unsigned
        arrays are then not read at all)."""
        a = self._open()
        pairs = self.stage in ("dpo", "reward")
        for values, offsets in (("tokens", "offsets"), ("answer_tokens", "answer_offsets")):
            found = first_out_of_range(a[values], vocab_size) if values in a else None
            if found is None:
                continue
            pos, token_id = found
            o = a[offsets]
            row = int(np.searchsorted(o.array if isinstance(o, MappedArray) else o, pos, side="right")) - 1
            raise DataError(out_of_range_reason(token_id, pos, vocab_size),
                            file=os.path.join(self.path, f"{values}.npy"),
                            record=row // 2 if pairs and values == "tokens" else row, field=values)

    # ------------------------------------------------------------------------------------------------ opening
    def _open(self) -> dict[str, Any]:
        if self._arrays is not None:
            return self._arrays
        folder = Path(self.path)

        def arr(name: str, required: bool, *, integer: bool = True, length: int | None = None):
            f = folder / name
            if not f.exists():
                if required:
                    raise DataError(f"missing {name}", file=self.path)
                return None
            a = open_token_array(f, what=name.removesuffix(".npy"))
            if length is not None and len(a) != length:
                raise DataError(f"has {len(a)} entries, expected {length}", file=f)
            return a

        def ragged(values: str, offsets: str, n: int, dtype_kind: str | None = None):
            v = arr(values, True)
            o = arr(offsets, True, length=n + 1)
            if o.dtype != np.int64:
                raise DataError(f"offsets must be int64, found {o.dtype}", file=folder / offsets)
            if n + 1 > 0 and (int(o[0]) != 0 or int(o[-1]) != len(v)):
                raise DataError(f"offsets must start at 0 and end at the length of {values} ({len(v)}), found "
                                f"{int(o[0])}..{int(o[-1])}", file=folder / offsets)
            return v, o

        tokens, offsets = ragged("tokens.npy", "offsets.npy", self.num_sequences)
        a: dict[str, Any] = {"tokens": MappedArray(tokens), "offsets": MappedArray(offsets)}
        mask = arr("loss_mask.npy", self.stage in ("sft", "dpo", "reward"), length=len(tokens))
        a["loss_mask"] = MappedArray(mask) if mask is not None else None
        pl = arr("prompt_lengths.npy", self.stage in ("dpo", "reward"), length=self.num_records)
        a["prompt_lengths"] = MappedArray(pl) if pl is not None else None
        labels = arr("labels.npy", self.stage == "classify", length=self.num_records)
        a["labels"] = MappedArray(labels) if labels is not None else None
        if self.meta.get("has_answers"):
            for v, o in (("answer_tokens.npy", "answer_offsets.npy"), ("answer_text.npy", "answer_text_offsets.npy")):
                vv, oo = ragged(v, o, self.num_records)
                a[v.removesuffix(".npy")], a[o.removesuffix(".npy")] = MappedArray(vv), MappedArray(oo)
        if self.meta.get("has_images"):
            vv, oo = ragged("images.npy", "images_offsets.npy", self.num_records)
            a["images"], a["images_offsets"] = MappedArray(vv), MappedArray(oo)
        self._arrays = a
        return a

    # ------------------------------------------------------------------------------------------------- access
    def _span(self, offsets: Any, i: int, total: int, file: str) -> tuple[int, int]:
        if isinstance(offsets, MappedArray):
            s, e = offsets.read(i, i + 2).tolist()
        else:
            s, e = int(offsets[i]), int(offsets[i + 1])
        if not 0 <= s <= e <= total:
            raise DataError(f"corrupt offsets [{s}, {e}) (data length {total})", file=file, record=i)
        return s, e

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(int64 token ids, uint8 loss mask or None) of sequence ``i``."""
        a = self._open()
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        s, e = self._span(a["offsets"], i, len(a["tokens"]), os.path.join(self.path, "offsets.npy"))
        ids = a["tokens"].read(s, e)
        mask = a["loss_mask"].read(s, e, np.uint8) if a["loss_mask"] is not None else None
        return ids, mask

    def prompt_length(self, r: int) -> int:
        pl = self._open()["prompt_lengths"]
        return 0 if pl is None else (pl.item(r) if isinstance(pl, MappedArray) else int(pl[r]))

    def label(self, r: int) -> int:
        """The class id of classification record ``r`` (``labels.npy``)."""
        labels = self._open().get("labels")
        if labels is None:
            raise DataError(f"{self.stage!r} data has no labels", file=self.path)
        return labels.item(r)

    def _bytes(self, values: str, offsets: str, r: int) -> bytes:
        a = self._open()
        s, e = self._span(a[offsets], r, len(a[values]), os.path.join(self.path, offsets + ".npy"))
        return a[values].read(s, e, np.uint8).tobytes()

    def answer(self, r: int) -> tuple[np.ndarray, str] | None:
        a = self._open()
        if "answer_tokens" not in a:
            return None
        s, e = self._span(a["answer_offsets"], r, len(a["answer_tokens"]),
                          os.path.join(self.path, "answer_offsets.npy"))
        ids = a["answer_tokens"].read(s, e)
        return ids, self._bytes("answer_text", "answer_text_offsets", r).decode("utf-8", errors="replace")

    def images(self, r: int) -> list[str] | None:
        if "images" not in self._open():
            return None
        b = self._bytes("images", "images_offsets", r)
        return b.decode("utf-8").split("\0") if b else []

    def lengths(self, chunk: int = 1 << 20) -> np.ndarray:
        """Lengths of all sequences (int64), computed in chunks from the offsets."""
        o = self._open()["offsets"]
        n = self.num_sequences
        out = np.empty(n, np.int64)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            v = o.read(s, e + 1) if isinstance(o, MappedArray) else np.asarray(o[s:e + 1], np.int64)
            out[s:e] = np.diff(v)
        return out
