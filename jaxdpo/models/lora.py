"""LoRA adapters as a pytree separate from the base weights (π_ref is the same model with the adapter off)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

from jaxdpo.models.config import DecoderConfig

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

LoraFn = Callable[[Array, dict[str, Array], float, Array, str], Array]
"""`lora_fn(x, params, scale, layer, target) -> delta`: the adapter's additive output for one
projection of one layer. `params` is this layer's slice of `lora.params[target]` (every leaf the
caller put there), `layer` the int32 layer index (a tracer under scan), `target` its name."""


@struct.dataclass
class LoRA:
    """Adapter weights per target, stacked over the L layers: `{"a": [L, in, r], "b": [L, r, out]}`.

    The delta of a projection is `(α/r) · (x A) B`. `jax.grad` w.r.t. a LoRA returns a LoRA of the
    same structure; per-example gradients add a leading axis to every leaf. (A pytree: while JAX
    transforms it the leaves are tracers or placeholders, hence no array type on the field.)"""

    params: dict[str, dict[str, Any]]
    rank: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.params)


def target_shapes(config: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA-able projection."""
    attention = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    hidden, inner = config.hidden_size, config.intermediate_size
    return {
        "q": (hidden, attention),
        "k": (hidden, kv),
        "v": (hidden, kv),
        "o": (attention, hidden),
        "gate": (hidden, inner),
        "up": (hidden, inner),
        "down": (inner, hidden),
    }


def init_lora(
    model,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = LORA_TARGETS,
    key: Array,
    dtype=jnp.float32,
) -> LoRA:
    """A fresh adapter for `model` (anything with a `.config: DecoderConfig`): A ~ U(±1/√in) as in
    PEFT's Kaiming-uniform default, B = 0, so the adapted model starts equal to the base model."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names from {list(LORA_TARGETS)}, got {list(targets)}")
    config = model.config
    shapes = target_shapes(config)
    keys = jax.random.split(key, len(targets))
    params = {}
    for target, k in zip(targets, keys):
        fan_in, fan_out = shapes[target]
        bound = 1.0 / fan_in**0.5
        params[target] = {
            "a": jax.random.uniform(k, (config.num_layers, fan_in, rank), dtype, -bound, bound),
            "b": jnp.zeros((config.num_layers, rank, fan_out), dtype),
        }
    return LoRA(params=params, rank=rank, alpha=float(alpha))


def default_lora_fn(x: Array, params: dict[str, Array], scale: float, layer: Array, target: str) -> Array:
    """The plain adapter delta `scale · (x A) B`."""
    del layer, target
    return scale * ((x @ params["a"].astype(x.dtype)) @ params["b"].astype(x.dtype))


def merged_delta(lora: LoRA, target: str) -> Float[Array, "L in out"]:
    """`scale · A B` per layer: what merging adds to the base weight [L, in, out]."""
    p = lora.params[target]
    return lora.scale * jnp.einsum("lir,lro->lio", p["a"], p["b"])
