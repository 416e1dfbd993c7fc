"""Vocabulary extension: add tokens (or another BPE tokenizer's vocabulary) to a tokenizer and grow the model's
embedding and LM head to match, e.g. to adapt a model to a new language.

* :func:`extend_vocabulary` ``(model, tokenizer, new_tokens | other_tokenizer, init=...) -> (model, tokenizer)``:
  returns a *new* :class:`~llm_trainer.tokenizer.Tokenizer` (the given one is not modified) and resizes ``model``
  in place. The saved folder (``model.save_pretrained(d)``; ``tokenizer.save(d)``) is a valid Hugging Face folder.
* :func:`merge_bpe_vocab`: the tokens of another BPE vocabulary that ours lacks are appended **to the BPE model**
  (new ids after every existing id) together with the other tokenizer's merges, ranked after all of ours. They are
  not added as "added tokens": those are matched greedily anywhere in the raw text before pre-tokenization, so a
  subword such as ``ing`` would split every word containing it and ignore word boundaries. As BPE entries they take
  part in ordinary merging inside pre-tokenized words, exactly as in the other tokenizer, while our merges keep
  priority. Both tokenizers must be BPE and agree on byte-level encoding (token strings are in the same alphabet);
  our normalizer, pre-tokenizer and decoder are kept. The other tokenizer's special/added tokens are not merged.
  Text our merges already covered usually tokenizes as before, but a pair we never merged can now be merged by one
  of the other's merges (it ranks last, so only after all of ours).
* Row initialisation (``init``): ``"mean"`` — the mean of the existing tokens' rows (Hewitt 2021, "Initializing New
  Word Embeddings for Pretrained Language Models": keeps the new tokens' logits close to the average); ``"normal"``
  — N(0, ``initializer_range``); ``"subtokens"`` — the mean of the rows of the tokens the *old* tokenizer splits the
  new token's text into (falls back to the mean for tokens it cannot split); or a callable
  ``init(weight [V, H], new_ids: list[int]) -> [len(new_ids), H]``, called for the embedding and for an untied head.
  Rows the resize adds beyond the tokenizer (``pad_to_multiple_of``) are set to the mean.
* :func:`train_new_token_rows`: make only the rows ``>= first_new_id`` of the embedding (and an untied head)
  trainable, by a gradient hook that zeroes the other rows' gradient; combine with LoRA adapters on the rest.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import torch
from torch import nn
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ..tokenizer import Tokenizer
from .llm import LlmModel

__all__ = ["extend_vocabulary", "merge_bpe_vocab", "resize_token_embeddings", "train_new_token_rows", "INITS"]

INITS = ("mean", "normal", "subtokens")
InitFn = Callable[[torch.Tensor, list], torch.Tensor]


# ------------------------------------------------------------------------------------------------ tokenizer side
def _is_byte_level(spec: dict) -> bool:
    def walk(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(spec.get("pre_tokenizer")) or walk(spec.get("decoder"))


def _merge_pair(m) -> tuple[str, str]:
    return tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))


def merge_bpe_vocab(base: HFTokenizer, other: HFTokenizer) -> tuple[HFTokenizer, list[str]]:
    """A copy of ``base`` whose BPE model also holds ``other``'s tokens and merges (see the module docstring).
    Returns (tokenizer, the added token strings in id order)."""
    b, o = json.loads(base.to_str()), json.loads(other.to_str())
    for name, spec in (("base", b), ("other", o)):
        kind = (spec.get("model") or {}).get("type")
        if kind != "BPE":
            raise ValueError(f"merge_bpe_vocab: the {name} tokenizer's model is {kind!r}, not 'BPE'")
    if _is_byte_level(b) != _is_byte_level(o):
        raise ValueError("merge_bpe_vocab: one tokenizer is byte-level and the other is not; their token strings "
                         "are in different alphabets")
    vocab: dict[str, int] = b["model"]["vocab"]
    added = {t["content"] for t in b.get("added_tokens") or []}
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in b.get("added_tokens") or [])], default=-1)
    new_tokens: list[str] = []
    for tok, _ in sorted(o["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab and tok not in added:
            vocab[tok] = next_id
            next_id += 1
            new_tokens.append(tok)
    merges = b["model"]["merges"]
    as_lists = bool(merges) and isinstance(merges[0], list)
    known = {_merge_pair(m) for m in merges}
    for m in o["model"]["merges"]:
        pair = _merge_pair(m)
        if pair not in known:
            known.add(pair)
            merges.append(list(pair) if as_lists else " ".join(pair))
    return HFTokenizer.from_str(json.dumps(b)), new_tokens


def _extended_backend(tokenizer: Tokenizer, new: Sequence[str] | Tokenizer | HFTokenizer,
                      special: bool) -> HFTokenizer:
    if isinstance(new, (Tokenizer, HFTokenizer)):
        other = new.backend if isinstance(new, Tokenizer) else new
        return merge_bpe_vocab(tokenizer.backend, other)[0]
    if isinstance(new, str) or not all(isinstance(t, str) and t for t in new):
        raise TypeError("new_tokens must be a list of non-empty strings or a tokenizer to merge")
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    backend.add_tokens([AddedToken(t, special=special, normalized=False) for t in dict.fromkeys(new)])
    return backend


# ----------------------------------------------------------------------------------------------------- model side
def _check_model(model: nn.Module) -> None:
    if not isinstance(model, LlmModel):
        raise TypeError(f"vocabulary extension works on an LlmModel, got {type(model).__name__}")
    if model.lm_head is not None and not isinstance(model.lm_head, nn.Linear):
        raise ValueError(f"lm_head is a {type(model.lm_head).__name__}; resize the vocabulary before applying "
                         "LoRA or quantization to it")


def _mean_rows(weight: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return weight[rows].float().mean(0, keepdim=True).expand(n, -1).to(weight.dtype)


def _init_rows(weight: torch.Tensor, new_ids: list[int], old_rows: torch.Tensor, init: str | InitFn, std: float,
               subtokens: list[list[int]] | None) -> torch.Tensor:
    n = len(new_ids)
    if callable(init):
        out = init(weight, list(new_ids))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, weight.shape[1]):
            raise ValueError(f"init callable must return a tensor of shape {(n, weight.shape[1])}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out.to(weight.dtype)
    if init == "mean":
        return _mean_rows(weight, old_rows, n)
    if init == "normal":
        return torch.randn(n, weight.shape[1], device=weight.device).mul_(std).to(weight.dtype)
    mean = _mean_rows(weight, old_rows, 1)[0]
    return torch.stack([weight[ids].float().mean(0).to(weight.dtype) if ids else mean for ids in subtokens])


@torch.no_grad()
def resize_token_embeddings(model: LlmModel, vocab_size: int, new_ids: Sequence[int] = (),
                            old_ids: Sequence[int] | None = None, init: str | InitFn = "mean",
                            subtokens: list[list[int]] | None = None) -> LlmModel:
    """Resize the input embedding (and an untied LM head) of ``model`` to ``vocab_size`` rows in place, keeping
    the existing rows. Rows ``new_ids`` are initialised by ``init`` (see the module docstring; ``subtokens[i]`` are
    the old-token ids for ``new_ids[i]``); other rows the resize adds get the mean of ``old_ids``' rows (default:
    all rows that existed). ``config.vocab_size`` follows. Shrinking is refused."""
    _check_model(model)
    if not callable(init) and init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a callable, got {init!r}")
    old_v = model.config.vocab_size
    if vocab_size < old_v:
        raise ValueError(f"resize_token_embeddings cannot shrink the vocabulary ({old_v} -> {vocab_size})")
    new_ids = list(new_ids)
    if new_ids and (min(new_ids) < 0 or max(new_ids) >= vocab_size):
        raise ValueError(f"new token ids must be in [0, {vocab_size}), got {min(new_ids)}..{max(new_ids)}")
    rows = torch.as_tensor(list(old_ids) if old_ids is not None else range(old_v), dtype=torch.long)
    fresh = sorted(set(range(old_v, vocab_size)) - set(new_ids))
    for module, attr in ((model.model.embed_tokens, "num_embeddings"), (model.lm_head, "out_features")):
        if module is None:
            continue
        w = module.weight
        grown = torch.empty(vocab_size, w.shape[1], dtype=w.dtype, device=w.device)
        grown[:old_v] = w
        if fresh:
            grown[fresh] = _mean_rows(grown, rows, len(fresh))
        if new_ids:
            grown[new_ids] = _init_rows(grown, new_ids, rows, init, model.config.initializer_range, subtokens)
        module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
        setattr(module, attr, vocab_size)
    model.config.vocab_size = vocab_size
    return model


def extend_vocabulary(model: LlmModel, tokenizer: Tokenizer, new: Sequence[str] | Tokenizer | HFTokenizer, *,
                      init: str | InitFn = "mean", special: bool = False,
                      pad_to_multiple_of: int | None = None) -> tuple[LlmModel, Tokenizer]:
    """Add ``new`` (token strings, or another BPE tokenizer whose vocabulary is merged in) to ``tokenizer`` and grow
    ``model``'s embedding / untied head to cover every id (rounded up to ``pad_to_multiple_of``); a model already
    larger than the tokenizer (padded vocabularies) only re-initialises the rows of the new ids. Token strings are
    added as whole, never-split tokens (``special`` marks them special: skipped by ``decode``). Tokens already in
    the vocabulary are ignored. Returns ``(model, new_tokenizer)``; the first new id is ``tokenizer.vocab_size``."""
    _check_model(model)
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    old_vocab = tokenizer.get_vocab()
    if max(old_vocab.values(), default=-1) >= model.config.vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(old_vocab.values())} but the model's vocab_size is "
                         f"{model.config.vocab_size}: they do not belong together")
    backend = _extended_backend(tokenizer, new, special)
    new_tok = Tokenizer(_backend=backend, _config=tokenizer._config, chat_template=tokenizer.chat_template)
    new_ids = sorted(i for t, i in new_tok.get_vocab().items() if t not in old_vocab)
    size = max(model.config.vocab_size, max(new_ids, default=-1) + 1)
    if pad_to_multiple_of:
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    subtokens = None
    if init == "subtokens":
        texts = [new_tok.decode([i], skip_special_tokens=False) for i in new_ids]
        subtokens = [tokenizer.encode(t) for t in texts]
    resize_token_embeddings(model, size, new_ids, old_ids=sorted(old_vocab.values()), init=init, subtokens=subtokens)
    return model, new_tok


# --------------------------------------------------------------------------------------------------- training
def train_new_token_rows(model: LlmModel, first_new_id: int) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the embedding (and an untied LM head) trainable but let only rows ``>= first_new_id`` learn: a
    gradient hook zeroes the gradient of every other row, so Adam/Lion leave them unchanged (their moments stay 0).
    Call after ``apply_lora`` (which freezes everything but the adapters). Decoupled weight decay still shrinks
    zero-gradient rows of a parameter the optimizer decays, so both weights are marked never to be decayed
    (``optim.NO_DECAY_ATTR``). Returns the hook handles
    (``handle.remove()`` undoes the masking, not ``requires_grad``)."""
    _check_model(model)
    v = model.config.vocab_size
    if not 0 < first_new_id < v:
        raise ValueError(f"first_new_id must be in (0, {v}) (the model's vocab_size), got {first_new_id}")
    handles = []
    for module in (model.model.embed_tokens, model.lm_head):
        if module is None:
            continue
        w = module.weight
        keep = torch.zeros(v, 1, dtype=w.dtype, device=w.device)
        keep[first_new_id:] = 1
        w.requires_grad_(True)
        setattr(w, "_llm_trainer_no_decay", True)    # optim.NO_DECAY_ATTR: decay would shrink the frozen rows
        handles.append(w.register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
    return handles
