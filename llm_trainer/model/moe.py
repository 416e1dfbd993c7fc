"""Sparse mixture-of-experts MLP: fp32 top-k router, optional shared expert, load-balance and z losses.

No capacity limit and no token dropping: each token's output depends only on that token, so results do not
depend on batch composition. Dispatch sorts (token, expert) assignments by expert and runs each expert once
on its contiguous slice. In training every expert is called (possibly on zero rows) so that DDP sees all
parameters used and ZeRO-3 gathers the same parameters on every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP, Linear


def router_losses(
    logits: torch.Tensor, probs: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style load-balance loss and router z-loss over real tokens.

    logits, probs: `[T, E]` (fp32); topk_idx: `[T, k]`; token_mask: `[T]` bool (None = all real).
    aux = E * sum_e f_e * P_e, with f_e the fraction of the T*k assignments sent to expert e and P_e the mean
    router probability of e (1.0 at perfect balance; HF's Qwen-MoE value is k times this).
    z = mean over tokens of logsumexp(logits)^2.
    """
    T, E = probs.shape
    k = topk_idx.shape[1]
    m = torch.ones(T, device=probs.device) if token_mask is None else token_mask.to(probs.dtype)
    n = m.sum().clamp(min=1.0)
    p_mean = (probs * m[:, None]).sum(0) / n
    counts = torch.zeros(E, device=probs.device, dtype=probs.dtype)
    counts.index_add_(0, topk_idx.reshape(-1), m.repeat_interleave(k))
    aux = E * (counts / (n * k) * p_mean).sum()
    z = (torch.logsumexp(logits, dim=-1).pow(2) * m).sum() / n
    return aux, z


class SparseMoE(nn.Module):
    """Top-k routed experts (+ optional shared expert). Parameter names follow HF Qwen2-MoE / Qwen3-MoE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        m, std, h = config.moe, config.initializer_range, config.hidden_size
        self.cfg = m
        self.gate = Linear(h, m.num_experts, init_std=std)
        self.experts = nn.ModuleList(MLP(h, m.moe_intermediate_size, std) for _ in range(m.num_experts))
        self.shared_expert = MLP(h, m.shared_size, std) if m.shared_size else None
        self.shared_expert_gate = Linear(h, 1, init_std=std) if m.shared_expert_gate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router on `[T, H]` → (logits fp32, probs fp32, top-k weights fp32, top-k expert ids); fp32 under
        autocast too (autocast would run the gate's matmul in bf16/fp16)."""
        xr = x.float()
        if self.training and self.cfg.router_jitter > 0:
            j = self.cfg.router_jitter
            xr = xr * torch.empty_like(xr).uniform_(1.0 - j, 1.0 + j)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(xr, self.gate.weight.float())
        probs = logits.softmax(dim=-1)
        weights, idx = probs.topk(self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, idx

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[B, S, H]`, token_mask `[B, S]` bool (False = padding) → (output, aux loss raw, z loss raw)."""
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        logits, probs, weights, idx = self.route(flat)
        mask = None if token_mask is None else token_mask.reshape(-1)
        aux, z = router_losses(logits, probs, idx, mask)

        k = idx.shape[1]
        flat_idx = idx.reshape(-1)
        order = flat_idx.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
        inputs = flat.index_select(0, token_of)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c or self.training:
                outs.append(self.experts[e](inputs[start:start + c]))
            start += c
        routed = torch.cat(outs).float() * weights.reshape(-1)[order, None]
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, routed)
        out = out.to(x.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.view(B, S, H), aux, z
