"""On-disk token formats: reading (memory-mapped, validated) and writing (streamed, atomic).

Formats (full description with field names and dtypes in ``docs/data.md``):

- **flat** ``.npy``: a 1-D integer token array (``uint16`` when the vocabulary fits, else ``uint32``) with the EOS
  token between documents; pretraining.
- **raw** ``.bin`` (any suffix other than ``.npy``/``.jsonl``/``.pkl``): a headerless token dump; the dtype must be
  stated because the file does not record it.
- **indexed** folder: ``meta.json`` + ``tokens.npy`` + ``offsets.npy`` (+ ``loss_mask.npy``, ``prompt_lengths.npy``,
  ``labels.npy``, answer and image columns); SFT, DPO, reward-model, RL and classification data. Every array is loaded with ``mmap_mode='r'``.
  Written here (:class:`IndexedWriter`), read by :class:`llm_trainer.data.indexed.IndexedData`.
- **legacy** object-array ``.npy`` / ``.pkl`` files written by other tools: only with ``allow_pickle=True``.

Memory: nothing is loaded whole. Files are opened with ``np.load(mmap_mode='r')`` (shape, dtype and size checked
first) and items are copied out of the page cache with positioned reads (:class:`MappedArray`), so iterating a file
much larger than RAM keeps the process RSS flat.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "DataError", "token_dtype", "read_npy_header", "open_token_array", "load_legacy", "MappedArray", "NpyWriter",
    "IndexedWriter", "INDEXED_FORMAT", "INDEXED_VERSION", "INDEXED_STAGES", "first_out_of_range",
    "out_of_range_reason", "replace_path",
]

INDEXED_FORMAT = "llm_trainer.indexed"
INDEXED_VERSION = 1
INDEXED_STAGES = ("sft", "dpo", "reward", "rl", "classify")
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_WHY = ("it holds Python objects, and loading those unpickles them, which can run arbitrary code. Pass "
               "allow_pickle=True only for files you trust, or better, convert them once with prepare_data into "
               "the memory-mapped format")


class DataError(ValueError):
    """Bad training data. The message names the file, the line (jsonl) or record (token files), the field and why.

    Attributes ``file``, ``line``, ``record``, ``field`` and ``reason`` hold the parts (None when not applicable)."""

    def __init__(self, reason: str, *, file: str | os.PathLike | None = None, line: int | None = None,
                 record: int | None = None, field: str | None = None):
        self.reason, self.line, self.record, self.field = reason, line, record, field
        self.file = None if file is None else str(file)
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if line is not None:
            parts.append(f"line {line}")
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(", ".join(parts) + ": " + reason if parts else reason)

    def __reduce__(self):  # keep the keyword arguments across processes
        return _rebuild_data_error, (self.reason, self.file, self.line, self.record, self.field)


def _rebuild_data_error(reason, file, line, record, field):
    return DataError(reason, file=file, line=line, record=record, field=field)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits, else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def first_out_of_range(tokens: "MappedArray", vocab_size: int | None,
                       chunk: int = 1 << 20) -> tuple[int, int] | None:
    """(position, id) of the first token id that is negative or ``>= vocab_size`` (``None`` checks the sign only),
    or None. One pass over the file in chunks of ``chunk`` ids, each copied out with a positioned read (so a file
    larger than RAM is scanned without growing the process RSS); unsigned arrays skip the sign check."""
    if vocab_size is None and not tokens.signed:
        return None
    for start in range(0, len(tokens), chunk):
        ids = tokens.read(start, start + chunk, tokens.dtype)
        bad = None
        if tokens.signed and ids.min() < 0:
            bad = ids < 0
        if vocab_size is not None and ids.max() >= vocab_size:
            bad = (ids >= vocab_size) if bad is None else bad | (ids >= vocab_size)
        if bad is not None:
            pos = int(np.argmax(bad))
            return start + pos, int(ids[pos])
    return None


def out_of_range_reason(token_id: int, position: int, vocab_size: int | None) -> str:
    """The :class:`DataError` reason for :func:`first_out_of_range`'s finding."""
    if token_id < 0:
        return f"negative token id {token_id} at position {position}"
    return (f"token id {token_id} at position {position} is >= the vocabulary size {vocab_size} (data prepared with "
            "another tokenizer, or a damaged file?)")


