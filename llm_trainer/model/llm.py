"""LlmModel: decoder-only transformer whose state dict maps 1:1 onto HF Llama / Qwen2 / Qwen3 checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache, StaticKVCache
from .config import ModelConfig
from .layers import MLP, Attention, DocumentLayout, Embedding, Linear, RMSNorm, rope_cos_sin
from .moe import SparseMoE


PACKED_ATTENTION_IMPLS = ("per_document", "dense_mask")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    aux_loss: torch.Tensor
    moe_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    past_key_values: KVCache | None = None


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h)); the MLP is dense or sparse MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.moe is not None and config.moe.is_sparse_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.initializer_range)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h, cos, sin, attn_mask=None, is_causal=False, cache=None, token_mask=None, documents=None):
        """Returns (hidden, raw aux loss, raw z loss); the losses are 0-d zeros for dense layers."""
        attn = self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, is_causal, cache, documents)
        h = h + self.dropout(attn)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux, z = self.mlp(x, token_mask)
        else:
            y = self.mlp(x)
            aux = z = h.new_zeros((), dtype=torch.float32)
        return h + self.dropout(y), aux, z


class DecoderStack(nn.Module):
    """The HF `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, init_std=config.initializer_range)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every change of document id along the sequence."""
    S = document_ids.shape[1]
    idx = torch.arange(S, device=document_ids.device).expand_as(document_ids)
    start = torch.ones_like(document_ids, dtype=torch.bool)
    start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(start, idx, 0).cummax(dim=1).values


def build_attention_mask(
    q_len: int, past: int, key_mask: torch.Tensor | None, document_ids: torch.Tensor | None, device
) -> torch.Tensor:
    """Boolean `[B|1, 1, q_len, past+q_len]` mask (True = attend): causal & key not padding & same document.

    Every query may also attend to itself, so padding rows are never fully masked (no NaN from SDPA).
    """
    q_pos = torch.arange(past, past + q_len, device=device)[:, None]
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    if document_ids is not None:
        same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
        mask = mask & same & (document_ids >= 0)[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


def prepare_attention(B, S, past, attention_mask, position_ids, document_ids, device, per_document=True):
    """Resolve (position_ids, boolean attention mask or None, is_causal, key padding mask or None,
    `DocumentLayout` or None).

    SDPA's `is_causal` fast path is used without padding/documents on a fresh sequence, and also for pure right
    padding (a real token never sees the padding after it); a single new token over a padding-free cache needs
    no mask at all. Packed batches (`document_ids`) attend per document through a `DocumentLayout` when
    `per_document` (positions with attention_mask 0 count as padding, id −1), unless documents are not
    contiguous. Otherwise one `[B, 1, S, past+S]` boolean mask is built and shared by all layers.
    """
    key_mask = None
    if attention_mask is not None:
        if attention_mask.shape != (B, past + S):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + seq) = "
                f"({B}, {past + S})"
            )
        key_mask = attention_mask.to(device=device, dtype=torch.bool)
        if bool(key_mask.all()):
            key_mask = None

    if position_ids is None:
        if document_ids is not None:
            position_ids = document_positions(document_ids).clamp(min=0)
        elif key_mask is not None:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        else:
            position_ids = torch.arange(past, past + S, device=device).expand(B, S)

    attn_mask, is_causal, documents = None, False, None
    if document_ids is not None and per_document:
        real_ids = document_ids if key_mask is None else torch.where(key_mask[:, past:], document_ids, -1)
        documents = DocumentLayout.from_document_ids(real_ids)
        if documents is not None:
            return position_ids, None, False, key_mask, documents
    # Right padding needs no mask: causal attention never lets a real token see the padding after it.
    right_padded = key_mask is not None and past == 0 and bool((key_mask[:, 1:] <= key_mask[:, :-1]).all())
    if (key_mask is None or right_padded) and document_ids is None:
        is_causal = past == 0 and S > 1
        if past and S > 1:
            attn_mask = build_attention_mask(S, past, None, None, device)
    else:
        attn_mask = build_attention_mask(S, past, key_mask, document_ids, device)
    return position_ids, attn_mask, is_causal, key_mask, documents


class LlmModel(nn.Module):
    """Decoder-only LLM. Parameter names: model.embed_tokens, model.layers.N.{self_attn,mlp,...}, model.norm,
    lm_head (absent when embeddings are tied, so the state dict matches HF tied checkpoints 1:1).

    Weights are initialised normal(0, initializer_range) by each leaf module as it is built (see `layers`), so
    construction under DeepSpeed `zero.Init` keeps the custom init. With tied embeddings the output projection
    reuses `embed_tokens.weight` outside that module's forward; under ZeRO-3 the backend must register it as an
    external parameter of the model (untied heads go through `lm_head`'s own forward).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, init_std=config.initializer_range)
        self._checkpointed: set[int] = set()
        #: How packed batches (`document_ids`) attend: "per_document" (default; memory linear in the sequence
        #: length, see `DocumentLayout`) or "dense_mask" (one boolean [B, 1, S, S] mask); see `set_packed_attention`.
        self.packed_attention = "per_document"

    # ------------------------------------------------------------------ helpers
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def lm_head_weight(self) -> torch.Tensor:
        """Output projection weight `[V, H]` (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self) -> None:
        """Re-initialise every parameter (each module's own `reset_parameters`)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def set_gradient_checkpointing(self, enabled: bool = True, layers: Iterable[int] | slice | None = None) -> None:
        """Recompute the activations of the selected blocks in backward instead of keeping them (not applied while
        a KV cache is in use). `layers`: None = every block; a `slice` (e.g. `slice(None, None, 2)` = every other
        block, `slice(0, 4)` = the first four); or block indices (negative ones count from the end).
        `enabled=False` turns the selected blocks back off; other blocks keep their setting."""
        n = len(self.model.layers)
        if layers is None:
            idx = set(range(n))
        elif isinstance(layers, slice):
            idx = set(range(n)[layers])
        else:
            idx = set()
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                    raise ValueError(f"set_gradient_checkpointing: layer index {i!r} is not an int in [-{n}, {n})"
                                     f" (the model has {n} blocks)")
                idx.add(i % n)
        self._checkpointed = self._checkpointed | idx if enabled else self._checkpointed - idx

    def set_packed_attention(self, impl: str) -> None:
        """How packed batches attend: "per_document" (default: per-document causal SDPA, no S×S mask) or
        "dense_mask" (one boolean [B, 1, S, S] mask; memory quadratic in S). Both give the same outputs."""
        if impl not in PACKED_ATTENTION_IMPLS:
            raise ValueError(f"packed attention must be one of {PACKED_ATTENTION_IMPLS}, got {impl!r}")
        self.packed_attention = impl

    def num_parameters(self, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (ZeRO-3 aware via `ds_numel`); `exclude_embeddings` drops the input embedding."""
        skip = {id(self.model.embed_tokens.weight)} if exclude_embeddings else set()
        return sum(
            getattr(p, "ds_numel", p.numel())
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not trainable_only)
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM appendix B: 6·N + 12·L·heads·head_dim·seq_len.

        N counts active matmul parameters: everything except the input embedding (the output projection is
        counted even when tied) and, for MoE layers, only k of the E routed experts.
        """
        c = self.config
        n = self.num_parameters(exclude_embeddings=True)
        if self.lm_head is None:
            n += c.vocab_size * c.hidden_size
        if c.moe is not None:
            per_expert = 3 * c.hidden_size * c.moe.moe_intermediate_size
            inactive = (c.moe.num_experts - c.moe.num_experts_per_tok) * per_expert
            n -= inactive * sum(1 for layer in self.model.layers if layer.is_moe)
        attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return float(6 * n + attn)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_hidden_states: bool = False,
    ) -> ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            self._check_ids(input_ids)
            inputs_embeds = self.model.embed_tokens(input_ids)
        h = inputs_embeds
        B, S = h.shape[:2]
        device = h.device
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache()
        past = cache.get_seq_length() if cache is not None else 0
        if document_ids is not None and past:
            raise ValueError("document_ids (packing) cannot be combined with a non-empty past_key_values cache")

        position_ids, attn_mask, is_causal, key_mask, documents = prepare_attention(
            B, S, past, attention_mask, position_ids, document_ids, device, self.packed_attention == "per_document"
        )
        cos, sin = rope_cos_sin(self.config, position_ids.to(device), h.dtype)

        token_mask = None
        if self.config.moe is not None:
            if key_mask is not None:
                token_mask = key_mask[:, past:]
            if document_ids is not None:
                real = document_ids >= 0
                token_mask = real if token_mask is None else token_mask & real

        aux = h.new_zeros((), dtype=torch.float32)
        z = h.new_zeros((), dtype=torch.float32)
        weighted = h.new_zeros((), dtype=torch.float32)
        use_ckpt = self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            args = (h, cos, sin, attn_mask, is_causal, cache, token_mask, documents)
            if use_ckpt and i in self._checkpointed:
                h, layer_aux, layer_z = checkpoint(layer, *args, use_reentrant=False)
            else:
                h, layer_aux, layer_z = layer(*args)
            if layer.is_moe:
                aux, z = aux + layer_aux, z + layer_z
                weighted = weighted + self.config.moe.aux_loss_coef * layer_aux + self.config.moe.z_loss_coef * layer_z

        h = self.model.norm(h)
        logits = None
        if not return_hidden_states:  # go through the module when untied so ZeRO-3 hooks gather lm_head
            logits = self.lm_head(h) if self.lm_head is not None else nn.functional.linear(h, self.lm_head_weight())
        metrics = {}
        if self.config.moe is not None:
            metrics = {"moe_aux_loss": aux.detach(), "moe_z_loss": z.detach()}
        return ModelOutput(logits=logits, hidden_states=h, aux_loss=weighted, moe_metrics=metrics,
                           past_key_values=cache)

    @torch.no_grad()
    def decode_step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | StaticKVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One incremental decoding step for `llm_trainer.generation` (eval mode, no autograd): the final hidden
        states `[B, S, H]` (normed, before the output projection) of `input_ids` `[B, S]` appended to `cache`.

        The caller has already resolved what `forward` would: `cos`/`sin` (`[B|1, S, head_dim]`, or
        `[B|1, 1, S, head_dim]`) for the new positions, and `attn_mask` — boolean `[B, 1, S, past+S]` (True =
        attend), or None when every query may see every cached key (one new token over an unpadded cache). The ids
        are trusted (no vocabulary range check: they come from the model's own output projection). Same numerics
        as `forward`; MoE layers route without a token mask (at inference, outputs do not depend on it).
        `cache` may also be a `StaticKVCache` (one token per step, with an `attn_mask` over all its positions).
        """
        if self.training:
            raise RuntimeError("decode_step is for inference; call model.eval() first")
        h = self.model.embed_tokens(input_ids)
        S = input_ids.shape[1]
        is_causal = False
        if attn_mask is None and S > 1:
            past = cache.get_seq_length()
            is_causal = past == 0
            if past:
                attn_mask = build_attention_mask(S, past, None, None, h.device)
        for layer in self.model.layers:
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, attn_mask, is_causal, cache)
            x = layer.post_attention_layernorm(h)
            h = h + (layer.mlp(x)[0] if layer.is_moe else layer.mlp(x))
        return self.model.norm(h)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        V = self.config.vocab_size
        bad = (input_ids >= V) | (input_ids < 0)
        if bool(bad.any()):
            token = int(input_ids[bad][0])
            raise ValueError(f"token id {token} is out of range for vocab_size {V}")

    # ------------------------------------------------------------------ HF folders
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> LlmModel:
        """Load a HF-format folder (config.json + safetensors; see `llm_trainer.model.hf`): built on the meta device
        (no random init), allocated on CPU in ``dtype`` (default: torch's default dtype), weights loaded; returned
        in eval mode, like HF."""
        from .hf import load_hf_state_dict, read_config

        with torch.device("meta"):
            model = cls(read_config(path))
        model = model.to(dtype or torch.get_default_dtype()).to_empty(device="cpu")
        load_hf_state_dict(model, path)
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write a HF-format folder atomically; see `llm_trainer.model.hf`."""
        from .hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
