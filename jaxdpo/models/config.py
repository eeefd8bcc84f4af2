"""One decoder configuration for the supported families, read from Hugging Face configs.

The families differ only in switches: how RMSNorm applies its weight (Gemma: `1 + w`), whether
embeddings are scaled by √hidden (Gemma), the MLP activation (SwiGLU / GeGLU with tanh GELU),
per-head q/k RMSNorm (Qwen3), projection biases (Qwen2: q/k/v only; Llama: optional), tied
embeddings, Gemma-2's extras (norms after attention and MLP too, "sandwich"; tanh soft-capping of
attention scores and final logits; the query scale 1/√query_pre_attn_scalar), and a sliding
attention window on the layers the config's `layer_types` name (Gemma-2; Qwen2/Qwen3 with
`use_sliding_window`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_FAMILIES = ("gemma", "gemma2", "llama", "qwen2", "qwen3")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static shape and family switches of a decoder (hashable: safe as a `jit` static argument)."""

    family: Literal["gemma", "gemma2", "llama", "qwen2", "qwen3"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    norm_offset: bool = False  # Gemma: x̂ · (1 + w)
    embed_scale: bool = False  # Gemma: embeddings · √hidden (rounded to the model dtype)
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sandwich_norms: bool = False  # Gemma-2: RMSNorm on the attention and MLP outputs before the residual add
    query_pre_attn_scalar: int | None = None  # Gemma-2: scores scaled by its -1/2 power (default head_dim)
    attn_logit_softcap: float | None = None  # Gemma-2: scores → c · tanh(scores / c)
    final_logit_softcap: float | None = None  # Gemma-2: logits → c · tanh(logits / c)
    sliding_window: int | None = None  # keys at most this many slots back (HF: kv_idx > q_idx − window)
    sliding_layers: tuple[bool, ...] = ()  # which layers use the window (empty: none)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding_layers are set but sliding_window is not")

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        return self.sliding_layers or (False,) * self.num_layers

    @classmethod
    def from_hf(cls, hf: PretrainedConfig | Mapping[str, Any]) -> DecoderConfig:
        """From a transformers config object or a `config.json` dict (defaults resolved by
        transformers' own config class for that `model_type`)."""
        hf = as_pretrained_config(hf)
        family = hf.model_type
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{family}: RoPE scaling type {rope_type!r} is not supported (only 'default')")
        if family == "gemma" and getattr(hf, "sliding_window", None):
            raise ValueError(f"{family}: sliding-window attention is not supported for this family")
        act_name = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
        if act_name not in _ACTIVATIONS:
            raise ValueError(f"{family}: activation {act_name!r} is not supported ({', '.join(_ACTIVATIONS)})")
        bias = bool(getattr(hf, "attention_bias", False))
        eos = hf.eos_token_id
        return cls(
            family=family,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
            rms_norm_eps=float(hf.rms_norm_eps),
            norm_offset=family.startswith("gemma"),
            embed_scale=family.startswith("gemma"),
            activation=_ACTIVATIONS[act_name],
            qk_norm=family == "qwen3",
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=False if family == "qwen2" else bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            tie_embeddings=bool(hf.tie_word_embeddings),
            **_sliding_fields(hf),
            **(_gemma2_fields(hf) if family == "gemma2" else {}),
            pad_token_id=hf.pad_token_id,
            bos_token_id=hf.bos_token_id,
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
        )

    def to_hf(self) -> PretrainedConfig:
        """An equivalent transformers config (for exporting models built from a DecoderConfig)."""
        fields = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            rms_norm_eps=self.rms_norm_eps,
            hidden_act={"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[self.activation],
            tie_word_embeddings=self.tie_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        )
        if self.family == "llama":
            fields.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.family == "qwen3":
            fields.update(attention_bias=self.qkv_bias)
        if self.family in ("gemma2", "qwen2", "qwen3"):
            fields.update(
                sliding_window=self.sliding_window,
                layer_types=["sliding_attention" if s else "full_attention" for s in self.layer_is_sliding],
            )
        if self.family in ("qwen2", "qwen3"):
            fields.update(use_sliding_window=any(self.sliding_layers))
        if self.family == "gemma2":
            fields.update(
                hidden_activation=fields.pop("hidden_act"),
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                attention_bias=self.qkv_bias,
            )
        return AutoConfig.for_model(self.family, **fields)


def _sliding_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """`sliding_window` and `sliding_layers` from HF's per-layer `layer_types` (none without them)."""
    layer_types = list(getattr(hf, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{hf.model_type}: layer types {unknown} are not supported (only sliding_attention, full_attention)")
    sliding = tuple(kind == "sliding_attention" for kind in layer_types)
    window = getattr(hf, "sliding_window", None)
    return dict(sliding_window=int(window), sliding_layers=sliding) if window and any(sliding) else {}


def _gemma2_fields(hf: PretrainedConfig) -> dict[str, Any]:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("gemma2: bidirectional attention is not supported (a causal decoder only)")
    return dict(
        sandwich_norms=True,
        query_pre_attn_scalar=int(hf.query_pre_attn_scalar),
        attn_logit_softcap=None if hf.attn_logit_softcapping is None else float(hf.attn_logit_softcapping),
        final_logit_softcap=None if hf.final_logit_softcapping is None else float(hf.final_logit_softcapping),
    )


def as_pretrained_config(hf: PretrainedConfig | Mapping[str, Any]) -> PretrainedConfig:
    """`hf` as a transformers `PretrainedConfig` of its model type (a dict is read as a config.json)."""
    if isinstance(hf, PretrainedConfig):
        model_type = hf.model_type
    else:
        hf = dict(hf)
        model_type = hf.pop("model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    if isinstance(hf, PretrainedConfig):
        return hf
    return AutoConfig.for_model(model_type, **hf)