# ------------------------------------------------------------------------------------------------------ reading
def read_npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a ``.npy`` file, with :class:`DataError` for a file that is
    empty, not a ``.npy`` file or whose header is cut off."""
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise DataError("file is empty (0 bytes)", file=path)
    with open(path, "rb") as f:
        magic = f.read(8)
        if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
            raise DataError("not a .npy file (bad magic bytes); raw token dumps need a .bin suffix and a stated dtype",
                            file=path)
        major = magic[6]
        if major == 1:
            raw = f.read(2)
            hlen = struct.unpack("<H", raw)[0] if len(raw) == 2 else None
        elif major in (2, 3):
            raw = f.read(4)
            hlen = struct.unpack("<I", raw)[0] if len(raw) == 4 else None
        else:
            raise DataError(f"unsupported .npy format version {major}.{magic[7]}", file=path)
        header = f.read(hlen) if hlen is not None else b""
        if hlen is None or len(header) < hlen:
            raise DataError("truncated .npy file: the header is cut off", file=path)
        offset = f.tell()
    try:
        d = ast.literal_eval(header.decode("latin1" if major < 3 else "utf8"))
        shape, fortran, descr = tuple(d["shape"]), bool(d["fortran_order"]), d["descr"]
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception as e:
        raise DataError(f"corrupt .npy header ({e})", file=path) from None
    return shape, fortran, dtype, offset


def _check_integer_dtype(dtype: np.dtype, path: str, what: str) -> None:
    if dtype.kind not in "ui" or dtype.itemsize > 8:
        raise DataError(f"{what} have dtype {dtype}, but token files must hold integers (uint16/uint32, or "
                        "int32/int64)", file=path)


def open_token_array(path: str | os.PathLike, *, dtype: Any = None, allow_pickle: bool = False,
                     what: str = "tokens", expect_ndim: int = 1) -> np.ndarray:
    """Open a 1-D integer array memory-mapped read-only, validating it first.

    ``.npy``: the header is checked (magic, integer dtype, 1-D, file long enough for the shape — a truncated file is
    reported, not half-read). An object-array ``.npy`` needs ``allow_pickle=True`` (then it is loaded whole and
    returned as an int64 array). Other suffixes are raw dumps: ``dtype`` is required and the size must be a multiple
    of its item size."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError("file not found", file=path)
    if path.endswith(".pkl") or path.endswith(".pickle"):
        return np.asarray(_flat_ints(load_legacy(path, allow_pickle=allow_pickle), path), dtype=np.int64)
    if path.endswith(".npy"):
        shape, fortran, dt, offset = read_npy_header(path)
        if dt.hasobject:
            return np.asarray(_flat_ints(load_legacy(path, allow_pickle=allow_pickle), path), dtype=np.int64)
        _check_integer_dtype(dt, path, what)
        if len(shape) != expect_ndim:
            raise DataError(f"{what} must be a {expect_ndim}-D array, found shape {shape}", file=path)
        if dtype is not None and np.dtype(dtype) != dt:
            raise DataError(f"{what} have dtype {dt}, expected {np.dtype(dtype)}", file=path)
        n = int(np.prod(shape))
        need = offset + n * dt.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise DataError(f"truncated .npy file: the header declares {n} items of {dt} ({need} bytes with the "
                            f"header) but the file has {have} bytes", file=path)
        if n == 0:
            return np.zeros(shape, dtype=dt)
        return np.load(path, mmap_mode="r")
    # raw dump
    if dtype is None:
        raise DataError("a raw token dump has no header, so its dtype must be stated (dtype='uint16' or 'uint32'); "
                        "use .npy to have it recorded", file=path)
    dt = np.dtype(dtype)
    _check_integer_dtype(dt, path, what)
    size = os.path.getsize(path)
    if size == 0:
        raise DataError("file is empty (0 bytes)", file=path)
    if size % dt.itemsize:
        raise DataError(f"size {size} bytes is not a multiple of {dt.itemsize} ({dt}): wrong dtype or a truncated "
                        "file", file=path)
    return np.memmap(path, dtype=dt, mode="r")


