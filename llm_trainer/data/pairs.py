"""Preference pairs for DPO and reward models: validation (bad pairs named by file and record), the dataset of the
pairs that passed, and the collate that puts chosen rows before rejected rows.

A pair item holds ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels`` (labels
-100 where not trained) and optionally ``margin`` (reward models) and ``images`` (VLM).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .collate import IGNORE_INDEX, DPOCollate
from .formats import DataError

__all__ = ["PairDataset", "PairCollate", "validate_pairs", "open_pair_dataset", "pair_problem", "record_location"]


def record_location(dataset: Any, i: int) -> tuple[str | None, int]:
    """``(file, record)`` of item ``i`` of a pair dataset: the file it came from and its record number there."""
    locate = getattr(dataset, "locate", None)
    if locate is not None and hasattr(dataset, "files"):
        f, j = locate(i)
        return str(dataset.files[f]), int(j)
    return getattr(dataset, "path", None), int(i)


def _trained(labels: torch.Tensor) -> int:
    """Response tokens that get a log-prob: labels after the first position that are not ignored."""
    return int((torch.as_tensor(labels)[1:] != IGNORE_INDEX).sum())


def pair_problem(item: dict) -> str | None:
    """Why a pair cannot be trained on, or None."""
    nc, nr = _trained(item["chosen_labels"]), _trained(item["rejected_labels"])
    if nc == 0 or nr == 0:
        side = "chosen and rejected" if nc == nr == 0 else ("chosen" if nc == 0 else "rejected")
        return (f"empty response: the {side} sequence has no trained token (empty response, prompt-only "
                f"sequence, or a response cut off by block_size)")
    ci, ri = torch.as_tensor(item["chosen_input_ids"]), torch.as_tensor(item["rejected_input_ids"])
    if ci.shape == ri.shape and bool(torch.equal(ci, ri)) and \
            torch.equal(torch.as_tensor(item["chosen_labels"]), torch.as_tensor(item["rejected_labels"])):
        return "chosen and rejected are identical (no preference to learn)"
    return None


def validate_pairs(dataset: Any, *, skip: bool, name: str = "train", transform=None,
                   flag: str = "DPOConfig.skip_bad_pairs") -> tuple[np.ndarray, list[tuple[str | None, int, str]]]:
    """Check every pair once. Returns ``(kept indices, bad pairs as (file, record, reason))``; raises
    :class:`DataError` for the first bad pair (with the total count) unless ``skip``."""
    keep: list[int] = []
    bad: list[tuple[str | None, int, str]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if transform is not None:
            item = transform(item)
        why = pair_problem(item)
        if why is None:
            keep.append(i)
        else:
            bad.append((*record_location(dataset, i), why))
    if bad and not skip:
        file, record, why = bad[0]
        more = f" ({len(bad)} bad pairs in the {name} data; records: " \
               f"{', '.join(str(b[1]) for b in bad[:10])}{', ...' if len(bad) > 10 else ''})" if len(bad) > 1 else ""
        raise DataError(f"{why}{more}; fix the data or set {flag}=True to skip such pairs", file=file,
                        record=record)
    return np.asarray(keep, dtype=np.int64), bad


class PairDataset(Dataset):
    """The pairs of ``base`` that passed validation. Items gain ``"index"`` (the pair's index in ``base``) and, once
    the reference pass has run, ``"ref_logps"`` ``[2]`` (reference log-probs of chosen and rejected)."""

    def __init__(self, base: Any, keep: Sequence[int] | np.ndarray, train_prompt: bool = False):
        self.base = base
        self.keep = np.asarray(keep, dtype=np.int64)
        self.train_prompt = train_prompt
        self.ref_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keep)

    def transform(self, item: dict) -> dict:
        if self.train_prompt:  # mask_prompt=False: the prompt tokens count in the log-probs too
            item = {**item, "chosen_labels": torch.as_tensor(item["chosen_input_ids"]).clone(),
                    "rejected_labels": torch.as_tensor(item["rejected_input_ids"]).clone()}
        return item

    def __getitem__(self, i: int) -> dict:
        j = int(self.keep[i])
        item = self.transform(dict(self.base[j]))
        item["index"] = j
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item


class PairCollate:
    """``DPOCollate`` (``[2B, L]``: chosen rows then rejected rows) plus ``index`` ``[B]`` and, when the items carry
    them, ``ref_logps`` ``[B, 2]``. Picklable (DataLoader workers)."""

    def __init__(self, pad_token_id: int):
        self.inner = DPOCollate(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        out = self.inner(items)
        out["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
        if "ref_logps" in items[0]:
            out["ref_logps"] = torch.stack([torch.as_tensor(it["ref_logps"], dtype=torch.float32) for it in items])
        if "margin" in items[0]:
            out["margin"] = torch.tensor([float(it["margin"]) for it in items], dtype=torch.float32)
        return out


def open_pair_dataset(files: Any, block_size: int | None, vocab_size: int | None, tokenizer: Any = None):
    """A dataset object (anything with ``__getitem__`` returning pair dicts, e.g. a list) is used as given;
    paths go through ``open_dataset('dpo', ...)`` (checked against ``tokenizer`` when given)."""
    if isinstance(files, Dataset) or (isinstance(files, (list, tuple)) and files and isinstance(files[0], dict)):
        return files
    from .datasets import open_dataset
    return open_dataset("dpo", files, block_size, vocab_size=vocab_size, tokenizer=tokenizer)
