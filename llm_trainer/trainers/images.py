"""Image plumbing shared by the trainers (SFT, DPO, GRPO, eval generations) for `VlmModel` training.

Stored data keeps one image placeholder token per image (``<image>``, the tokenizer's ``image_token_id``, which a
`VLMConfig` uses as its ``image_token_id``); the trainers expand each placeholder into ``tokens_per_image`` image
tokens per sample, *before* padding (labels of image tokens are always -100), and load the pixel values of the
batch's images in row order (``pixel_values [N, 3, H, W]``, ``image_counts [B]``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..model.vlm import VLMConfig, expand_image_tokens, expand_image_tokens_and_labels


def is_vlm(config: Any) -> bool:
    return isinstance(config, VLMConfig)


def pixel_provider(provider: Any, config: Any):
    """``provider`` (a stage's ``pixel_values_provider``) if given, else the default provider of a VLM's vision
    config; None for a plain LLM (no images to load)."""
    if provider is not None or not is_vlm(config):
        return provider
    from ..images import DefaultPixelValuesProvider
    return DefaultPixelValuesProvider.from_vision_config(config)


def load_images(provider: Any, config: VLMConfig, paths: Sequence[str]) -> torch.Tensor:
    from ..images import load_pixel_values
    return load_pixel_values(provider, list(paths), image_size=config.vision_config.image_size)


def expand_items(items: list[dict], config: Any, pairs: Sequence[tuple[str, str | None]],
                 max_length: int | None = None) -> list[dict]:
    """Expand the image placeholders of every ``(ids_key, labels_key)`` of the items (new dicts; a no-op for an
    LLM). Image tokens never carry a label. ``max_length``: cut expanded rows back to it (text only: a row whose
    image tokens would be cut raises, naming the limit)."""
    if not is_vlm(config):
        return items
    out = []
    tid, tpi = config.image_token_id, config.tokens_per_image
    for it in items:
        it = dict(it)
        for ids_key, labels_key in pairs:
            ids = it.get(ids_key)
            if ids is None:
                continue
            if labels_key is not None and it.get(labels_key) is not None:
                it[ids_key], it[labels_key] = expand_image_tokens_and_labels(ids, it[labels_key], tid, tpi)
            else:
                it[ids_key] = expand_image_tokens(ids, tid, tpi)
            if max_length is not None and len(it[ids_key]) > max_length:
                if bool((torch.as_tensor(it[ids_key][max_length:]) == tid).any()):
                    raise ValueError(f"a sample's {ids_key} holds {len(it[ids_key])} tokens once its images are "
                                     f"expanded to {tpi} tokens each; its images do not fit in "
                                     f"dataset_block_size={max_length}: raise it or use fewer images per sample")
                it[ids_key] = it[ids_key][:max_length]
                if labels_key is not None and it.get(labels_key) is not None:
                    it[labels_key] = it[labels_key][:max_length]
        out.append(it)
    return out


def attach_pixel_values(batch: dict, rows: list[list[str]] | None, provider: Any, config: Any) -> dict:
    """Set ``pixel_values`` and ``image_counts`` for ``rows`` (the image paths of each batch row, in row order)
    and drop the ``images`` paths from the batch."""
    batch.pop("images", None)
    if not is_vlm(config) or not rows or not any(rows):
        return batch
    batch["pixel_values"] = load_images(provider, config, [p for r in rows for p in r])
    batch["image_counts"] = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return batch


def eval_generation_inputs(texts: Sequence[str], image_tags: Sequence[Any] | None, config: Any, tokenizer: Any,
                           format_prompt: Callable[[str], list[int]], provider: Any) -> tuple[list[list[int]], dict]:
    """Token ids of the eval prompts ``texts`` (through ``format_prompt``) and the extra ``generate`` arguments
    (``pixel_values``).

    ``image_tags[i]`` (a path, a list of paths, or None) holds the images of eval prompt ``i``; a prompt whose text
    has fewer image placeholders (the tokenizer's ``<image>``) than images gets the missing ones prepended (one
    per line). Placeholders are expanded to ``tokens_per_image`` image tokens."""
    texts = list(texts)
    if not is_vlm(config):
        if image_tags is not None and any(image_tags):
            raise ValueError("eval_image_tags need a VLM (model_config=VLMConfig(...))")
        return [format_prompt(t) for t in texts], {}
    tags: list[list[str]] = [[] for _ in texts]
    if image_tags is not None:
        if len(image_tags) != len(texts):
            raise ValueError(f"eval_image_tags has {len(image_tags)} entries for {len(texts)} eval prompts "
                             f"(one list of image paths per prompt)")
        tags = [[] if t is None else ([str(t)] if isinstance(t, (str, bytes)) or not isinstance(t, Sequence)
                                      else [str(p) for p in t]) for t in image_tags]
    token = getattr(tokenizer, "image_token", None) or "<image>"
    tid = config.image_token_id
    prompts = []
    for i, (text, paths) in enumerate(zip(texts, tags)):
        missing = len(paths) - text.count(token)
        if missing > 0:
            text = token * missing + "\n" + text
        ids = list(format_prompt(text))
        n = sum(1 for t in ids if t == tid)
        if n != len(paths):
            raise ValueError(f"eval prompt {i} has {n} image placeholder(s) {token!r} (id {tid}) but "
                             f"{len(paths)} image(s) in eval_image_tags")
        prompts.append(expand_image_tokens(ids, tid, config.tokens_per_image))
    flat = [p for t in tags for p in t]
    if not flat:
        return prompts, {}
    return prompts, {"pixel_values": load_images(provider, config, flat)}
