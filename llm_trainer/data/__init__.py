"""The data layer: memory-mapped token formats, datasets, samplers, collates and the jsonl → tokens preparation.

Names are imported lazily so that ``prepare_data`` worker processes (which import
``llm_trainer.data.prepare``) do not pay for importing torch. See ``docs/data.md``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # formats
    "DataError": "formats", "token_dtype": "formats", "open_token_array": "formats", "IndexedWriter": "formats",
    "IndexedData": "indexed", "NpyWriter": "formats", "MappedArray": "formats",
    # datasets
    "FileDataset": "datasets", "PretrainDataset": "datasets", "StreamingPretrainDataset": "datasets",
    "SFTDataset": "datasets", "DPODataset": "datasets", "RewardDataset": "datasets", "RLDataset": "datasets",
    "ConcatFileDataset": "datasets", "open_dataset": "datasets",
    # sampler
    "ShardedSampler": "sampler",
    # collate
    "pad_sequences": "collate", "pack_sequences": "collate", "PadCollate": "collate", "PackingCollate": "collate",
    "DPOCollate": "collate", "PromptCollate": "collate", "collate_for": "collate", "pad_with_mask": "collate",
    "length_mask": "collate", "IGNORE_INDEX": "collate",
    # preference pairs
    "PairDataset": "pairs", "PairCollate": "pairs", "validate_pairs": "pairs", "open_pair_dataset": "pairs",
    # prepare (the function is exported as `prepare_data`: `llm_trainer.data.prepare` is its module)
    "prepare_data": "prepare", "PrepareStats": "reporting",
}
_RENAMED = {"prepare_data": "prepare"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_trainer.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llm_trainer.data.{module}"), _RENAMED.get(name, name))


__all__ = sorted(_EXPORTS)
