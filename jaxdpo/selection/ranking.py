"""The candidates of highest bound, exactly and without a sort: `lax.top_k` in two steps for a
few of many, and a bisection over float bit patterns for a large share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxdpo.selection.plan import TWO_STEP_SPREAD, TWO_STEP_TOP_K, WIDE_SPREAD


def largest(values: Float[Array, " n"], k: int) -> tuple[Array, Array]:
    """`lax.top_k(values, k)` (ties: lowest index first), on a long vector in two steps: the top k
    of the maxima of blocks of 16 or 64 entries, then the top k among those blocks' entries. Exact:
    an entry outside those blocks is beaten by each of the k block maxima chosen above it."""
    n = values.shape[0]
    if n < TWO_STEP_TOP_K or n < TWO_STEP_SPREAD * k:
        return tuple(jax.lax.top_k(values, k))
    block = 64 if n >= WIDE_SPREAD * k else 16
    blocks = -(-n // block)
    padded = jnp.pad(values, (0, blocks * block - n), constant_values=-jnp.inf).reshape(blocks, block)
    chosen = jnp.sort(jax.lax.top_k(jnp.max(padded, axis=1), min(k, blocks))[1])  # in index order: ties stay lowest first
    top, within = jax.lax.top_k(padded[chosen].reshape(-1), k)
    return top, chosen[within // block] * block + within % block


def highest(bounds: Float[Array, " n"], k: int) -> tuple[Array, Array]:
    """(indices of at most k candidates of highest bound, padded with n; the largest bound of the
    others): all whose bound's float32 bit pattern (non-negative floats order as integers) is
    above a τ found by bisection, one count per bit; -inf bounds stay out. O(n), no sort."""
    n = bounds.shape[0]
    keys = jnp.where(bounds >= 0, jax.lax.bitcast_convert_type(bounds.astype(jnp.float32), jnp.int32), -1)

    def halve(_, interval):
        low, high = interval  # more than k keys above low, at most k above high
        middle = low + (high - low) // 2
        fits = jnp.sum(keys > middle, dtype=jnp.int32) <= k
        return jnp.where(fits, low, middle), jnp.where(fits, middle, high)

    infinity = jax.lax.bitcast_convert_type(jnp.float32(jnp.inf), jnp.int32)
    _, tau = jax.lax.fori_loop(0, 32, halve, (jnp.int32(-1), infinity))
    above = keys > tau
    return jnp.nonzero(above, size=k, fill_value=n)[0].astype(jnp.int32), jnp.max(jnp.where(above, -jnp.inf, bounds))
