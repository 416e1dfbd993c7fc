"""Building blocks: RMSNorm, initialised Linear/Embedding, RoPE, SwiGLU MLP, grouped-query attention, and the
per-document attention of packed batches (`DocumentLayout`: memory linear in the sequence length, no S×S mask).

Initialisation lives in each leaf module's `reset_parameters`, which runs inside that module's own `__init__`.
This matters under DeepSpeed `zero.Init`: parameters are partitioned as soon as the module that owns them is
built, so a parent-level init pass afterwards would write into empty placeholders and be silently lost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RoPEScalingConfig

if TYPE_CHECKING:
    from .cache import KVCache

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class Linear(nn.Linear):
    """`nn.Linear` initialised with normal(0, init_std) weights and zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, init_std: float = 0.02, **kw):
        self.init_std = init_std  # read by reset_parameters(), which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias, **kw)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """`nn.Embedding` initialised with normal(0, init_std)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02, **kw):
        self.init_std = init_std
        super().__init__(num_embeddings, embedding_dim, **kw)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight multiplies the result cast back to the input dtype (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # same computation, minus two no-op casts (per-token decoding overhead)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, `[head_dim/2]`) and the cos/sin attention factor for sequences of `seq_len`."""
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    sc: RoPEScalingConfig | None = config.rope_scaling
    if sc is None:
        return 1.0 / base**exponents, 1.0
    if sc.rope_type == "linear":
        return 1.0 / base**exponents / sc.factor, 1.0
    if sc.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len, max_pos)
        base = base * ((sc.factor * seq_len / max_pos) - (sc.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    original = sc.original_max_position_embeddings or config.max_position_embeddings
    inv_freq = 1.0 / base**exponents
    if sc.rope_type == "llama3":
        low_wavelen = original / sc.low_freq_factor
        high_wavelen = original / sc.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
        smooth = (original / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = sc.attention_factor
    if attention_factor is None:
        if sc.mscale and sc.mscale_all_dim:
            attention_factor = mscale(sc.factor, sc.mscale) / mscale(sc.factor, sc.mscale_all_dim)
        else:
            attention_factor = mscale(sc.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(sc.beta_fast), correction_dim(sc.beta_slow)
    if sc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / sc.factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    config: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, S, head_dim]` for `position_ids` `[B, S]`, computed in fp32 with autocast off."""
    seq_len = int(position_ids.max()) + 1 if (config.rope_scaling and config.rope_scaling.rope_type == "dynamic") else 0
    inv_freq, scale = rope_inv_freq(config, seq_len, device=position_ids.device)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, heads, S, D]` by cos/sin `[B, S, D]` (or already `[B, 1, S, D]`)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float = 0.02):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, init_std=init_std)
        self.up_proj = Linear(hidden_size, intermediate_size, init_std=init_std)
        self.down_proj = Linear(intermediate_size, hidden_size, init_std=init_std)

        #: Inference hook set by `llm_trainer.generation` for the duration of one `generate` call (None otherwise):
        #: a callable x -> concatenated [gate | up] projections, computed by one fused matmul.
        self.fused_gate_up = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self, "fused_gate_up", None)
        if fused is not None:
            gate, up = fused(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Grouped-query attention over `F.scaled_dot_product_attention`, optional qkv bias and per-head qk-norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c, std = config, config.initializer_range
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.dropout = c.attention_dropout
        self.q_proj = Linear(c.hidden_size, self.num_heads * self.head_dim, bias=c.attention_bias, init_std=std)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias, init_std=std)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias, init_std=std)
        self.o_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, init_std=std)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        #: Inference hook set by `llm_trainer.generation` for the duration of one `generate` call (None otherwise):
        #: a callable x -> concatenated [q | k | v] projections (biases included), computed by one fused matmul.
        self.fused_qkv = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        documents: DocumentLayout | None = None,
    ) -> torch.Tensor:
        """`attn_mask` is boolean `[B, 1, S, K]` (True = attend) or None; `is_causal` is used only without a mask.
        `documents` (packed batches, no cache): attend within each document instead (`attn_mask` is then None)."""
        B, S, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        fused = getattr(self, "fused_qkv", None)
        if fused is not None and self.q_norm is None:
            qkv = fused(x).view(B, S, H + 2 * KV, D).transpose(1, 2)
            qk = apply_rope(qkv[:, :H + KV], cos, sin)  # q and k heads rotated together (elementwise: same values)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        else:
            if fused is not None:
                q, k, v = fused(x).split([H * D, KV * D, KV * D], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k = q.view(B, S, H, D), k.view(B, S, KV, D)
            v = v.view(B, S, KV, D).transpose(1, 2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)
            k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        kwargs = {}
        if self.num_kv_heads != self.num_heads:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                rep = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if documents is not None:
            return self.o_proj(documents.attend(q, k, v, dropout_p, **kwargs))
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=is_causal and attn_mask is None,
            dropout_p=dropout_p,
            **kwargs,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


# ---------------------------------------------------------------------------------------------------- packing
def _bucket_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Round each length up to a quarter-octave step (L in (2^(k-1), 2^k] → a multiple of 2^(k-3)): at most
    four buckets per power of two, at most 25 % padding per document."""
    bits = torch.where(lengths > 1, torch.floor(torch.log2((lengths - 1).double())).long() + 1, 0)
    step = torch.ones_like(lengths) << (bits - 3).clamp(min=0)
    return (lengths + step - 1) // step * step


@dataclass
class DocumentLayout:
    """Where the documents of a packed batch lie, so that attention runs per document without an S×S mask.

    A document is a maximal run of one id ≥ 0 within a row; every padding token (id −1) is a document of its own
    (it attends to itself only, as with the dense mask). Documents are grouped into buckets of similar length
    (`_bucket_lengths`); each bucket is one causal SDPA call over `[n, heads, L, head_dim]`, every document
    right-padded to `L` — causal attention never lets a real token see the padding after it, so no mask is
    needed, SDPA can use its flash kernels, and memory stays linear in the number of tokens.

    `gather[i]` `[n_i, L_i]`: indices into the flattened `[B*S]` tokens (padding slots repeat the document's last
    token; their outputs are dropped). `scatter` `[B*S]`: each token's row in the bucket outputs, concatenated.
    Built once per forward and shared by all layers.
    """

    gather: list[torch.Tensor]
    scatter: torch.Tensor

    @classmethod
    def from_document_ids(cls, document_ids: torch.Tensor) -> DocumentLayout | None:
        """The layout of `document_ids` `[B, S]`, or None when an id recurs after another document within a row
        (non-contiguous documents; the dense mask handles those)."""
        B, S = document_ids.shape
        ids = document_ids.reshape(-1)
        new = torch.ones_like(document_ids, dtype=torch.bool)
        new[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]) | (document_ids[:, 1:] < 0)
        starts = new.reshape(-1).nonzero().squeeze(1)
        run_ids = ids[starts]
        real = run_ids >= 0
        keys = (starts[real] // S) * (int(run_ids.max()) + 1) + run_ids[real]  # (row, id) of every real run
        if torch.unique(keys).numel() != keys.numel():
            return None
        lengths = torch.diff(starts, append=starts.new_tensor([B * S]))
        buckets = _bucket_lengths(lengths)
        gather, scatter, offset = [], torch.empty_like(ids), 0
        for L in torch.unique(buckets).tolist():
            sel = (buckets == L).nonzero().squeeze(1)
            first, n = starts[sel][:, None], lengths[sel][:, None]
            pos = torch.arange(L, device=ids.device)[None, :]
            index = first + torch.minimum(pos, n - 1)
            inside = pos < n
            rows = offset + torch.arange(sel.numel() * L, device=ids.device).view(-1, L)
            scatter[index[inside]] = rows[inside]
            gather.append(index)
            offset += sel.numel() * L
        return cls(gather, scatter)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               **sdpa_kwargs) -> torch.Tensor:
        """Causal attention within each document: q `[B, H, S, D]`, k/v `[B, KV, S, D]` → `[B, S, H*D]`."""
        B, H, S, D = q.shape
        flat = [t.transpose(1, 2).reshape(B * S, t.shape[1], D) for t in (q, k, v)]
        outs = []
        for index in self.gather:
            n, L = index.shape
            qb, kb, vb = (t.index_select(0, index.reshape(-1)).view(n, L, -1, D).transpose(1, 2) for t in flat)
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, dropout_p=dropout_p, **sdpa_kwargs)
            outs.append(out.transpose(1, 2).reshape(n * L, H, D))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.index_select(0, self.scatter).view(B, S, H * D)
