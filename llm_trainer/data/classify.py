"""Sequence-classification data: jsonl ``{"text", "label"}`` → an indexed folder (``stage = "classify"``), and the
dataset that reads it.

Input: one JSON object per line (blank lines ignored) with a non-empty string ``text`` and a ``label`` that is a string
(a class name) or a non-negative int (a class id); one kind per dataset. Class ids:

- ``labels`` given (a list of names, or a prepared classify folder whose names to reuse — pass the training folder
  when preparing held-out data so both use the same ids): a string label is its index in the list, an int label must
  be ``< len(labels)``; anything else is an unknown label;
- string labels without ``labels``: the sorted set of names found in the inputs (read once before tokenising);
- int labels without ``labels``: the ints themselves, ``num_labels = max + 1``, names ``"0", "1", ...``.

Output: ``tokens.npy`` / ``offsets.npy`` (the text's ids; with ``template`` the text is the user turn of a chat ending
in the generation prompt) and ``labels.npy`` (int64 class id per record); ``meta.json`` records ``labels`` (names in
id order), ``num_labels``, ``label_counts`` and the tokenizer. ``max_length`` keeps a text's first ``max_length``
tokens (counted as truncated). Bad records raise :class:`~.formats.DataError` naming file, line and field (missing or
empty text, a missing, unknown or mistyped label), or are skipped and counted with ``skip_bad``.

Tokenising runs in this process in batches of ``chunk_lines`` texts (the `tokenizers` library encodes a batch on all
cores). Nothing here imports torch (``prepare_data`` stays light); :class:`ClassifyDataset` does, when read.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .formats import DataError, IndexedWriter
from .indexed import IndexedData
from .reporting import PrepareStats, Progress
from .provenance import tokenizer_record
from .records import BadRecord

__all__ = ["prepare_classify", "ClassifyDataset", "label_names_of", "LABEL_FIELD"]

LABEL_FIELD = "label"


def label_names_of(labels: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """Class names in id order from a list, or from a prepared classify folder's ``meta.json`` (None: not given)."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)) and Path(labels).is_dir():
        return list(IndexedData(labels, stages=("classify",)).meta["labels"])
    if isinstance(labels, str):
        raise ValueError(f"labels={labels!r}: expected a list of class names or a prepared classify folder")
    names = [str(n) for n in labels]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"labels must be a non-empty list of distinct class names, got {names}")
    return names


