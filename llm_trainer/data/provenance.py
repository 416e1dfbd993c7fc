"""Which tokenizer prepared a dataset, and the check that training uses the same one.

Token ids mean nothing without their tokenizer: data prepared with tokenizer A and trained with tokenizer B
(another vocabulary, or the same size with other ids) trains on garbage without an error. Prepared data therefore
records its tokenizer: an indexed folder in ``meta.json``, a flat ``NAME.npy`` in the sidecar ``NAME.npy.meta.json``
(:func:`write_flat_meta`). The fields (:func:`tokenizer_record`):

- ``tokenizer``: the path the tokenizer was loaded from (None for one built in memory);
- ``tokenizer_sha256``: :func:`tokenizer_fingerprint`, a hash of the vocabulary (every id and its token string);
- ``vocab_size``, ``eos_token_id``.

:func:`check_tokenizer` runs when a dataset is opened with the training tokenizer and raises
:class:`~llm_trainer.data.formats.DataError` when the vocabulary size, the EOS id or the fingerprint differ. Data
that records no fingerprint (older ``prepare_data`` output) is compared with the recorded tokenizer file itself when
that file still exists. A record without a ``tokenizer`` or ``tokenizer_sha256`` field (folders written directly with
:class:`~llm_trainer.data.formats.IndexedWriter`, whose ``vocab_size`` may be the model's) is not checked.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llm_trainer.data.formats import DataError

__all__ = ["tokenizer_fingerprint", "tokenizer_record", "check_tokenizer", "flat_meta_path", "read_flat_meta",
           "write_flat_meta"]


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """SHA-256 of the vocabulary (``id<TAB>token`` lines in id order, added tokens included); None for an object
    without a ``tokenizers`` backend. Equal fingerprints mean every id names the same token."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_vocab"):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    text = "\n".join(f"{i}\t{t}" for t, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """The fields prepared data records about its tokenizer (see the module docstring)."""
    path = getattr(tokenizer, "path", None)
    return {"tokenizer": os.path.abspath(path) if path else None,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "vocab_size": int(tokenizer.vocab_size), "eos_token_id": tokenizer.eos_token_id}


def _recorded_fingerprint(meta: dict[str, Any], tokenizer: Any) -> str | None:
    """The data's fingerprint: recorded, else computed from the recorded tokenizer file if it is still there (and
    is not the file ``tokenizer`` was just loaded from)."""
    if meta.get("tokenizer_sha256"):
        return meta["tokenizer_sha256"]
    path, ours = meta.get("tokenizer"), getattr(tokenizer, "path", None)
    if not isinstance(path, str) or not os.path.exists(path):
        return None
    if ours and os.path.abspath(ours) == os.path.abspath(path):
        return None  # the very file training loaded
    from llm_trainer.tokenizer import Tokenizer
    try:
        return tokenizer_fingerprint(Tokenizer(path))
    except (OSError, ValueError):
        return None  # no longer a readable tokenizer: nothing to compare with


def check_tokenizer(meta: dict[str, Any], tokenizer: Any, *, file: str | os.PathLike) -> None:
    """Raise :class:`DataError` (naming ``file``, both tokenizers and what differs) when the data described by
    ``meta`` was prepared with another tokenizer than ``tokenizer``. No-op for ``tokenizer=None`` or a ``meta``
    that records no tokenizer."""
    if tokenizer is None or not {"tokenizer", "tokenizer_sha256"} & meta.keys():
        return
    differ = []
    size = meta.get("vocab_size")
    if isinstance(size, int) and size != tokenizer.vocab_size:
        differ.append(f"vocabulary size {size} vs {tokenizer.vocab_size}")
    eos = meta.get("eos_token_id")
    if isinstance(eos, int) and tokenizer.eos_token_id is not None and eos != tokenizer.eos_token_id:
        differ.append(f"EOS id {eos} vs {tokenizer.eos_token_id}")
    if not differ:
        ours = tokenizer_fingerprint(tokenizer)
        theirs = _recorded_fingerprint(meta, tokenizer) if ours else None
        if theirs and theirs != ours:
            differ.append(f"vocabulary fingerprint (sha256) {theirs[:12]}… vs {ours[:12]}…")
    if differ:
        data_tok = meta.get("tokenizer") or "a tokenizer built in memory"
        train_tok = getattr(tokenizer, "path", None) or "a tokenizer built in memory"
        raise DataError(f"the data was prepared with the tokenizer {data_tok}, but training uses {train_tok}: "
                        f"{', '.join(differ)}. Token ids would be read with the wrong vocabulary: prepare the data "
                        "again with the training tokenizer (prepare_data --tokenizer ...), or train with the "
                        "tokenizer the data was prepared with", file=file)


def flat_meta_path(path: str | os.PathLike) -> Path:
    """The sidecar of a flat token file: ``NAME.npy`` → ``NAME.npy.meta.json``."""
    return Path(f"{os.fspath(path)}.meta.json")


def write_flat_meta(path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write the sidecar of the flat token file ``path`` (atomically: a temporary file, then a rename)."""
    target = flat_meta_path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_flat_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of the flat token file ``path`` (None when there is none)."""
    target = flat_meta_path(path)
    if not target.is_file():
        return None
    try:
        meta = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"invalid JSON ({e})", file=target) from None
    if not isinstance(meta, dict):
        raise DataError("expected a JSON object", file=target)
    return meta