def load_legacy(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """Load an old object-array ``.npy`` or a ``.pkl`` file (list of token lists or of dicts), only when allowed."""
    path = str(path)
    if not allow_pickle:
        raise DataError(f"refusing to load this file without allow_pickle=True: {_PICKLE_WHY}", file=path)
    try:
        if path.endswith(".npy"):
            obj = np.load(path, allow_pickle=True)
            return obj.tolist() if isinstance(obj, np.ndarray) else obj
        with open(path, "rb") as f:
            return pickle.load(f)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read the pickled data ({type(e).__name__}: {e})", file=path) from None


def _flat_ints(obj: Any, path: str) -> list[int]:
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)) or not all(isinstance(t, (int, np.integer)) for t in obj[:1000]):
        raise DataError("a pretraining file must hold one flat list of token ids", file=path)
    return list(obj)


class MappedArray:
    """A 1-D token array opened with ``np.load(mmap_mode='r')`` whose items are copied out with positioned reads.

    ``array`` is the read-only memory map (slice it freely for vectorised work). :meth:`read` and :meth:`item` do
    not go through the mapping but ``os.preadv`` the same bytes from the same file into a fresh buffer: pages touched
    through a mapping count in the process RSS until unmapped, and on Linux 6.x one page fault maps a whole page-cache
    folio (up to 2 MiB), so random item access through the mapping costs a fault per item once the file is larger
    than the memory one is willing to keep mapped. A positioned read copies just the item's bytes from the page
    cache, never grows the RSS, and is safe in forked DataLoader workers (no shared file position). Plain in-memory
    arrays (legacy files) are simply sliced."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self._view = np.asarray(array)  # plain ndarray over the same memory: slicing skips np.memmap's overhead
        self.signed = array.dtype.kind == "i"
        self._fd: int | None = None
        self._path: str | None = None
        self._offset = 0
        if (isinstance(array, np.memmap) and hasattr(os, "preadv") and getattr(array, "filename", None)
                and array.ndim == 1 and array.flags.c_contiguous):
            self._path, self._offset = array.filename, int(array.offset)

    def __len__(self) -> int:
        return len(self.array)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def read(self, start: int, stop: int, dtype: Any = np.int64) -> np.ndarray:
        """A fresh array (never a view of the mapping) of ``array[start:stop]`` converted to ``dtype``."""
        if self._path is None:
            return self._view[start:stop].astype(dtype)
        n = len(self._view)
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
        buf = np.empty(max(stop - start, 0), self._view.dtype)
        if buf.size:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            got = os.preadv(self._fd, [buf], self._offset + start * buf.itemsize)
            if got != buf.nbytes:
                raise DataError(f"short read ({got} of {buf.nbytes} bytes at item {start}): the file was truncated "
                                "while in use", file=self._path)
        return buf if buf.dtype == np.dtype(dtype) else buf.astype(dtype)

    def item(self, i: int) -> int:
        return int(self.read(i, i + 1)[0])


# ------------------------------------------------------------------------------------------------------ writing
class NpyWriter:
    """Stream a 1-D array of unknown final length into a ``.npy`` file: a fixed-size header is written first and
    patched with the real shape by :meth:`close`. Reads back with ``np.load`` (any mode)."""

    _HEADER_BYTES = 128

    def __init__(self, path: str | os.PathLike, dtype: Any):
        self.path = str(path)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._f = open(self.path, "wb")
        self._f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        body = repr(d).encode("latin1")
        total = self._HEADER_BYTES
        pad = total - 10 - len(body) - 1
        assert pad >= 0
        body = body + b" " * pad + b"\n"
        return _NPY_MAGIC + bytes([1, 0]) + struct.pack("<H", len(body)) + body

    def write(self, values: Any) -> None:
        a = np.asarray(values)
        if a.size == 0:
            return
        if a.dtype != self.dtype:
            a = a.astype(self.dtype)
        self._f.write(np.ascontiguousarray(a).tobytes())
        self.count += a.size

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.seek(0)
        self._f.write(self._header(self.count))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def replace_path(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished ``tmp`` file or folder to ``final``. An existing ``final`` is moved aside first and removed
    only after the new one is in place, so a crash never leaves a half-written ``final``."""
    tmp, final = Path(tmp), Path(final)
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)  # atomic for files (and for a folder onto a missing path)


