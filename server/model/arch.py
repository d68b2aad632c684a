"""What the decoder needs to know about a checkpoint's architecture, read from its config.json.

One decoder serves every supported family; each family differs from Llama in a few named ways
(a norm, an extra pair of norms, a RoPE variant, a soft-cap, a sliding window), all decided here,
once, at load. transformers' own config classes parse the file, so legacy layouts (v4
`rope_scaling`, Gemma's `sliding_window_pattern`, Phi-3's `su` RoPE) mean what they mean there.
Anything the decoder can't run exactly is refused with UnsupportedModelError, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from server.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_REFUSED = {  # model types people will try, and why they are not served
    "gemma3": "a Gemma 3 checkpoint with a vision tower (Gemma3ForConditionalGeneration); only the text-only "
              "gemma3_text checkpoints (Gemma 3 270M / 1B) are served",
    "mixtral": "mixture-of-experts models are not supported",
    "qwen2_moe": "mixture-of-experts models are not supported",
    "qwen3_moe": "mixture-of-experts models are not supported",
}


class Norm(Enum):
    RMS = "rms"  # w * x / rms(x)
    RMS_ONE_PLUS = "rms_one_plus"  # (1 + w) * x / rms(x), computed in fp32 (Gemma)


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm: Norm = Norm.RMS
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and around the MLP (Gemma 2/3)
    embed_scale: Optional[float] = None  # embeddings * sqrt(hidden) (Gemma)
    attn_scale: float = 0.0  # 0: head_dim ** -0.5
    attn_softcap: Optional[float] = None  # cap * tanh(scores / cap) (Gemma 2)
    final_softcap: Optional[float] = None
    activation: str = "silu"  # silu | gelu_tanh
    layer_windows: tuple[Optional[int], ...] = ()  # per layer: sliding window (keys seen incl. self) or None
    layer_ropes: tuple[str, ...] = ()  # per layer: which RoPE table ("default", or Gemma 3's layer types)
    rotary_dim: int = 0  # 0: head_dim; Phi-4-mini rotates only the first part of each head
    fused_projections: bool = False  # the checkpoint's own modules are qkv_proj and gate_up_proj (Phi-3)
    hf: Any = field(default=None, compare=False, repr=False)  # transformers' parsed config (for RoPE)

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers, at 4 bytes per element (fp32)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ArchConfig":
        """From a config.json's contents; raises UnsupportedModelError naming what can't be served."""
        hf = _parse(cfg)
        _refuse_unsupported(hf)
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        gemma = hf.model_type in ("gemma2", "gemma3_text")
        layer_types = _layer_types(hf)
        rope_keys = tuple(layer_types) if _per_layer_type_rope(hf) else ("default",) * hf.num_hidden_layers
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=hf.model_type != "qwen2" and bool(getattr(hf, "attention_bias", False)),  # Qwen2: q/k/v only
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            norm=Norm.RMS_ONE_PLUS if gemma else Norm.RMS,
            qk_norm=hf.model_type in ("qwen3", "gemma3_text"),
            sandwich_norms=gemma,
            embed_scale=hf.hidden_size**0.5 if gemma else None,
            attn_scale=hf.query_pre_attn_scalar**-0.5 if gemma else 0.0,
            attn_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
            final_softcap=getattr(hf, "final_logit_softcapping", None) if gemma else None,
            activation=_ACTIVATIONS[_activation_name(hf)],
            layer_windows=tuple(hf.sliding_window if t == "sliding_attention" else None for t in layer_types),
            layer_ropes=rope_keys,
            fused_projections=hf.model_type == "phi3",
            rotary_dim=int(head_dim * _rope_params(hf, rope_keys[0]).get("partial_rotary_factor", 1.0)),
            hf=hf,
        )

    def rope_parameters(self, key: str) -> dict[str, Any]:
        return _rope_params(self.hf, key)


def _parse(cfg: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING  # heavy import, only when a model is loaded

    model_type = cfg.get("model_type", "")
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r}: {_REFUSED[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"config.json of a {model_type} model could not be read: {exc}") from None


def _refuse_unsupported(hf: Any) -> None:
    def refuse(what: str) -> None:
        raise UnsupportedModelError(f"unsupported {hf.model_type} checkpoint: {what}")

    if any(getattr(hf, key, 0) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        refuse("mixture-of-experts layers are not supported")
    if getattr(hf, "vision_config", None) is not None:
        refuse("vision towers are not supported")
    if getattr(hf, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention=true (an embedding model, not a causal LM)")
    if _activation_name(hf) not in _ACTIVATIONS:
        refuse(f"activation {_activation_name(hf)!r}; supported: {', '.join(_ACTIVATIONS)}")
    if hf.model_type not in ("gemma2", "gemma3_text") and (getattr(hf, "attn_logit_softcapping", None)):
        refuse("attention soft-capping outside Gemma")
    for key in set(_layer_types(hf)) if _per_layer_type_rope(hf) else ("default",):
        rope_type = _rope_params(hf, key).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            refuse(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _activation_name(hf: Any) -> str:
    return getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "silu"


def _layer_types(hf: Any) -> list[str]:
    """Which layers attend over a sliding window. Families without `layer_types` (Mistral, Phi-3)
    slide on every layer when `sliding_window` is set, as transformers' masks do."""
    types = getattr(hf, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(hf, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * hf.num_hidden_layers


def _per_layer_type_rope(hf: Any) -> bool:
    """Gemma 3 keeps one RoPE configuration per layer type (local base for sliding layers)."""
    params = hf.rope_parameters or {}
    return bool(params) and all(isinstance(v, dict) for v in params.values())


def _rope_params(hf: Any, key: str) -> dict[str, Any]:
    params = hf.rope_parameters or {}
    return dict(params[key]) if key != "default" else dict(params)
