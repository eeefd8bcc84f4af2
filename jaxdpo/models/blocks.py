"""The decoder's building blocks as pure functions: normalization, rotary positions, activations,
soft-capping, the layout-aware dense product and grouped-query attention (shared by the scanned
forward and the KV-cached prefill/decode of `jaxdpo.models.decoder`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxdpo.models.config import DecoderConfig


def wide_dtype(dtype) -> jnp.dtype:
    """The accumulation dtype: float32, or float64 for a float64 model."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: Array, weight: Array, config: DecoderConfig) -> Array:
    """RMSNorm in float32; Gemma scales by (1 + w) in float32, Llama/Qwen by w in the model dtype."""
    xf = x.astype(wide_dtype(x.dtype))
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + config.rms_norm_eps)
    if config.norm_offset:
        return (normed * (1.0 + weight.astype(xf.dtype))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope(positions: Int[Array, "b t"], config: DecoderConfig, dtype) -> tuple[Array, Array]:
    half = jnp.arange(0, config.head_dim, 2, dtype=wide_dtype(dtype)) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**half)
    angles = positions[..., None].astype(inv_freq.dtype) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, hd]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


def activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_tanh")


def softcap(x: Array, cap: float | None) -> Array:
    """Gemma-2's tanh soft-capping c · tanh(x / c); identity without a cap."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def dense(x: Array, w: Array, out_in: bool, **kwargs) -> Array:
    """x @ w for `w` in [in, out] layout, or x @ wᵀ for `w` in [out, in] (`DecodeWeights`).

    On CPU the [out, in] product is computed as (w xᵀ)ᵀ, the matrix as the left operand: XLA's
    CPU matmul streams its left operand and repacks its right one, so a few rows times a large
    matrix run about twice as fast this way round (the barrier keeps XLA from rewriting it back).
    Other backends read either operand in place and get the plain product."""
    if not out_in:
        return jnp.matmul(x, w, **kwargs)

    def matrix_left(x, w):
        rows = x.reshape(-1, x.shape[-1])
        transposed = jax.lax.dot_general(w, rows, (((1,), (1,)), ((), ())), **kwargs)
        return jax.lax.optimization_barrier(transposed).T.reshape(*x.shape[:-1], w.shape[0])

    def plain(x, w):
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), **kwargs)

    return jax.lax.platform_dependent(x, w, cpu=matrix_left, default=plain)


def take_rows(x: Array, rows: Int[Array, "b w"]) -> Array:
    """`x[i, rows[i]]` for every batch row i: `[b, t, ...]` → `[b, w, ...]`."""
    return jnp.take_along_axis(x, rows.reshape(*rows.shape, *([1] * (x.ndim - 2))), axis=1)


def key_layout(k: Float[Array, "b t kv hd"]) -> Float[Array, "b kv hd t"]:
    return k.transpose(0, 2, 3, 1)


def value_layout(v: Float[Array, "b t kv hd"]) -> Float[Array, "b kv t hd"]:
    return v.transpose(0, 2, 1, 3)


def attention(q: Array, keys: Float[Array, "b kv hd S"], values: Float[Array, "b kv S hd"], allowed: Bool[Array, "b t S"], config: DecoderConfig) -> Array:
    """Grouped-query attention; softmax in float32. Rows with no allowed key (left padding) get a
    uniform, finite distribution — their outputs are never used. Heads sit in front of the token
    axes (`key_layout`, `value_layout`, the cache's layout), so both products are plain batched
    matmuls (XLA's CPU backward is several times slower on the transposing einsum layouts)."""
    b, t, heads, hd = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(b, t, kv_heads, heads // kv_heads, hd).transpose(0, 2, 3, 1, 4)  # b k g t d
    keys, values = keys[:, :, None], values[:, :, None]  # b k 1 d S, b k 1 S d
    scores = jnp.matmul(q, keys, preferred_element_type=wide_dtype(q.dtype)) * (config.query_pre_attn_scalar or hd) ** -0.5
    scores = softcap(scores, config.attn_logit_softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.matmul(probs, values).transpose(0, 3, 1, 2, 4).reshape(b, t, heads * hd)
