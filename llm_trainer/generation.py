"""Batched autoregressive generation with a KV cache.

``generate(model, prompts, config, eos_token_ids, pad_token_id)`` takes prompts as lists of token ids (any lengths),
left-pads them, prefills them in one forward pass into a preallocated :class:`~llm_trainer.model.cache.KVCache`, then
decodes one token per step for every row at once.

Per step, the next-token logits (fp32) are processed in this order — the same order as Hugging Face:

1. ``suppress_tokens`` get ``-inf``;
2. ``repetition_penalty`` p (CTRL, Keskar et al. 2019) on every token id that occurs in the row's prompt or in its
   generated tokens so far: a logit ``l`` becomes ``l / p`` if ``l > 0`` else ``l * p`` (HF / vLLM semantics);
3. greedy (``do_sample=False`` or ``temperature <= 0``): ``argmax``. Otherwise ``l / temperature``, keep the
   ``top_k`` largest, then the smallest set of tokens whose probability mass reaches ``top_p`` (the most likely token
   is always kept), and sample from the softmax of what is left.

``return_logprobs=True`` returns, for every generated token, ``log_softmax`` of the *processed* logits at that step —
i.e. the log-probability under the distribution the token was actually drawn from (after suppression, repetition
penalty, temperature, top-k and top-p; filtered-out tokens have probability 0). For greedy decoding there is no
temperature and no filtering: it is ``log_softmax`` of the logits after steps 1–2. (For an RL importance ratio against
the raw policy, recompute log-probs with a forward pass; these are the *sampling* log-probs.)

A row finishes when it emits one of ``eos_token_ids`` or ``config.stop_token_ids``; the stop token is kept as the
last token of its completion. Finished rows keep running in the batch (their outputs are discarded and padded), and
the loop ends early once every row has finished; that check reads the device only every ``check_every`` steps
(8 on accelerators, 1 on CPU, where reading is free).

``group_size=g`` samples ``g`` completions per prompt: each distinct prompt is prefilled once and its cache rows are
repeated (``KVCache.repeat_interleave``); output rows are ordered prompt-major (``prompt0×g, prompt1×g, …``).

Static cache and CUDA graphs (``GenerateConfig.static_cache`` / ``compile``, plain ``LlmModel`` only): after the
prefill, the cache is copied into fixed-shape buffers (:class:`~llm_trainer.model.cache.StaticKVCache`) and every
decoding step attends over all of them under a boolean mask of the positions written so far, so each step has the
same shapes and no Python-side state changes — what ``torch.compile(mode="reduce-overhead")`` needs to replay one
captured CUDA graph per step. Same tokens as the default path (masked keys weigh exactly 0). With ``compile`` the
buffer length is rounded up to a power of two (fewer distinct shapes to compile) and the buffers are kept, one set
per model, for the next call with the same shapes (a graph captured over them stays valid); they are freed with the
model. On CPU, the first ``compile`` call of each shape takes tens of seconds (inductor's C++ build).
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_prepack
from .model.cache import KVCache

__all__ = ["GenerateConfig", "GenerationOutput", "generate", "streaming_generate", "process_logits",
           "choose_tokens", "lm_head_logits", "eval_mode"]


@dataclass
class GenerateConfig:
    """Decoding settings. ``temperature <= 0`` or ``do_sample=False`` → greedy. ``top_k`` None/0 → off."""

    max_new_tokens: int = 128
    """Tokens generated per row at most (fewer when every row has stopped)."""
    temperature: float = 1.0
    """Divides the logits before sampling; <= 0 means greedy."""
    top_k: int | None = None
    """Sample only among the k most likely tokens (None or 0: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1.0: off)."""
    repetition_penalty: float = 1.0
    """CTRL penalty on tokens already in the row (1.0: off); see the module docstring."""
    suppress_tokens: list[int] | None = None
    """Token ids never generated."""
    stop_token_ids: list[int] | None = None
    """Token ids that end a row, besides the EOS ids (the stop token is kept)."""
    do_sample: bool = True
    """False: greedy decoding whatever the temperature."""
    static_cache: bool = False
    """Decode over fixed-shape key/value buffers (same tokens; the shape-stable path CUDA graphs need)."""
    compile: bool = False
    """Run each decoding step through torch.compile(mode="reduce-overhead") (CUDA graphs on GPU); implies
    static_cache."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"GenerateConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature):
            raise ValueError(f"GenerateConfig.temperature must be a number, got {self.temperature!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
                raise ValueError(f"GenerateConfig.top_k must be None or an int >= 0, got {self.top_k!r}")
            if self.top_k == 0:
                self.top_k = None
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerateConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"GenerateConfig.repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("suppress_tokens", "stop_token_ids"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, int):
                v = [v]
            v = list(v)
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in v):
                raise ValueError(f"GenerateConfig.{name} must be a list of token ids >= 0, got {getattr(self, name)!r}")
            setattr(self, name, v)
        for name in ("do_sample", "static_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GenerateConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


@dataclass
class GenerationOutput:
    """``sequences`` ``[N, P + T]``: left-padded prompts followed by the generated tokens, ``pad_token_id`` after a
    row finished (P = longest prompt, T = steps run). ``attention_mask`` ``[N, P + T]``: 1 on prompt tokens and
    completion tokens. ``completions[i]``: the generated ids of row i, ending with its stop token when
    ``finished[i]``. ``logprobs[i]``: float32 tensor aligned with ``completions[i]`` (see the module docstring)."""

    sequences: torch.Tensor
    completions: list[list[int]]
    logprobs: list[torch.Tensor] | None
    finished: list[bool]
    attention_mask: torch.Tensor | None = None
    prompt_length: int = 0

    def __len__(self) -> int:
        return len(self.completions)


# ------------------------------------------------------------------------------------------- logits processing
def process_logits(logits: torch.Tensor, config: GenerateConfig, seen: torch.Tensor | None = None,
                   suppress: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1–2 of the module docstring on ``[N, V]`` fp32 logits: suppression and repetition penalty.
    ``seen`` is a ``[N, V]`` bool mask of tokens already in each row (prompt + generated)."""
    if suppress is not None:
        logits = logits.index_fill(1, suppress, float("-inf"))
    if seen is not None and config.repetition_penalty != 1.0:
        p = config.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    return logits


def choose_tokens(logits: torch.Tensor, config: GenerateConfig, generator: torch.Generator | None,
            need_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 3: pick one token per row from processed logits ``[N, V]``; returns (tokens [N], logprobs [N] | None)."""
    if config.greedy:
        tok = logits.argmax(dim=-1)
        lp = None
        if need_logprobs:
            lp = logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return tok, lp
    scores = logits / config.temperature
    idx = None
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        scores, idx = scores.topk(config.top_k, dim=-1)  # sorted descending: continue in top-k space
    if config.top_p < 1.0:
        if idx is None:
            scores, idx = scores.sort(dim=-1, descending=True)
        probs = scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        scores = scores.masked_fill(mass_before >= config.top_p, float("-inf"))  # the first token always stays
    logp = scores.log_softmax(dim=-1)
    # Gumbel-max in its exponential form: argmax p_i / E_i with E_i ~ Exp(1) samples i with probability p_i
    noise = torch.empty_like(logp).exponential_(1.0, generator=generator)
    choice = (logp.exp() / noise).argmax(dim=-1)
    lp = logp.gather(1, choice[:, None]).squeeze(1) if need_logprobs else None
    tok = choice if idx is None else idx.gather(1, choice[:, None]).squeeze(1)
    return tok, lp


# ------------------------------------------------------------------------------------------------- the decoder
def _inner_lm_head(model: nn.Module) -> nn.Module | None:
    """The output projection module (looking inside a VLM's ``llm``), None when tied to the embeddings."""
    inner = model
    while getattr(inner, "lm_head", None) is None and hasattr(inner, "llm"):
        inner = inner.llm
    return getattr(inner, "lm_head", None)


def lm_head_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Output projection of final hidden states (through the module when there is one: LoRA, ZeRO-3 hooks)."""
    head = _inner_lm_head(model)
    if head is not None:
        return head(h)
    return F.linear(h, model.lm_head_weight())


def _as_id_list(ids: Any, what: str) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, int):
        return [ids]
    out = list(ids)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in out):
        raise TypeError(f"{what} must be token ids (ints), got {ids!r}")
    return out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class _Decoder:
    """Holds the state of one batched generation; `prefill()` then `step()` until `done`."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], config: GenerateConfig,
                 eos_token_ids: Any, pad_token_id: int | None, group_size: int, return_logprobs: bool,
                 generator: torch.Generator | None, pixel_values: torch.Tensor | None, model_kwargs: dict,
                 prepack: bool = True):
        if isinstance(prompts, torch.Tensor):
            raise TypeError("prompts must be a list of token-id lists (left padding is done here), not a tensor")
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        rows = []
        for i, p in enumerate(prompts):
            p = _as_id_list(p, f"prompt {i}")
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS)")
            rows.append(p)
        mc = getattr(model, "config", None)
        if eos_token_ids is None and mc is not None:
            eos_token_ids = getattr(mc, "eos_token_id", None)
        stops = _as_id_list(eos_token_ids, "eos_token_ids") + list(config.stop_token_ids or [])
        if pad_token_id is None:
            pad_token_id = getattr(mc, "pad_token_id", None) if mc is not None else None
            if pad_token_id is None:
                pad_token_id = stops[0] if stops else 0
        self.model, self.config, self.generator = model, config, generator
        self.pad, self.group_size, self.return_logprobs = int(pad_token_id), group_size, return_logprobs
        self.device = _model_device(model)
        self.check_every = 1 if self.device.type == "cpu" else 8
        self.pixel_values, self.model_kwargs = pixel_values, dict(model_kwargs)  # prefill only

        U, G = len(rows), group_size
        self.N = N = U * G
        lengths = torch.tensor([len(r) for r in rows])
        self.P = P = int(lengths.max())
        ids = torch.full((U, P), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        self.prompt_ids = ids.to(self.device)
        self.padded = bool((lengths != P).any())
        T = config.max_new_tokens
        if self.padded:
            mask = torch.zeros((U, P + T), dtype=torch.long)
            mask[:, P:] = 1
            for i, r in enumerate(rows):
                mask[i, P - len(r):P] = 1
            self.mask = mask.to(self.device)  # decode steps pass views of it: no per-step mask rebuild
        else:
            self.mask = None
        self.positions = lengths.to(self.device)  # next position of every unique row
        self.stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=self.device) if stops else None
        suppress = set(config.suppress_tokens or [])
        image_id = getattr(mc, "image_token_id", None) if mc is not None else None
        if isinstance(image_id, int) and not isinstance(image_id, bool):
            suppress.add(image_id)  # a VLM never generates its image placeholder token
        self.suppress = (torch.tensor(sorted(suppress), dtype=torch.long, device=self.device)
                         if suppress else None)

        self.cache = KVCache(max_length=P + T)
        self.tokens = torch.full((N, T), self.pad, dtype=torch.long, device=self.device)
        self.logprobs = torch.zeros((N, T), dtype=torch.float32, device=self.device) if return_logprobs else None
        self.done = torch.zeros(N, dtype=torch.bool, device=self.device)
        self.seen = None
        self.t = 0  # tokens generated so far
        self.all_done = False
        self.hidden_path = True  # model supports return_hidden_states: we apply the output projection ourselves
        head = _inner_lm_head(model)
        self.head = head if head is not None else functools.partial(lm_head_logits, model)
        self._init_fast_path(model, T)
        self.static = None  # the StaticKVCache, once the prompt is prefilled (config.static_cache / compile)
        if config.static_cache or config.compile:
            if not self.fast:
                raise ValueError("GenerateConfig.static_cache/compile needs a plain LlmModel, got "
                                 f"{type(model).__name__}")
            self.cache = KVCache()  # holds the prefill only; it is copied into the static buffers
        if prepack and cpu_prepack.prepack_supported() and _inner_lm_head(model) is None \
                and hasattr(model, "lm_head_weight") and self.N >= cpu_prepack.CPU_PREPACK_MIN_ROWS:
            packed = cpu_prepack.pack_weight(model.lm_head_weight(), self.N)  # tied embeddings: no module to patch
            if packed is not None:
                self.head = functools.partial(cpu_prepack.packed_linear, packed, None)

    def _init_fast_path(self, model: nn.Module, T: int) -> None:
        """Decode steps of a plain `LlmModel` go through `LlmModel.decode_step`: RoPE cos/sin looked up in a table
        built once, the key-padding mask built once (views of it per step), no per-step id/mask checks (the prompt
        was checked by the prefill forward; generated ids come from the output projection)."""
        from llm_trainer.model.layers import rope_cos_sin
        from llm_trainer.model.llm import LlmModel

        self.fast = isinstance(model, LlmModel) and type(model).forward is LlmModel.forward \
            and hasattr(model, "decode_step")
        self.rope_table = None
        self.step_mask = None
        if not self.fast:
            return
        mc = model.config
        self.rope_dtype = model.get_input_embeddings().weight.dtype
        if mc.rope_scaling is None or mc.rope_scaling.rope_type != "dynamic":  # dynamic NTK depends on the length
            positions = torch.arange(self.P + T, device=self.device)[None]
            cos, sin = rope_cos_sin(mc, positions, self.rope_dtype)
            self.rope_table = (cos[:, None], sin[:, None])  # [1, 1, P+T, head_dim] each: apply_rope's broadcast shape

    def _step_rope(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the token fed at step t (position prompt_len + t - 1 of each row)."""
        if self.rope_table is not None and self.mask is None:  # no padding: every row is at position P + t - 1
            p = self.P + t - 1
            return self.rope_table[0][:, :, p:p + 1], self.rope_table[1][:, :, p:p + 1]  # [1, 1, 1, head_dim]
        pos = (self.positions + (t - 1))[:, None]
        if self.rope_table is not None:
            return self.rope_table[0][0, 0][pos].unsqueeze(1), self.rope_table[1][0, 0][pos].unsqueeze(1)
        from llm_trainer.model.layers import rope_cos_sin

        cos, sin = rope_cos_sin(self.model.config, pos, self.rope_dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, 1, head_dim]

    # ---------------------------------------------------------------------------------------------------
    def _next(self, logits: torch.Tensor) -> torch.Tensor:
        """Process [N, V] logits, choose, record; returns the tokens to feed next, [N]."""
        logits = logits.float()
        if self.config.repetition_penalty != 1.0 and self.seen is None:
            V = logits.shape[-1]
            seen = torch.zeros((self.N, V), dtype=torch.bool, device=self.device)
            ids = self.prompt_ids.clamp(max=V - 1)
            if self.group_size > 1:
                ids = ids.repeat_interleave(self.group_size, dim=0)
            if self.mask is not None:  # already repeated for the group by the prefill
                ids = torch.where(self.mask[:, :self.P].bool(), ids, ids[:, -1:])  # padding never counts (the last prompt token is real)
            self.seen = seen.scatter_(1, ids, True)
        logits = process_logits(logits, self.config, self.seen, self.suppress)
        tok, lp = choose_tokens(logits, self.config, self.generator, self.return_logprobs)
        tok = tok.masked_fill(self.done, self.pad)
        t = self.t
        self.tokens[:, t] = tok
        if lp is not None:
            self.logprobs[:, t] = lp.masked_fill(self.done, 0.0)
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        if self.stop_ids is not None:
            self.done |= torch.isin(tok, self.stop_ids)
        self.t = t + 1
        if self.t >= self.config.max_new_tokens:
            self.all_done = True
        elif self.stop_ids is not None and self.t % self.check_every == 0 and bool(self.done.all()):
            self.all_done = True
        return tok

    def prefill(self) -> torch.Tensor:
        mask = self.mask[:, :self.P] if self.mask is not None else None
        kwargs = dict(self.model_kwargs)
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        try:
            out = self.model(input_ids=self.prompt_ids, attention_mask=mask, past_key_values=self.cache,
                             use_cache=True, return_hidden_states=True, **kwargs)
            logits = self.head(out.hidden_states[:, -1])  # only the last position's logits
        except TypeError as e:
            if "return_hidden_states" not in str(e):
                raise
            self.hidden_path = False
            out = self.model(input_ids=self.prompt_ids, attention_mask=mask, past_key_values=self.cache,
                             use_cache=True, **kwargs)
            logits = out.logits[:, -1]
        if out.past_key_values is not None:
            self.cache = out.past_key_values
        if self.group_size > 1:
            G = self.group_size
            self.cache.repeat_interleave(G)
            logits = logits.repeat_interleave(G, dim=0)
            self.positions = self.positions.repeat_interleave(G)
            if self.mask is not None:
                self.mask = self.mask.repeat_interleave(G, dim=0)
        if self.config.static_cache or self.config.compile:
            self._init_static()
        return self._next(logits)

    def _init_static(self) -> None:
        """Move the prefilled cache into fixed-shape buffers and build the mask of written positions."""
        from llm_trainer.model.cache import StaticKVCache

        length = self.P + self.config.max_new_tokens
        if self.config.compile:
            length = 1 << (length - 1).bit_length()
            static = _STATIC_CACHES.get(self.model)
            if static is None or not static.fits(self.cache, length):
                static = StaticKVCache.like(self.cache, length)
                for t in static.keys + static.values:
                    torch._dynamo.mark_static_address(t)
                _STATIC_CACHES[self.model] = static
        else:
            static = StaticKVCache.like(self.cache, length)
        self.static, self.cache = static.load(self.cache), None
        written = torch.zeros((self.N, length), dtype=torch.bool, device=self.device)
        written[:, :self.P] = True if self.mask is None else self.mask[:, :self.P].bool()
        self.static_mask = written[:, None, None, :]  # [N, 1, 1, length]: the one query of a step sees these keys

    def step(self, last: torch.Tensor) -> torch.Tensor:
        t = self.t  # tokens already generated; `last` is token t-1, at position prompt_len + t - 1
        if self.static is not None:
            p = self.P + t - 1
            self.static.position.fill_(p)
            self.static_mask[..., p] = True
            cos, sin = self._step_rope(t)
            step = _static_step
            if self.config.compile:
                step = _compiled_static_step()
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            return self._next(step(self.model, last[:, None], self.static, cos, sin, self.static_mask))
        if self.fast and self.hidden_path:
            attn_mask = None
            if self.mask is not None:  # one new query per row: it may see every real key (its own included)
                if self.step_mask is None:
                    self.step_mask = self.mask.bool()[:, None, None, :]
                attn_mask = self.step_mask[..., :self.P + t]
            cos, sin = self._step_rope(t)
            h = self.model.decode_step(last[:, None], self.cache, cos, sin, attn_mask)
            return self._next(self.head(h[:, -1]))
        pos = (self.positions + (t - 1))[:, None]
        mask = self.mask[:, :self.P + t] if self.mask is not None else None
        if self.hidden_path:
            out = self.model(input_ids=last[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=self.cache, use_cache=True, return_hidden_states=True)
            logits = self.head(out.hidden_states[:, -1])
        else:
            out = self.model(input_ids=last[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=self.cache, use_cache=True)
            logits = out.logits[:, -1]
        if out.past_key_values is not None:
            self.cache = out.past_key_values
        return self._next(logits)

    def output(self) -> GenerationOutput:
        T, N, G = self.t, self.N, self.group_size
        tokens = self.tokens[:, :T]
        if self.stop_ids is not None:
            is_stop = torch.isin(tokens, self.stop_ids)
            finished = is_stop.any(dim=1)
            first = torch.where(finished, is_stop.int().argmax(dim=1) + 1, T)
        else:
            finished = torch.zeros(N, dtype=torch.bool, device=tokens.device)
            first = torch.full((N,), T, device=tokens.device)
        keep = torch.arange(T, device=tokens.device)[None, :] < first[:, None]
        tokens = tokens.masked_fill(~keep, self.pad)
        prompt = self.prompt_ids.repeat_interleave(G, dim=0) if G > 1 else self.prompt_ids
        if self.mask is not None:
            pmask = self.mask[:, :self.P]
        else:
            pmask = torch.ones_like(prompt)
        sequences = torch.cat([prompt, tokens], dim=1)
        attention_mask = torch.cat([pmask, keep.long()], dim=1)
        lengths = first.tolist()
        rows = tokens.tolist()
        completions = [r[:n] for r, n in zip(rows, lengths)]
        logprobs = None
        if self.logprobs is not None:
            lp = self.logprobs[:, :T].cpu()
            logprobs = [lp[i, :n].clone() for i, n in enumerate(lengths)]
        return GenerationOutput(sequences=sequences.clone(), completions=completions, logprobs=logprobs,
                                finished=[bool(x) for x in finished.tolist()],
                                attention_mask=attention_mask.clone(), prompt_length=self.P)


#: `GenerateConfig.compile`: each model's static key/value buffers, kept for the next call with the same shapes (a
#: CUDA graph captured over them stays valid); dropped with the model.
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_step(model: nn.Module, ids: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """One decoding step over a `StaticKVCache`: the next-token logits `[N, V]`; fixed shapes at every step."""
    return lm_head_logits(model, model.decode_step(ids, cache, cos, sin, mask)[:, -1])


@functools.cache
def _compiled_static_step():
    return torch.compile(_static_step, mode="reduce-overhead", dynamic=False)


class eval_mode:  # noqa: N801 - used like a function: ``with eval_mode(model): ...``
    """model.eval() inside, the previous training flags restored after (per module). The one eval-mode context of
    the package (generation, rollout scoring, reference passes, evaluation)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
        return False


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], config: GenerateConfig | None = None,
             eos_token_ids: int | Sequence[int] | None = None, pad_token_id: int | None = None, group_size: int = 1,
             return_logprobs: bool = False, generator: torch.Generator | None = None,
             pixel_values: torch.Tensor | None = None, **model_kwargs) -> GenerationOutput:
    """Generate completions for ``prompts`` (lists of token ids); see the module docstring for the semantics.

    ``eos_token_ids`` None → ``model.config.eos_token_id``; pass ``[]`` to ignore EOS. ``pad_token_id`` None →
    ``model.config.pad_token_id``, else the first stop id, else 0. ``generator`` (on the model's device) seeds
    sampling. ``pixel_values`` (and any extra ``model_kwargs`` such as ``image_counts``) go to the prefill forward
    only; prompts carry the *expanded* image tokens, one image per ``tokens_per_image`` run, images in row order
    (one per distinct prompt with ``group_size > 1``). A model whose config has an ``image_token_id`` (a VLM)
    never generates that token (it is always suppressed). The model runs in eval mode under ``torch.inference_mode``; its training flags are restored after.
    """
    config = config if config is not None else GenerateConfig()
    n_rows = len(prompts) * group_size if isinstance(prompts, Sequence) and isinstance(group_size, int) else 1
    prepack = config.max_new_tokens >= cpu_prepack.CPU_PREPACK_MIN_NEW_TOKENS and not config.compile
    with eval_mode(model), torch.inference_mode(), cpu_prepack.PrepackedLinears(model, max(1, n_rows), prepack):
        dec = _Decoder(model, prompts, config, eos_token_ids, pad_token_id, group_size, return_logprobs, generator,
                       pixel_values, model_kwargs, prepack=prepack)
        tok = dec.prefill()
        while not dec.all_done:
            tok = dec.step(tok)
        out = dec.output()
    # outputs leave inference mode as ordinary tensors (usable as inputs to autograd later)
    out.sequences = out.sequences.clone()
    out.attention_mask = out.attention_mask.clone()
    if out.logprobs is not None:
        out.logprobs = [x.clone() for x in out.logprobs]
    return out


def streaming_generate(model: nn.Module, prompt: Sequence[int], config: GenerateConfig | None = None,
                       eos_token_ids: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                       generator: torch.Generator | None = None, pixel_values: torch.Tensor | None = None,
                       **model_kwargs) -> Iterator[int]:
    """Yield the generated token ids of one prompt one at a time (the stop token, if reached, is yielded last).
    Same decoding as :func:`generate` with a batch of one; the model is in eval mode between yields and its
    training flags are restored when the iterator finishes or is closed."""
    config = config if config is not None else GenerateConfig()
    if prompt and isinstance(prompt[0], (list, tuple)):
        raise ValueError("streaming_generate takes one prompt (a list of token ids); use generate for batches")
    ctx = eval_mode(model)
    ctx.__enter__()
    try:
        with torch.inference_mode():
            dec = _Decoder(model, [prompt], config, eos_token_ids, pad_token_id, 1, False, generator,
                           pixel_values, model_kwargs, prepack=False)
            tok = dec.prefill()
        while True:
            yield int(tok[0])
            if dec.all_done or bool(dec.done[0]):
                return
            with torch.inference_mode():
                tok = dec.step(tok)
    finally:
        ctx.__exit__(None, None, None)
