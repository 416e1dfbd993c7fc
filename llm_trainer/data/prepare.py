"""jsonl → token files for every stage (the engine of the ``prepare_data`` console script).

Input records (one JSON object per line; blank lines are ignored):

- ``pretrain``: ``{"text": str}`` → one flat ``.npy`` token array, EOS after every document;
- ``sft``: ``{"messages": [{"role", "content"[, "think"]}, ...]}`` or ``{"prompt": str, "response": str
  [, "system": str]}`` → indexed folder with a loss mask (1 on what the template marks as assistant output);
- ``dpo`` / ``reward``: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`` →
  indexed folder with chosen/rejected sequences, loss masks and prompt lengths;
- ``rl``: ``{"prompt": str | messages[, "answer": str | number]}`` → indexed folder of prompts ending in the
  generation prompt, with the reference answer's ids and text;
- ``classify``: ``{"text": str, "label": str | int}`` → indexed folder with a class id per record
  (:mod:`llm_trainer.data.classify`, which also maps string labels to ids).

An optional image column (``image_field``: a path or a list of paths per record) is stored with the indexed data;
the text must hold one image placeholder token per path.

Work is split into chunks of lines tokenised by a pool of processes; results are written in input order, so the
output does not depend on the number of workers. Memory stays bounded: only a few chunks are in flight at a time.
Every bad record raises :class:`~llm_trainer.data.formats.DataError` naming file, line, field and reason, or, with
``skip_bad=True``, is counted and skipped. Output goes to a temporary name and is renamed into place at the end.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from llm_trainer.data.formats import DataError, IndexedWriter, NpyWriter, replace_path, token_dtype

__all__ = ["prepare", "PrepareStats", "STAGES"]

STAGES = ("pretrain", "sft", "dpo", "reward", "rl", "classify")


@dataclass
class PrepareStats:
    """What :func:`prepare` wrote. ``documents``: records written; ``truncated``: records cut to ``max_length``;
    ``skipped``: bad records (and empty files) skipped with ``skip_bad``; ``dropped``: records that could not be kept
    within ``max_length`` (an RL/DPO prompt already too long, or an SFT sample with no trained token left)."""

    stage: str
    output: str
    inputs: list[str]
    documents: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    dropped: int = 0
    seconds: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.documents / self.seconds if self.seconds > 0 else 0.0
        trate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"wrote {self.output} ({self.stage}): {self.documents:,} documents, {self.tokens:,} tokens, "
                f"{self.truncated:,} truncated, {self.skipped:,} skipped, {self.dropped:,} dropped in "
                f"{self.seconds:.1f}s ({rate:,.0f} docs/s, {trate:,.0f} tokens/s)")


class _Bad(Exception):
    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


# ============================================================================================ per-record encoders
class _Encoder:
    """Turns one parsed JSON record into token arrays. Lives in each worker process."""

    def __init__(self, tokenizer: Any, stage: str, template: str | None, max_length: int | None,
                 image_field: str | None, text_field: str):
        self.tok, self.stage, self.template = tokenizer, stage, template
        self.max_length, self.image_field, self.text_field = max_length, image_field, text_field
        self.eos = tokenizer.eos_token_id
        self.image_id = tokenizer.image_token_id

    # ------------------------------------------------------------------------------------------------ fields
    @staticmethod
    def _get(obj: dict, name: str) -> Any:
        if name not in obj:
            raise _Bad(name, "missing field")
        return obj[name]

    def _str(self, obj: dict, name: str, allow_empty: bool = False) -> str:
        v = self._get(obj, name)
        if not isinstance(v, str):
            raise _Bad(name, f"expected a string, got {type(v).__name__}")
        if not allow_empty and not v.strip():
            raise _Bad(name, "empty string")
        return v

    @staticmethod
    def _check_messages(v: Any, name: str) -> list[dict]:
        if not isinstance(v, list):
            raise _Bad(name, f"expected a list of messages, got {type(v).__name__}")
        if not v:
            raise _Bad(name, "empty list of messages")
        for j, m in enumerate(v):
            if not isinstance(m, dict):
                raise _Bad(name, f"message {j} must be an object with 'role' and 'content', got {type(m).__name__}")
            if not isinstance(m.get("role"), str):
                raise _Bad(name, f"message {j} has no string 'role'")
            c = m.get("content")
            if c is not None and not isinstance(c, (str, list)):
                raise _Bad(name, f"message {j}: 'content' must be a string or a list of parts, got "
                                 f"{type(c).__name__}")
        return v

    def _turns(self, obj: dict, name: str, role: str) -> list[dict]:
        """A string (one message of ``role``) or a list of messages."""
        v = self._get(obj, name)
        if isinstance(v, str):
            if not v.strip():
                raise _Bad(name, "empty string")
            return [{"role": role, "content": v}]
        return self._check_messages(v, name)

    def _chat(self, messages: list[dict], name: str, add_generation_prompt: bool = False):
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                template=self.template)
        except (ValueError, TypeError, KeyError) as e:
            raise _Bad(name, f"cannot apply the chat template: {e}") from None

    def _images(self, obj: dict, *token_lists: list[int]) -> list[str] | None:
        if self.image_field is None:
            return None
        v = obj.get(self.image_field)
        if v is None:
            paths: list[str] = []
        elif isinstance(v, str):
            paths = [v] if v else []
        elif isinstance(v, list) and all(isinstance(p, str) and p for p in v):
            paths = list(v)
        else:
            raise _Bad(self.image_field, "expected an image path or a list of image paths")
        if paths and self.image_id is None:
            raise _Bad(self.image_field, "the tokenizer has no image placeholder token (<image>)")
        for ids in token_lists:
            n = sum(1 for t in ids if t == self.image_id) if self.image_id is not None else 0
            if n != len(paths):
                raise _Bad(self.image_field, f"{len(paths)} image path(s) but {n} image placeholder(s) "
                                             f"{self.tok.image_token!r} in the text")
        return paths

    def _keep_images(self, paths: list[str] | None, ids: list[int]) -> list[str] | None:
        if not paths:
            return paths
        return paths[:sum(1 for t in ids if t == self.image_id)]

    # ------------------------------------------------------------------------------------------------ stages
    def encode(self, obj: dict, out: "_ChunkOut") -> None:
        getattr(self, "_" + ("dpo" if self.stage == "reward" else self.stage))(obj, out)

    def _pretrain(self, obj: dict, out: "_ChunkOut") -> None:
        ids = self.tok.encode(self._str(obj, self.text_field))
        if self.max_length is not None and len(ids) + 1 > self.max_length:
            ids = ids[:self.max_length - 1]
            out.truncated += 1
        out.seq(ids + [self.eos])
        out.records += 1

    def _sft(self, obj: dict, out: "_ChunkOut") -> None:
        if "messages" in obj:
            msgs = self._check_messages(obj["messages"], "messages")
            name = "messages"
        elif "prompt" in obj or "response" in obj:
            msgs = [{"role": "user", "content": self._str(obj, "prompt")},
                    {"role": "assistant", "content": self._str(obj, "response")}]
            if "system" in obj:
                msgs.insert(0, {"role": "system", "content": self._str(obj, "system", allow_empty=True)})
            name = "prompt"
        else:
            raise _Bad("messages", "missing field (an SFT record needs 'messages', or 'prompt' and 'response')")
        enc = self._chat(msgs, name)
        ids, mask = list(enc.input_ids), list(enc.assistant_mask)
        if not any(mask):
            raise _Bad(name, "no assistant message: nothing to train on")
        images = self._images(obj, ids)
        if self.max_length is not None and len(ids) > self.max_length:
            ids, mask = ids[:self.max_length], mask[:self.max_length]
            if not any(mask):
                out.dropped += 1
                return
            out.truncated += 1
            images = self._keep_images(images, ids)
        out.seq(ids, mask)
        out.image(images)
        out.records += 1

    def _dpo(self, obj: dict, out: "_ChunkOut") -> None:
        prompt = self._turns(obj, "prompt", "user")
        chosen = self._turns(obj, "chosen", "assistant")
        rejected = self._turns(obj, "rejected", "assistant")
        if chosen == rejected:
            raise _Bad("rejected", "identical to 'chosen'")
        c = self._chat(prompt + chosen, "chosen")
        r = self._chat(prompt + rejected, "rejected")
        for name, enc in (("chosen", c), ("rejected", r)):
            if not any(enc.assistant_mask):
                raise _Bad(name, "no assistant message: nothing to train on")
        gen = list(self._chat(prompt, "prompt", add_generation_prompt=True).input_ids)
        cid, rid = list(c.input_ids), list(r.input_ids)
        cm, rm = list(c.assistant_mask), list(r.assistant_mask)
        if cid[:len(gen)] == gen and rid[:len(gen)] == gen:
            plen = len(gen)
        else:  # a template whose prompt is not a prefix: fall back to the shared prefix
            plen = next((k for k, (a, b) in enumerate(zip(cid, rid)) if a != b), min(len(cid), len(rid)))
        if cid == rid:
            raise _Bad("rejected", "tokenises identically to 'chosen'")
        images = self._images(obj, cid[:plen])
        if self.max_length is not None and max(len(cid), len(rid)) > self.max_length:
            if plen >= self.max_length:
                out.dropped += 1
                return
            cid, cm, rid, rm = cid[:self.max_length], cm[:self.max_length], rid[:self.max_length], rm[:self.max_length]
            out.truncated += 1
        out.seq(cid, cm)
        out.seq(rid, rm)
        out.plen.append(plen)
        out.image(images)
        out.records += 1

    def _rl(self, obj: dict, out: "_ChunkOut") -> None:
        prompt = self._turns(obj, "prompt", "user")
        ids = list(self._chat(prompt, "prompt", add_generation_prompt=True).input_ids)
        answer = obj.get("answer")
        if answer is None:
            text = ""
        elif isinstance(answer, str):
            text = answer
        elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
            text = str(answer)
        else:
            raise _Bad("answer", f"expected a string or a number, got {type(answer).__name__}")
        images = self._images(obj, ids)
        if self.max_length is not None and len(ids) > self.max_length:
            out.dropped += 1
            return
        out.seq(ids)
        out.answer(self.tok.encode(text) if text else [], text)
        out.image(images)
        out.records += 1


class _ChunkOut:
    """Token arrays of one chunk, built in a worker and shipped back as compact numpy arrays."""

    def __init__(self):
        self.tokens: list[int] = []
        self.lengths: list[int] = []
        self.mask: list[int] = []
        self.plen: list[int] = []
        self.ans: list[int] = []
        self.ans_len: list[int] = []
        self.txt = bytearray()
        self.txt_len: list[int] = []
        self.img = bytearray()
        self.img_len: list[int] = []
        self.records = 0
        self.truncated = 0
        self.dropped = 0
        self.errors: list[tuple[int, str | None, str]] = []

    def seq(self, ids: list[int], mask: list[int] | None = None) -> None:
        self.tokens += ids
        self.lengths.append(len(ids))
        if mask is not None:
            self.mask += mask

    def answer(self, ids: list[int], text: str) -> None:
        self.ans += ids
        self.ans_len.append(len(ids))
        b = text.encode("utf-8")
        self.txt += b
        self.txt_len.append(len(b))

    def image(self, paths: list[str] | None) -> None:
        if paths is not None:
            b = "\0".join(paths).encode("utf-8")
            self.img += b
            self.img_len.append(len(b))

    def pack(self) -> dict:
        return {"tokens": np.asarray(self.tokens, np.uint32), "lengths": np.asarray(self.lengths, np.int64),
                "mask": np.asarray(self.mask, np.uint8), "plen": np.asarray(self.plen, np.int32),
                "ans": np.asarray(self.ans, np.uint32), "ans_len": np.asarray(self.ans_len, np.int64),
                "txt": np.frombuffer(bytes(self.txt), np.uint8), "txt_len": np.asarray(self.txt_len, np.int64),
                "img": np.frombuffer(bytes(self.img), np.uint8), "img_len": np.asarray(self.img_len, np.int64),
                "records": self.records, "truncated": self.truncated, "dropped": self.dropped,
                "errors": self.errors}


_ENCODER: _Encoder | None = None


def _init_worker(*args) -> None:
    global _ENCODER
    _ENCODER = _Encoder(*args)


def _encode_chunk(job: tuple[str, int, list[bytes]], encoder: _Encoder | None = None) -> dict:
    file, first_line, lines = job
    enc = encoder or _ENCODER
    out = _ChunkOut()
    for k, raw in enumerate(lines):
        lineno = first_line + k
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw.rstrip(b"\r\n"))
            except UnicodeDecodeError as e:
                raise _Bad(None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise _Bad(None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _Bad(None, f"expected a JSON object, got {type(obj).__name__}")
            before = (len(out.lengths), len(out.tokens), len(out.mask), len(out.plen), len(out.ans), len(out.ans_len),
                      len(out.txt), len(out.txt_len), len(out.img), len(out.img_len))
            try:
                enc.encode(obj, out)
            except _Bad:
                _rollback(out, before)
                raise
        except _Bad as e:
            out.errors.append((lineno, e.field, e.reason))
    packed = out.pack()
    packed["file"] = file
    return packed


def _rollback(out: _ChunkOut, before: tuple[int, ...]) -> None:
    """Undo a record's partial appends (e.g. chosen written, then the image check failed)."""
    (n_len, n_tok, n_mask, n_plen, n_ans, n_ans_len, n_txt, n_txt_len, n_img, n_img_len) = before
    del out.lengths[n_len:], out.tokens[n_tok:], out.mask[n_mask:], out.plen[n_plen:], out.ans[n_ans:]
    del out.ans_len[n_ans_len:], out.txt[n_txt:], out.txt_len[n_txt_len:], out.img[n_img:], out.img_len[n_img_len:]


