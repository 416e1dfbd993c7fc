"""jsonl → token files for every stage (the engine of the ``prepare_data`` console script).

Input records (one JSON object per line; blank lines are ignored):

- ``pretrain``: ``{"text": str}`` → one flat ``.npy`` token array, EOS after every document;
- ``sft``: ``{"messages": [{"role", "content"[, "reasoning_content"][, "tool_calls"]}, ...][, "tools": [...]]}`` or
  ``{"prompt": str, "response": str[, "system": str]}`` → indexed folder with a loss mask (1 on what the template
  marks as assistant output);
- ``dpo`` / ``reward``: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`` →
  indexed folder with chosen/rejected sequences, loss masks and prompt lengths;
- ``rl``: ``{"prompt": str | messages[, "answer": str | number]}`` → indexed folder of prompts ending in the
  generation prompt, with the reference answer's ids and text;
- ``classify``: ``{"text": str, "label": str | int}`` → indexed folder with a class id per record
  (:mod:`llm_trainer.data.classify`, which also maps string labels to ids).

An optional image column (``image_field``: a path or a list of paths per record) is stored with the indexed data;
the text must hold one image placeholder token per path.

Chat records render through the tokenizer's ``apply_chat_template`` (the model's own template, ``template_kwargs``
such as ``enable_thinking``, ``reasoning_history``); the per-record work is :mod:`llm_trainer.data.records`.
Work is split into chunks of lines tokenised by a pool of processes; results are written in input order, so the
output does not depend on the number of workers. Memory stays bounded: only a few chunks are in flight at a time.
Every bad record raises :class:`~llm_trainer.data.formats.DataError` naming file, line, field and reason, or, with
``skip_bad=True``, is counted and skipped. Output goes to a temporary name and is renamed into place at the end.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

from llm_trainer.data.formats import DataError, IndexedWriter, NpyWriter, replace_path, token_dtype
from llm_trainer.data.provenance import tokenizer_record, write_flat_meta
from llm_trainer.data.records import RecordEncoder, encode_chunk, init_worker
from llm_trainer.data.reporting import PrepareStats, Progress

__all__ = ["prepare", "PrepareStats", "STAGES"]

STAGES = ("pretrain", "sft", "dpo", "reward", "rl", "classify")


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
        self.meta = meta
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
            write_flat_meta(self.output, {**self.meta, "stage": "pretrain", "max_token_id": self.max_id,
                                          "stats": {k: v for k, v in asdict(stats).items()
                                                    if k not in ("output", "inputs")}})
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
            output: str | os.PathLike, *, template: str | None = None, template_kwargs: dict | None = None,
            reasoning_history: str = "template", max_length: int | None = None,
            workers: int = 1, skip_bad: bool = False, image_field: str | None = None, text_field: str = "text",
            progress: bool = True, chunk_lines: int = 256, progress_stream=None, labels=None) -> PrepareStats:
    """Tokenise jsonl ``inputs`` for ``stage`` into ``output`` (a ``.npy`` file for pretrain — ``.npy`` is appended
    when missing — else an indexed folder). ``tokenizer``: a :class:`~llm_trainer.tokenizer.Tokenizer` or a path.
    ``template``: chat template name or Jinja source (default: the tokenizer's). ``template_kwargs``: template
    variables (e.g. ``{"enable_thinking": False}``). ``reasoning_history``: ``template``/``keep``/``drop`` (see
    :mod:`llm_trainer.chat.turns`). ``max_length``: truncate longer samples (pretrain:
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
    chat = None
    if stage != "pretrain":  # unknown template names and options fail here, once, not per record
        from llm_trainer.chat import REASONING_HISTORY
        chat = tokenizer.get_chat_template(template)
        if reasoning_history not in REASONING_HISTORY:
            raise ValueError(f"reasoning_history must be one of {REASONING_HISTORY}, got {reasoning_history!r}")
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
    meta = {**tokenizer_record(tokenizer),
            "template": chat.name if chat else None, "template_origin": chat.origin if chat else None,
            "template_kwargs": {**tokenizer.chat_template_kwargs, **(template_kwargs or {})} if chat else None,
            "reasoning_history": reasoning_history if chat else None,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "image_token_id": tokenizer.image_token_id, "image_field": image_field,
            "sources": [os.path.abspath(f) for f in files],
            "max_length": max_length}
    sink = _Sink(stage, out_path, tokenizer, meta, has_images=image_field is not None)
    bar = Progress(stage, sum(os.path.getsize(f) for f in files), progress, progress_stream)
    enc_args = (tokenizer, stage, template, max_length, image_field, text_field, template_kwargs, reasoning_history)

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
            encoder = RecordEncoder(*enc_args)
            for job, nbytes in jobs:
                consume(encode_chunk(job, encoder), nbytes)
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
                pool = ctx.Pool(workers, initializer=init_worker, initargs=enc_args)
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
            with pool:
                pending: deque = deque()
                for job, nbytes in jobs:
                    pending.append((pool.apply_async(encode_chunk, (job,)), nbytes))
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