def _records(files: Sequence[str]) -> Iterator[tuple[str, int, Any, int]]:
    """(file, line number, parsed object or the BadRecord describing why not, bytes) of every non-blank line."""
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except UnicodeDecodeError as e:
                    obj = BadRecord(None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                except json.JSONDecodeError as e:
                    obj = BadRecord(None, f"malformed JSON ({e.msg} at column {e.colno})")
                else:
                    if not isinstance(obj, dict):
                        obj = BadRecord(None, f"expected a JSON object, got {type(obj).__name__}")
                yield f, lineno, obj, len(raw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _found_names(files: Sequence[str], label_field: str) -> list[str] | None:
    """The sorted string labels of the inputs (None when the labels are ints); bad lines are left to the main pass."""
    names: set[str] = set()
    for _, _, obj, _ in _records(files):
        if isinstance(obj, dict) and isinstance(obj.get(label_field), str):
            names.add(obj[label_field])
    return sorted(names) if names else None


class _LabelMap:
    """Label value → class id, per the rules of the module docstring."""

    def __init__(self, names: list[str] | None, field: str):
        self.names, self.field = names, field
        self.index = {n: i for i, n in enumerate(names)} if names is not None else None
        self.max_id = -1

    def __call__(self, value: Any) -> int:
        if value is None:
            raise BadRecord(self.field, "missing label")
        if _is_int(value):
            if value < 0 or (self.names is not None and value >= len(self.names)):
                known = f"[0, {len(self.names)})" if self.names is not None else "non-negative"
                raise BadRecord(self.field, f"unknown label {value}: class ids must be {known}")
            self.max_id = max(self.max_id, value)
            return value
        if isinstance(value, str):
            if self.index is None:
                raise BadRecord(self.field, f"label {value!r} is a string but the labels of this data are ints")
            if value not in self.index:
                raise BadRecord(self.field, f"unknown label {value!r}; known labels: {self.names}")
            return self.index[value]
        raise BadRecord(self.field, f"label must be a string or an int, got {type(value).__name__}")

    @property
    def num_labels(self) -> int:
        return len(self.names) if self.names is not None else self.max_id + 1


def prepare_classify(tokenizer: Any, inputs: str | os.PathLike | Sequence[str | os.PathLike],
                     output: str | os.PathLike, *, labels: Sequence[str] | str | os.PathLike | None = None,
                     template: str | None = None, max_length: int | None = None, skip_bad: bool = False,
                     text_field: str = "text", label_field: str = LABEL_FIELD, progress: bool = True,
                     chunk_lines: int = 256, progress_stream=None):
    """Tokenise classification jsonl ``inputs`` into the indexed folder ``output`` (see the module docstring).
    ``tokenizer``: a :class:`~llm_trainer.tokenizer.Tokenizer` or a path. Returns a
    :class:`~.prepare.PrepareStats` (``documents`` = records written)."""
    t0 = time.perf_counter()
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer(tokenizer)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if template is not None:
        tokenizer.get_chat_template(template)  # an unknown name fails here, once
    files = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(f) for f in inputs]
    if not files:
        raise ValueError("no input files")
    for f in files:
        if not os.path.isfile(f):
            raise DataError("input file not found", file=f)
        if os.path.getsize(f) == 0 and not skip_bad:
            raise DataError("file is empty (0 bytes)", file=f)
    given = label_names_of(labels)
    label_of = _LabelMap(given if given is not None else _found_names(files, label_field), label_field)
    stats = PrepareStats(stage="classify", output=str(output), inputs=files)
    bar = Progress("classify", sum(os.path.getsize(f) for f in files), progress, progress_stream)
    writer = IndexedWriter(output, "classify", tokenizer.vocab_size)
    counts: dict[int, int] = {}

    def encode(batch: list[tuple[str, int, str, int]], nbytes: int) -> None:
        texts = [t for _, _, t, _ in batch]
        if template is None:
            ids_list = tokenizer.batch_encode(texts)
        else:
            ids_list = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                      template=template).input_ids for t in texts]
        for (f, line, _, label), ids in zip(batch, ids_list):
            if not ids:
                bad(f, line, BadRecord(text_field, "the text tokenises to nothing"))
                continue
            if max_length is not None and len(ids) > max_length:
                ids = ids[:max_length]
                stats.truncated += 1
            writer.add_classify(ids, label)
            counts[label] = counts.get(label, 0) + 1
            stats.documents += 1
            stats.tokens += len(ids)
        bar.update(nbytes, len(batch), sum(len(i) for i in ids_list))

    def bad(file: str, line: int, e: BadRecord) -> None:
        err = DataError(e.reason, file=file, line=line, field=e.field)
        if not skip_bad:
            raise err
        stats.skipped += 1
        if len(stats.skipped_examples) < 20:
            stats.skipped_examples.append(str(err))

    try:
        batch: list[tuple[str, int, str, int]] = []
        nbytes = 0
        for f, line, obj, size in _records(files):
            nbytes += size
            try:
                if isinstance(obj, BadRecord):
                    raise obj
                text = obj.get(text_field)
                if text is None:
                    raise BadRecord(text_field, "missing field")
                if not isinstance(text, str):
                    raise BadRecord(text_field, f"expected a string, got {type(text).__name__}")
                if not text.strip():
                    raise BadRecord(text_field, "empty text")
                batch.append((f, line, text, label_of(obj.get(label_field))))
            except BadRecord as e:
                bad(f, line, e)
            if len(batch) >= chunk_lines:
                encode(batch, nbytes)
                batch, nbytes = [], 0
        if batch:
            encode(batch, nbytes)
        if stats.documents == 0:
            raise DataError("no records were written (every input was empty or bad)", file=", ".join(files))
        names = label_of.names if label_of.names is not None else [str(i) for i in range(label_of.num_labels)]
        stats.seconds = time.perf_counter() - t0
        writer.meta.update(tokenizer_record(tokenizer), template=template, max_length=max_length,
                           sources=[os.path.abspath(f) for f in files], pad_token_id=tokenizer.pad_token_id,
                           labels=names, num_labels=label_of.num_labels,
                           label_counts=[counts.get(i, 0) for i in range(label_of.num_labels)],
                           stats={k: v for k, v in vars(stats).items() if k not in ("output", "inputs")})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


class ClassifyDataset:
    """A prepared classify folder (or several, concatenated by the caller): items ``{"input_ids", "labels"}``
    (``labels`` a 0-d long tensor, the class id). ``block_size`` keeps each text's first ``block_size`` tokens.
    ``num_labels`` and ``label_names`` come from ``meta.json``."""

    def __init__(self, path: str | os.PathLike, block_size: int | None = None, *, vocab_size: int | None = None,
                 tokenizer: Any = None):
        self.path = str(path)
        self.block_size = block_size
        self.data = IndexedData(path, vocab_size=vocab_size, stages=("classify",), tokenizer=tokenizer)
        self.label_names: list[str] = list(self.data.meta.get("labels") or [])
        self.num_labels = int(self.data.meta.get("num_labels") or len(self.label_names))

    def __len__(self) -> int:
        return self.data.num_records

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        ids, _ = self.data.sequence(i)
        if self.block_size is not None:
            ids = ids[:self.block_size]
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                "labels": torch.tensor(self.data.label(i), dtype=torch.long)}

    def __repr__(self) -> str:
        return f"ClassifyDataset({self.path!r}, items={len(self)}, labels={self.label_names})"