class _RaggedColumn:
    """values.npy + offsets.npy pair being written."""

    def __init__(self, folder: Path, values: str, offsets: str, dtype: Any):
        self.values = NpyWriter(folder / values, dtype)
        self.offsets = NpyWriter(folder / offsets, np.int64)
        self.offsets.write(np.zeros(1, np.int64))
        self.total = 0

    def append(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        self.values.write(flat)
        self.offsets.write(self.total + np.cumsum(lengths))
        self.total += int(lengths.sum())

    def close(self) -> None:
        self.values.close()
        self.offsets.close()

    def abort(self) -> None:
        self.values.abort()
        self.offsets.abort()


class IndexedWriter:
    """Write an indexed dataset folder (see ``docs/data.md``) record by record, atomically.

    Use as a context manager; the folder appears under its final name only when the block exits without an error::

        with IndexedWriter("data/sft", stage="sft", vocab_size=tok.vocab_size) as w:
            enc = tok.apply_chat_template(messages)
            w.add_sft(enc.input_ids, enc.assistant_mask)

    ``add_*`` take Python lists or numpy arrays. Records are buffered and written in blocks.
    """

    def __init__(self, path: str | os.PathLike, stage: str, vocab_size: int, *, has_answers: bool = False,
                 has_images: bool = False, meta: dict | None = None, buffer_tokens: int = 1 << 20):
        if stage not in INDEXED_STAGES:
            raise ValueError(f"stage must be one of {INDEXED_STAGES}, got {stage!r}")
        self.path = Path(path)
        self.stage = stage
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.has_answers = has_answers and stage == "rl"
        self.has_images = has_images
        self.meta = dict(meta or {})
        self.num_records = 0
        self.num_tokens = 0
        self.max_token_id = -1
        self._buffer_tokens = buffer_tokens
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self._tmp.exists():
            shutil.rmtree(self._tmp) if self._tmp.is_dir() else self._tmp.unlink()
        self._tmp.mkdir()
        self._seq = _RaggedColumn(self._tmp, "tokens.npy", "offsets.npy", self.dtype)
        self._mask = NpyWriter(self._tmp / "loss_mask.npy", np.uint8) if stage in ("sft", "dpo", "reward") else None
        self._label = NpyWriter(self._tmp / "labels.npy", np.int64) if stage == "classify" else None
        self._prompt_len = NpyWriter(self._tmp / "prompt_lengths.npy", np.int32) if stage in ("dpo", "reward") \
            else None
        self._ans = _RaggedColumn(self._tmp, "answer_tokens.npy", "answer_offsets.npy", self.dtype) \
            if self.has_answers else None
        self._ans_text = _RaggedColumn(self._tmp, "answer_text.npy", "answer_text_offsets.npy", np.uint8) \
            if self.has_answers else None
        self._img = _RaggedColumn(self._tmp, "images.npy", "images_offsets.npy", np.uint8) if has_images else None
        self._buf: dict[str, list] = {k: [] for k in ("seq", "seq_len", "mask", "plen", "ans", "ans_len", "txt",
                                                      "txt_len", "img", "img_len", "label")}
        self._buffered = 0
        self._closed = False

    # -------------------------------------------------------------------------------------------------- records
    def _ids(self, ids: Any, field: str) -> np.ndarray:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise DataError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                                record=self.num_records, field=field)
            self.max_token_id = max(self.max_token_id, hi)
        return a

    def _mask01(self, mask: Any, n: int, field: str) -> np.ndarray:
        m = np.asarray(mask, dtype=np.int64).reshape(-1)
        if m.size != n:
            raise DataError(f"loss mask has {m.size} entries for {n} tokens", record=self.num_records, field=field)
        if m.size and (m.min() < 0 or m.max() > 1):
            raise DataError("loss mask must hold only 0 and 1", record=self.num_records, field=field)
        return m.astype(np.uint8)

    def _seq_add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self._buf["seq"].append(ids)
        self._buf["seq_len"].append(ids.size)
        if mask is not None:
            self._buf["mask"].append(mask)
        self._buffered += ids.size

    def _extras(self, images: Sequence[str] | None) -> None:
        if self._img is not None:
            paths = list(images or [])
            for p in paths:
                if not isinstance(p, str) or not p or "\0" in p:
                    raise DataError(f"image path must be a non-empty string, got {p!r}", record=self.num_records,
                                    field="images")
            b = "\0".join(paths).encode("utf-8")
            self._buf["img"].append(np.frombuffer(b, np.uint8))
            self._buf["img_len"].append(len(b))
        elif images:
            raise ValueError("this writer was created without has_images=True")
        self.num_records += 1
        if self._buffered >= self._buffer_tokens:
            self.flush()

    def add_sft(self, input_ids: Any, loss_mask: Any, images: Sequence[str] | None = None) -> None:
        if self.stage != "sft":
            raise ValueError(f"add_sft on a {self.stage!r} writer")
        ids = self._ids(input_ids, "input_ids")
        self._seq_add(ids, self._mask01(loss_mask, ids.size, "loss_mask"))
        self._extras(images)

    def add_pair(self, chosen_ids: Any, chosen_mask: Any, rejected_ids: Any, rejected_mask: Any,
                 prompt_length: int, images: Sequence[str] | None = None) -> None:
        """A DPO / reward-model pair: full sequences (prompt + response) and their loss masks."""
        if self.stage not in ("dpo", "reward"):
            raise ValueError(f"add_pair on a {self.stage!r} writer")
        c = self._ids(chosen_ids, "chosen")
        r = self._ids(rejected_ids, "rejected")
        cm = self._mask01(chosen_mask, c.size, "chosen_mask")
        rm = self._mask01(rejected_mask, r.size, "rejected_mask")
        if not 0 <= prompt_length <= min(c.size, r.size):
            raise DataError(f"prompt length {prompt_length} exceeds a response sequence", record=self.num_records,
                            field="prompt_length")
        self._seq_add(c, cm)
        self._seq_add(r, rm)
        self._buf["plen"].append(prompt_length)
        self._extras(images)

    def add_rl(self, prompt_ids: Any, answer_ids: Any = None, answer_text: str | None = None,
               images: Sequence[str] | None = None) -> None:
        if self.stage != "rl":
            raise ValueError(f"add_rl on a {self.stage!r} writer")
        p = self._ids(prompt_ids, "prompt")
        if p.size == 0:
            raise DataError("empty prompt", record=self.num_records, field="prompt")
        self._seq_add(p, None)
        if self._ans is not None:
            a = self._ids(answer_ids if answer_ids is not None else [], "answer")
            t = np.frombuffer((answer_text or "").encode("utf-8"), np.uint8)
            self._buf["ans"].append(a)
            self._buf["ans_len"].append(a.size)
            self._buf["txt"].append(t)
            self._buf["txt_len"].append(t.size)
        elif answer_ids is not None or answer_text is not None:
            raise ValueError("this writer was created without has_answers=True")
        self._extras(images)

    def add_classify(self, input_ids: Any, label: int) -> None:
        """A classification record: the text's token ids and its class id (``labels.npy``, int64)."""
        if self.stage != "classify":
            raise ValueError(f"add_classify on a {self.stage!r} writer")
        ids = self._ids(input_ids, "input_ids")
        if ids.size == 0:
            raise DataError("empty text (no tokens)", record=self.num_records, field="input_ids")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise DataError(f"label must be a non-negative int, got {label!r}", record=self.num_records,
                            field="label")
        self._seq_add(ids, None)
        self._buf["label"].append(int(label))
        self._extras(None)

    def append_block(self, tokens: np.ndarray, lengths: np.ndarray, *, records: int, loss_mask: np.ndarray,
                     prompt_lengths: np.ndarray, answer_tokens: np.ndarray, answer_lengths: np.ndarray,
                     answer_text: np.ndarray, answer_text_lengths: np.ndarray, images: np.ndarray,
                     image_lengths: np.ndarray, max_token_id: int) -> None:
        """Append many already-validated records at once (``prepare_data``'s fast path): flat arrays plus per-row
        lengths, in the layout of the files. Columns this writer does not have are ignored."""
        self.flush()
        self._seq.append(np.asarray(tokens).astype(self.dtype, copy=False), lengths)
        if self._mask is not None:
            self._mask.write(loss_mask)
        if self._prompt_len is not None:
            self._prompt_len.write(prompt_lengths)
        if self._ans is not None:
            self._ans.append(np.asarray(answer_tokens).astype(self.dtype, copy=False), answer_lengths)
            self._ans_text.append(answer_text, answer_text_lengths)
        if self._img is not None:
            self._img.append(images, image_lengths)
        self.num_records += records
        self.num_tokens += int(np.asarray(tokens).size)
        self.max_token_id = max(self.max_token_id, max_token_id)

    def flush(self) -> None:
        b = self._buf
        if b["seq_len"]:
            self._seq.append(np.concatenate(b["seq"]), np.asarray(b["seq_len"]))
            self.num_tokens += int(sum(b["seq_len"]))
        if self._mask is not None and b["mask"]:
            self._mask.write(np.concatenate(b["mask"]))
        if self._prompt_len is not None and b["plen"]:
            self._prompt_len.write(np.asarray(b["plen"], np.int32))
        if self._ans is not None and b["ans_len"]:
            self._ans.append(np.concatenate(b["ans"]), np.asarray(b["ans_len"]))
            self._ans_text.append(np.concatenate(b["txt"]), np.asarray(b["txt_len"]))
        if self._img is not None and b["img_len"]:
            self._img.append(np.concatenate(b["img"]), np.asarray(b["img_len"]))
        if self._label is not None and b["label"]:
            self._label.write(np.asarray(b["label"], np.int64))
        for v in b.values():
            v.clear()
        self._buffered = 0

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _columns(self):
        return [c for c in (self._seq, self._mask, self._prompt_len, self._ans, self._ans_text, self._img,
                            self._label) if c is not None]

    def close(self) -> Path:
        """Finish the files, write ``meta.json`` and move the folder to its final name. Returns the path."""
        if self._closed:
            return self.path
        self.flush()
        for c in self._columns():
            c.close()
        meta = {
            "format": INDEXED_FORMAT, "version": INDEXED_VERSION, "stage": self.stage,
            "num_records": self.num_records,
            "num_sequences": self.num_records * (2 if self.stage in ("dpo", "reward") else 1),
            "num_tokens": self.num_tokens, "token_dtype": self.dtype.name, "vocab_size": self.vocab_size,
            "max_token_id": self.max_token_id, "has_loss_mask": self._mask is not None,
            "has_answers": self.has_answers, "has_images": self.has_images, "has_labels": self._label is not None,
        }
        meta.update({k: v for k, v in self.meta.items() if k not in meta})
        with open(self._tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
            f.write("\n")
        replace_path(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written; an existing folder at ``path`` is untouched."""
        if self._closed:
            return
        for c in self._columns():
            c.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
