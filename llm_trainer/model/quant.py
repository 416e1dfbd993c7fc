"""Quantized frozen base weights under LoRA adapters (QLoRA: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs"): y = dequant(W_q) x + b + (alpha / r) · B A x, the adapters in full precision.

Storage formats (NF4 kernels from ``bitsandbytes``, the optional extra ``llm_trainer[quant]``, chosen by measurement
on CPU, see ``docs/benchmarks.md``):

* ``"nf4"`` — 4-bit NormalFloat (QLoRA §3) in blocks of 64 values, one fp32 absmax per block: 4.5 bits per weight,
  0.28× the bytes of bf16. (QLoRA's "double quantization" of the absmax is not used: it would save 0.37 bit per
  weight but makes re-quantizing a dequantized weight inexact, and we rely on that being exact, see below.)
* ``"int8"`` — symmetric per-output-row absmax int8 (the weight format of LLM.int8, Dettmers et al. 2022, and of
  bitsandbytes' ``Int8Params``: codes round(127·w/absmax) and the row absmax), without the outlier decomposition
  of activations: 8 bits + one fp32 per row, 0.5× bf16. Plain torch ops (bitsandbytes' CPU int8 matmul was no
  faster than dequantize + fp32 matmul here, and it first rounds the weight to fp16).

:func:`quantize_base` replaces every frozen linear layer of the decoder (``LoRALinear`` → :class:`QuantLoRALinear`,
plain ``nn.Linear`` → :class:`QuantLinear`; never ``lm_head`` or MoE routers, whose weights are read directly)
one layer at a time. Forward and backward dequantize the weight on the fly (:class:`_DequantLinear` saves no
dequantized copy for backward: the weight is dequantized again there), under autocast in the autocast dtype.

The modules keep the state-dict contract of ``nn.Linear``: ``state_dict()`` holds ``<name>.weight`` dequantized in
the model's float dtype, and ``load_state_dict`` re-quantizes it. Quantizing a dequantized weight gives back the same
codes and scales exactly (each block's absmax element is stored as ±1.0 · absmax), so checkpoint → resume is
lossless and a trainer's HF export (state dict + LoRA merge) produces the full-precision merged model with no
special case. :func:`dequantize_base` turns the modules back into ``LoRALinear`` / ``nn.Linear`` with full-precision
weights (then ``merge_lora`` / ``remove_lora`` / ``save_pretrained`` as usual).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear, is_router

__all__ = ["QUANT_TYPES", "QuantLinear", "QuantLoRALinear", "quantize_base", "dequantize_base",
           "quantized_weight_nbytes", "require_bitsandbytes"]

QUANT_TYPES = ("nf4", "int8")
NF4_BLOCKSIZE = 64


def require_bitsandbytes():
    """``bitsandbytes.functional``, or an ImportError saying how to install the optional extra."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ImportError("quantized LoRA bases need bitsandbytes: pip install 'llm_trainer[quant]' "
                          f"(import failed: {e})") from e
    return bnbf


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize_base: the quantization type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _quantize(w: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 scales) of a 2-D weight."""
    w = w.detach()
    if quant_type == "nf4":
        bnbf = require_bitsandbytes()
        codes, state = bnbf.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                          compress_statistics=False)
        return codes, state.absmax.float()
    w = w.float()
    absmax = w.abs().amax(dim=1)
    codes = torch.round(w * (127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None])
    return codes.clamp_(-127, 127).to(torch.int8), absmax


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, quant_type: str, shape: torch.Size,
                dtype: torch.dtype) -> torch.Tensor:
    if quant_type == "nf4":
        bnbf = require_bitsandbytes()
        state = bnbf.QuantState(absmax=absmax, shape=shape, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                code=bnbf.get_4bit_type("nf4", device=codes.device), dtype=dtype)
        return bnbf.dequantize_4bit(codes, state)
    # (q / 127) · absmax: the ±127 codes give back exactly ±absmax, so re-quantizing is exact
    return codes.float().div_(127.0).mul_(absmax[:, None]).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """``F.linear(x, dequant(W), b)`` for a frozen quantized W that keeps only the codes alive for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "_QuantizedWeight", bias: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        ctx.module, ctx.x_dtype, ctx.dtype = module, x.dtype, dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), module.dequantized(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ ctx.module.dequantized(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class _QuantizedWeight:
    """Mixin for an ``nn.Module`` whose frozen ``weight`` is stored quantized (buffers ``weight_codes`` and
    ``weight_absmax``, not in the state dict) and read back dequantized through the ``weight`` property."""

    quant_type: str

    def _store_quantized(self, weight: torch.Tensor, quant_type: str) -> None:
        _check_quant_type(quant_type)
        if hasattr(weight, "ds_id"):
            raise ValueError("cannot quantize a ZeRO-3 partitioned weight: QLoRA runs on one process or DDP")
        if weight.dim() != 2:
            raise ValueError(f"can only quantize 2-D weights, got shape {tuple(weight.shape)}")
        self.quant_type = quant_type
        self.weight_shape = weight.shape
        self.compute_dtype = weight.dtype
        codes, absmax = _quantize(weight, quant_type)
        self.register_buffer("weight_codes", codes, persistent=False)
        # fp32 scales are kept as their int32 bit pattern so that `model.to(torch.bfloat16)` cannot round them
        self.register_buffer("weight_absmax", absmax.view(torch.int32), persistent=False)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (default: the model's float dtype), without autograd history."""
        with torch.no_grad():
            return _dequantize(self.weight_codes, self.weight_absmax.view(torch.float32), self.quant_type,
                               self.weight_shape, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self, self.bias)

    def quantized_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_codes, self.weight_absmax))

    # state dict: `<prefix>weight` dequantized (the nn.Linear contract); loading re-quantizes
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dequantized()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != tuple(self.weight_shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the "
                                  f"quantized weight has shape {tuple(self.weight_shape)}")
            else:
                codes, absmax = _quantize(w.to(device=self.weight_codes.device, dtype=self.compute_dtype),
                                          self.quant_type)
                self.weight_codes.copy_(codes)
                self.weight_absmax.copy_(absmax.view(torch.int32))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # follow `.to(dtype)` / `.half()` of the model: dequantize into its new float dtype
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)