# ================================================================================================ progress
class _Progress:
    """A small stderr progress line: percent of input bytes, documents, docs/s, tokens/s."""

    def __init__(self, stage: str, total_bytes: int, enabled: bool, stream=None):
        self.stage, self.total, self.enabled = stage, max(total_bytes, 1), enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.done_bytes = self.docs = self.tokens = 0

    def update(self, nbytes: int, docs: int, tokens: int, force: bool = False) -> None:
        self.done_bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(self.done_bytes / self.total, 1.0)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (f"prepare_data {self.stage} [{bar}] {frac * 100:5.1f}% | {self.docs:,} docs | "
                f"{self.docs / dt:,.0f} docs/s | {_human(self.tokens / dt)} tokens/s | {dt:.0f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(0, 0, 0, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


def _human(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}" if unit else f"{x:.0f}"
        x /= 1000
    return f"{x:.1f}T"


# ================================================================================================== driver
def _read_jobs(files: Sequence[str], chunk_lines: int, empty: list[str]) -> Iterator[tuple[tuple, int]]:
    """((file, first line number, lines), bytes) chunks; files without a single record are listed in ``empty``."""
    for f in files:
        seen = False
        with open(f, "rb") as fh:
            lines: list[bytes] = []
            first, nbytes = 1, 0
            for lineno, raw in enumerate(fh, 1):
                if not seen and raw.strip():
                    seen = True
                lines.append(raw)
                nbytes += len(raw)
                if len(lines) >= chunk_lines:
                    yield (f, first, lines), nbytes
                    lines, first, nbytes = [], lineno + 1, 0
            if lines:
                yield (f, first, lines), nbytes
        if not seen:
            empty.append(f)


class _Sink:
    """Where encoded chunks go: a flat .npy (pretrain) or an indexed folder."""

    def __init__(self, stage: str, output: Path, tokenizer: Any, meta: dict, has_images: bool):
        self.stage = stage
        self.output = output
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.max_id = -1
        if stage == "pretrain":
            self._tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
            self.npy = NpyWriter(self._tmp, self.dtype)
            self.indexed = None
        else:
            self.npy = None
            self.indexed = IndexedWriter(output, stage, tokenizer.vocab_size, has_answers=stage == "rl",
                                         has_images=has_images, meta=meta)

    def write(self, r: dict) -> None:
        if r["tokens"].size:
            self.max_id = max(self.max_id, int(r["tokens"].max()))
        if self.npy is not None:
            self.npy.write(r["tokens"])
            return
        self.indexed.append_block(r["tokens"], r["lengths"], records=r["records"], loss_mask=r["mask"],
                                  prompt_lengths=r["plen"], answer_tokens=r["ans"], answer_lengths=r["ans_len"],
                                  answer_text=r["txt"], answer_text_lengths=r["txt_len"], images=r["img"],
                                  image_lengths=r["img_len"], max_token_id=self.max_id)

    def close(self, stats: PrepareStats) -> None:
        if self.npy is not None:
            self.npy.close()
            replace_path(self._tmp, self.output)
        else:
            self.indexed.meta["stats"] = {k: v for k, v in asdict(stats).items() if k not in ("output", "inputs")}
            self.indexed.close()

    def abort(self) -> None:
        if self.npy is not None:
            self.npy.abort()
            if self._tmp.exists():
                self._tmp.unlink()
        else:
            self.indexed.abort()


def prepare(stage: str, tokenizer: Any, inputs: str | os.PathLike | Sequence[str | os.PathLike],
            output: str | os.PathLike, *, template: str | None = None, max_length: int | None = None,
            workers: int = 1, skip_bad: bool = False, image_field: str | None = None, text_field: str = "text",
            progress: bool = True, chunk_lines: int = 256, progress_stream=None, labels=None) -> PrepareStats:
    """Tokenise jsonl ``inputs`` for ``stage`` into ``output`` (a ``.npy`` file for pretrain — ``.npy`` is appended
    when missing — else an indexed folder). ``tokenizer``: a :class:`~llm_trainer.tokenizer.Tokenizer` or a path.
    ``template``: chat template name (default: the tokenizer's). ``max_length``: truncate longer samples (pretrain:
    documents, EOS included). ``workers``: processes (1 = in this process). ``labels``: classify only (class names or a
    prepared folder to take them from). Returns :class:`PrepareStats`."""
    t0 = time.perf_counter()
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "classify":   # batched in-process tokenising and the class-label mapping: llm_trainer.data.classify
        from .classify import prepare_classify
        return prepare_classify(tokenizer, inputs, output, labels=labels, template=template, max_length=max_length,
                                skip_bad=skip_bad, text_field=text_field, progress=progress, chunk_lines=chunk_lines,
                                progress_stream=progress_stream)
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if image_field is not None and stage == "pretrain":
        raise ValueError("image_field is for sft/dpo/reward/rl data, not pretraining text")
    if isinstance(tokenizer, (str, os.PathLike)):
        from llm_trainer.tokenizer import Tokenizer
        tokenizer = Tokenizer(tokenizer)
    if stage == "pretrain" and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to put between documents")
    if template is not None and stage != "pretrain":
        from llm_trainer.chat_templates import get_template
        get_template(template)  # unknown names fail here, once, not per record
    files = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(f) for f in inputs]
    if not files:
        raise ValueError("no input files")
    out_path = Path(output)
    if stage == "pretrain" and out_path.suffix != ".npy":
        out_path = out_path.with_name(out_path.name + ".npy")
    stats = PrepareStats(stage=stage, output=str(out_path), inputs=files)
    empty: list[str] = []
    for f in files:
        if not os.path.isfile(f):
            raise DataError("input file not found", file=f)
        if os.path.abspath(f) == os.path.abspath(out_path):
            raise ValueError(f"the output {out_path} is also an input")
        if os.path.getsize(f) == 0:
            if not skip_bad:
                raise DataError("file is empty (0 bytes)", file=f)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok_path = getattr(tokenizer, "path", None)
    meta = {"tokenizer": os.path.abspath(tok_path) if tok_path else None,
            "template": template or getattr(tokenizer, "chat_template", None),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "image_token_id": tokenizer.image_token_id, "image_field": image_field,
            "sources": [os.path.abspath(f) for f in files],
            "max_length": max_length}
    sink = _Sink(stage, out_path, tokenizer, meta, has_images=image_field is not None)
    bar = _Progress(stage, sum(os.path.getsize(f) for f in files), progress, progress_stream)
    enc_args = (tokenizer, stage, template, max_length, image_field, text_field)

    def consume(r: dict, nbytes: int) -> None:
        for lineno, fld, reason in r["errors"]:
            err = DataError(reason, file=r["file"], line=lineno, field=fld)
            if not skip_bad:
                raise err
            stats.skipped += 1
            if len(stats.skipped_examples) < 20:
                stats.skipped_examples.append(str(err))
        sink.write(r)
        stats.documents += r["records"]
        stats.tokens += int(r["tokens"].size)
        stats.truncated += r["truncated"]
        stats.dropped += r["dropped"]
        bar.update(nbytes, r["records"], int(r["tokens"].size))

    def check_empty() -> None:
        while empty:
            f = empty.pop(0)
            err = DataError("file is empty (no records)", file=f)
            if not skip_bad:
                raise err
            stats.skipped += 1
            stats.skipped_examples.append(str(err))

    try:
        jobs = _read_jobs(files, chunk_lines, empty)
        if workers == 1:
            encoder = _Encoder(*enc_args)
            for job, nbytes in jobs:
                consume(_encode_chunk(job, encoder), nbytes)
                check_empty()
        else:
            # fork where available: works from scripts without an `if __name__ == "__main__"` guard, and workers
            # only tokenise (no torch, no threads of the parent are used); elsewhere spawn
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            # each worker is one process: the tokenizer's own thread pool would only oversubscribe (and after a fork
            # `tokenizers` warns about it)
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=enc_args)
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
            with pool:
                pending: deque = deque()
                for job, nbytes in jobs:
                    pending.append((pool.apply_async(_encode_chunk, (job,)), nbytes))
                    check_empty()
                    while len(pending) >= 2 * workers:
                        res, nb = pending.popleft()
                        consume(res.get(), nb)
                while pending:
                    res, nb = pending.popleft()
                    consume(res.get(), nb)
        check_empty()
        if stats.documents == 0:
            raise DataError("no records were written (every input was empty, bad or too long)",
                            file=", ".join(files))
        stats.seconds = time.perf_counter() - t0
        sink.close(stats)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
