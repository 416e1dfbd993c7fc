"""Model configuration: `ModelConfig`, `RoPEScalingConfig`, `MoEConfig`, and the HF `config.json` mapping."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")

# architecture -> (HF model_type, HF class) for dense and MoE variants; None = no HF equivalent.
_HF_NAMES = {
    ("llama", False): ("llama", "LlamaForCausalLM"),
    ("qwen2", False): ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", False): ("qwen3", "Qwen3ForCausalLM"),
    ("qwen2", True): ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3", True): ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
_FROM_MODEL_TYPE = {mt: (arch, moe) for (arch, moe), (mt, _) in _HF_NAMES.items()}
# Our own HF-style model_type for combinations HF has no class for (e.g. llama + MoE).
OWN_MODEL_TYPE = "llm_trainer"


def swiglu_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    """LLaMA-style SwiGLU width: 2/3 of 4h rounded up to `multiple_of` (same parameter count as a 4h GELU MLP)."""
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


def _positive_int(obj: Any, name: str, allow_none: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _probability(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{type(obj).__name__}.{name} must be in [0, 1), got {value!r}")


@dataclass(kw_only=True)
class RoPEScalingConfig:
    """RoPE context extension; the maths follows HF's `ROPE_INIT_FUNCTIONS` of the same name.

    linear: positions / factor. dynamic: NTK base rescaling once a sequence exceeds `max_position_embeddings`
    (computed per forward from the largest position, i.e. stateless). yarn: NTK-by-parts + attention factor.
    llama3: Llama 3.1 wavelength-dependent scaling.
    """

    rope_type: str = "linear"
    factor: float = 2.0
    original_max_position_embeddings: int | None = None  # yarn/llama3; None -> model max_position_embeddings
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn; None -> derived from factor/mscale
    truncate: bool = True  # yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPEScalingConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"RoPEScalingConfig.factor must be >= 1, got {self.factor!r}")
        _positive_int(self, "original_max_position_embeddings", allow_none=True)
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("RoPEScalingConfig.high_freq_factor must be > low_freq_factor for llama3 scaling")

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type in ("yarn", "llama3") and self.original_max_position_embeddings is not None:
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "yarn":
            d.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            for key in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, key) is not None:
                    d[key] = getattr(self, key)
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any] | None) -> RoPEScalingConfig | None:
        """Parse HF `rope_scaling` / `rope_parameters`; returns None for plain (default) RoPE."""
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {ROPE_TYPES}")
        known = {f.name for f in fields(cls)} - {"rope_type"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(rope_type=rope_type, **kwargs)


@dataclass(kw_only=True)
class MoEConfig:
    """Sparse mixture-of-experts MLP settings.

    A layer `i` is sparse when `i >= first_k_dense` and `(i + 1) % layer_freq == 0` (HF `mlp_only_layers` /
    `decoder_sparse_step`). No capacity limit: every token always reaches its top-k experts.
    """

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    n_shared_experts: int = 0
    shared_intermediate_size: int | None = None  # None -> n_shared_experts * moe_intermediate_size
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(Linear(h -> 1))
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    first_k_dense: int = 0
    layer_freq: int = 1
    router_jitter: float = 0.0  # multiplicative uniform noise on the router input, training only

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "layer_freq"):
            _positive_int(self, name)
        _positive_int(self, "shared_intermediate_size", allow_none=True)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"MoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts ({self.num_experts})"
            )
        for name in ("n_shared_experts", "first_k_dense"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        _probability(self, "router_jitter")
        if self.n_shared_experts == 0:
            self.shared_intermediate_size = None
        elif self.shared_intermediate_size is None:
            self.shared_intermediate_size = self.n_shared_experts * self.moe_intermediate_size
        if self.shared_expert_gate and self.shared_size == 0:
            raise ValueError("MoEConfig.shared_expert_gate needs shared experts (n_shared_experts > 0)")

    @property
    def shared_size(self) -> int:
        """Intermediate width of the (merged) shared expert MLP; 0 when there is none."""
        return self.shared_intermediate_size or 0

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense and (layer_idx + 1) % self.layer_freq == 0


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (Llama / Qwen2 / Qwen3 families, optional MoE).

    `architecture` fixes the HF family: 'qwen2' means qkv bias, 'qwen3' means qk-norm, 'llama' neither by
    default; other combinations are allowed and saved in our own HF-style format.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int | None = None  # None -> swiglu_intermediate_size(hidden_size)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None -> num_attention_heads
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RoPEScalingConfig | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    use_qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    moe: MoEConfig | None = None
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RoPEScalingConfig(**self.rope_scaling)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _positive_int(self, name)
        for name in ("intermediate_size", "num_key_value_heads", "head_dim"):
            _positive_int(self, name, allow_none=True)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not set"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_intermediate_size(self.hidden_size)
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"ModelConfig.initializer_range must be > 0, got {self.initializer_range!r}")
        _probability(self, "attention_dropout")
        _probability(self, "hidden_dropout")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig.{name} ({value}) must be in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ HF config.json mapping
    @property
    def hf_names(self) -> tuple[str, str]:
        """(model_type, architectures[0]) used in config.json."""
        exact = self._hf_exact()
        if exact:
            return _HF_NAMES[(self.architecture, self.moe is not None)]
        return OWN_MODEL_TYPE, "LlmTrainerForCausalLM"

    def _hf_exact(self) -> bool:
        """True when HF transformers has a class computing exactly this model."""
        key = (self.architecture, self.moe is not None)
        if key not in _HF_NAMES:
            return False
        want_bias, want_qk = self.architecture == "qwen2", self.architecture == "qwen3"
        if self.attention_bias != want_bias or self.use_qk_norm != want_qk:
            return False
        if self.moe is not None:
            m = self.moe
            if self.architecture == "qwen3" and m.n_shared_experts:
                return False
            if self.architecture == "qwen2" and not (m.n_shared_experts and m.shared_expert_gate):
                return False
        return True

    def to_hf_dict(self) -> dict[str, Any]:
        """`config.json` content. Exact HF families use HF keys; other combinations add an `llm_trainer` block."""
        model_type, arch_cls = self.hf_names
        d: dict[str, Any] = {
            "architectures": [arch_cls],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf_dict() if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.architecture == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        if self.architecture == "qwen3":
            d["attention_bias"] = False
        if self.architecture == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None)
        if self.moe is not None:
            m = self.moe
            d.update(
                num_experts=m.num_experts,
                num_experts_per_tok=m.num_experts_per_tok,
                moe_intermediate_size=m.moe_intermediate_size,
                norm_topk_prob=m.norm_topk_prob,
                decoder_sparse_step=m.layer_freq,
                mlp_only_layers=list(range(m.first_k_dense)),
                router_aux_loss_coef=m.aux_loss_coef,
                output_router_logits=False,
            )
            if self.architecture == "qwen2":
                d.update(shared_expert_intermediate_size=m.shared_size, qkv_bias=True)
            else:
                d["num_local_experts"] = m.num_experts  # transformers>=5 name for qwen3_moe
        if not self._hf_exact():
            own = {k: getattr(self, k) for k in ("architecture", "attention_bias", "use_qk_norm", "hidden_dropout")}
            own["moe"] = asdict(self.moe) if self.moe else None
            d["llm_trainer"] = own
        elif self.hidden_dropout:
            d["llm_trainer"] = {"hidden_dropout": self.hidden_dropout}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse a HF `config.json` dict (llama, qwen2, qwen3, qwen2_moe, qwen3_moe, or ours)."""
        model_type = d.get("model_type")
        own = d.get("llm_trainer") or {}
        if model_type == OWN_MODEL_TYPE:
            if "architecture" not in own:
                raise ValueError("config.json with model_type 'llm_trainer' lacks its 'llm_trainer' block")
            architecture, has_moe = own["architecture"], own.get("moe") is not None
        elif model_type in _FROM_MODEL_TYPE:
            architecture, has_moe = _FROM_MODEL_TYPE[model_type]
        else:
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} architectures={d.get('architectures')}; "
                f"supported model_type values: {sorted(_FROM_MODEL_TYPE) + [OWN_MODEL_TYPE]}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only 'silu' / SwiGLU)")
        if d.get("mlp_bias"):
            raise ValueError("unsupported config: mlp_bias=true")
        if d.get("use_sliding_window"):
            raise ValueError("unsupported config: use_sliding_window=true (sliding-window attention)")
        if architecture in ("llama", "qwen3") and d.get("attention_bias") and "attention_bias" not in own:
            raise ValueError(f"unsupported config: attention_bias=true for {model_type} (bias on o_proj)")
        # Rope: legacy `rope_theta` + `rope_scaling`, or transformers>=5 `rope_parameters`.
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = RoPEScalingConfig.from_hf_dict(d.get("rope_scaling") or rope_params)

        moe = None
        if own.get("moe"):
            moe = MoEConfig(**own["moe"])
        elif has_moe:
            only = list(d.get("mlp_only_layers") or [])
            if only != list(range(len(only))):
                raise ValueError(f"unsupported mlp_only_layers={only}: only a prefix of dense layers is supported")
            shared = (d.get("shared_expert_intermediate_size") or 0) if architecture == "qwen2" else 0
            moe = MoEConfig(
                num_experts=d.get("num_experts", d.get("num_local_experts")),
                num_experts_per_tok=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"],
                n_shared_experts=1 if shared else 0,
                shared_intermediate_size=shared or None,
                shared_expert_gate=bool(shared),
                norm_topk_prob=d.get("norm_topk_prob", architecture == "qwen3"),
                aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
                first_k_dense=len(only),
                layer_freq=d.get("decoder_sparse_step", 1),
            )
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size"),
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=own.get("attention_bias", architecture == "qwen2"),
            use_qk_norm=own.get("use_qk_norm", architecture == "qwen3"),
            attention_dropout=d.get("attention_dropout", 0.0) or 0.0,
            hidden_dropout=own.get("hidden_dropout", 0.0),
            initializer_range=d.get("initializer_range", 0.02),
            moe=moe,
            architecture=architecture,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )


__all__ = ["ModelConfig", "MoEConfig", "RoPEScalingConfig", "swiglu_intermediate_size"]