class QuantLinear(_QuantizedWeight, nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in ``quant_type`` (``"nf4"`` or ``"int8"``)."""

    def __init__(self, linear: nn.Linear, quant_type: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._store_quantized(linear.weight, quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (frozen, as here)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.dequantized(), requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}")


class QuantLoRALinear(_QuantizedWeight, LoRALinear):
    """``LoRALinear`` over a quantized frozen weight: the adapters (``lora_A``/``lora_B``) stay in full precision.
    Built from an existing ``LoRALinear`` (its adapters, trained or not, are kept). Cannot be merged in place (the
    merged weight would be re-quantized); use :func:`dequantize_base` first, or export through the state dict."""

    def __init__(self, lora: LoRALinear, quant_type: str):
        if lora.merged:
            raise ValueError("unmerge the LoRA adapters before quantizing the base weight")
        nn.Module.__init__(self)
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.bias = lora.bias
        self.r, self.alpha, self.scaling = lora.r, lora.alpha, lora.scaling
        self.lora_dropout, self.lora_A, self.lora_B = lora.lora_dropout, lora.lora_A, lora.lora_B
        self.merged, self.disabled = False, lora.disabled
        self._store_quantized(lora.weight, quant_type)

    def merge(self) -> None:
        raise ValueError("cannot merge LoRA into a quantized base weight in place; call "
                         "llm_trainer.model.quant.dequantize_base(model) first")

    def to_lora(self) -> LoRALinear:
        """The same adapter over a full-precision (dequantized) ``nn.Linear``."""
        base = QuantLinear.to_linear(self)
        out = LoRALinear(base, self.r, self.alpha)
        out.lora_dropout, out.lora_A, out.lora_B, out.disabled = (self.lora_dropout, self.lora_A, self.lora_B,
                                                                  self.disabled)
        return out

    def to_linear(self, merge: bool = True) -> nn.Linear:
        return self.to_lora().to_linear(merge)

    def extra_repr(self) -> str:
        return f"{LoRALinear.extra_repr(self)}, quant_type={self.quant_type}"


def _replace_children(model: nn.Module, convert) -> int:
    """Replace each child ``c`` of every module by ``convert(parent, name, c)`` when that is not None."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(parent, name, child)
            if new is not None:
                setattr(parent, name, new)
                n += 1
    return n


@torch.no_grad()
def quantize_base(model: nn.Module, quant_type: str = "nf4") -> nn.Module:
    """Store every frozen linear weight of ``model`` in ``quant_type`` (``"nf4"`` or ``"int8"``), in place, one
    layer at a time: ``LoRALinear`` → :class:`QuantLoRALinear`, a frozen ``nn.Linear`` → :class:`QuantLinear`.
    ``lm_head``, MoE routers and trainable linears are left alone. Returns ``model``."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        require_bitsandbytes()

    def convert(parent, name, child):
        if isinstance(child, _QuantizedWeight) or name == "lm_head" or is_router(parent, name):
            return None
        if isinstance(child, LoRALinear):
            return QuantLoRALinear(child, quant_type)
        if isinstance(child, nn.Linear) and not child.weight.requires_grad:
            return QuantLinear(child, quant_type)
        return None

    if _replace_children(model, convert) == 0:
        raise ValueError("quantize_base found no frozen linear layer to quantize (apply LoRA first, or freeze)")
    return model


@torch.no_grad()
def dequantize_base(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_base` in place: full-precision weights (the dequantized values), adapters kept."""
    def convert(parent, name, child):
        if isinstance(child, QuantLoRALinear):
            return child.to_lora()
        if isinstance(child, QuantLinear):
            return child.to_linear()
        return None

    _replace_children(model, convert)
    return model


def quantized_weight_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized weights' storage, number of weights they hold) over the model's quantized layers."""
    mods = [m for m in model.modules() if isinstance(m, _QuantizedWeight)]
    return sum(m.quantized_nbytes() for m in mods), sum(m.weight_shape.numel() for m in mods)
