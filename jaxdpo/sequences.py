"""Token sequences as every stage passes them, and fixed-shape chunking.

`Sequences` is the one layout of prompt + response rows: `generate` returns it, log-probs, implicit
rewards, gradient features and DPO read it. Rows are `[r, s]`: a left-padded prompt, then the
response tokens (marked by `response_mask`), then right padding (attention 0).

Log-probs need the LM head only where the response is predicted: `response_window` gives the static
width of those positions, shared by every row.

Fixed-shape work: `pad_rows` repeats the last row (valid data, so padding never produces NaN), and
`map_in_chunks` runs a jitted function over a host array `chunk` rows at a time, so one compiled
shape serves every pool size (`map_on_devices`: its results left on the devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Int

from jaxdpo import checks
from jaxdpo.sharding import to_host


class Sequences(NamedTuple):
    """Prompt + response rows `[r, s]`: left-padded prompt, response tokens marked by
    `response_mask`, padding marked by `attention_mask` = 0. A pytree (jit-able)."""

    input_ids: Int[ArrayLike, "r s"]
    response_mask: Int[ArrayLike, "r s"]
    attention_mask: Int[ArrayLike, "r s"]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index) -> Sequences:
        """The rows at `index` (an int array, a slice or a bool mask)."""
        return Sequences(*(x[index] for x in self))

    def to_host(self) -> Sequences:
        return Sequences(*(to_host(x) for x in self))

    def check(self) -> None:
        check_sequences(*self)


def check_sequences(input_ids, response_mask, attention_mask=None) -> None:
    """Shapes and dtypes of a batch of (prompt + response) sequences; with concrete values, that
    every row has a response and no response token sits at position 0 (it would have no context)."""
    checks.check_ndim("input_ids", input_ids, 2, "[n, seq]")
    checks.check_integer("input_ids", input_ids)
    checks.check_shape("response_mask", response_mask, np.shape(input_ids))
    if attention_mask is not None:
        checks.check_shape("attention_mask", attention_mask, np.shape(input_ids))
    checks.require(np.shape(input_ids)[0] >= 1, "input_ids has no rows (empty batch)")
    if checks.is_concrete(response_mask):
        mask = to_host(response_mask) != 0
        empty = np.flatnonzero(~mask.any(axis=1))
        checks.require(empty.size == 0, f"response_mask has no response token in rows {empty[:10].tolist()} (empty response)")
        first = np.flatnonzero(mask[:, 0])
        checks.require(first.size == 0, f"response_mask marks position 0 in rows {first[:10].tolist()}; a response token needs a prompt before it")
        if attention_mask is not None:
            outside = np.flatnonzero((mask & (to_host(attention_mask) == 0)).any(axis=1))
            checks.require(outside.size == 0, f"response_mask marks padding (attention_mask = 0) in rows {outside[:10].tolist()}")


def response_window(response_mask) -> int:
    """The static number of positions log-probs read per row: the widest row's response span (first
    to last response token) rounded up to a power of two ≥ 16, so a run compiles a handful of
    shapes, at most seq − 1. A traced mask (inside `jit`) has no values to read: every position."""
    if not checks.is_concrete(response_mask):
        return np.shape(response_mask)[1] - 1
    rounded = max(16, 1 << (response_span(response_mask) - 1).bit_length())
    return min(rounded, np.shape(response_mask)[1] - 1)


def response_span(response_mask) -> int:
    """The widest row's response span: positions from its first response token to its last."""
    mask = to_host(response_mask) != 0
    return int(np.max(mask.shape[1] - mask[:, ::-1].argmax(axis=1) - mask.argmax(axis=1)))


def pad_rows(x, rows: int):
    """`x` with its last row repeated up to `rows` rows (NumPy in, NumPy out; JAX in, JAX out)."""
    xp = jnp if isinstance(x, jax.Array) else np
    extra = rows - x.shape[0]
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)]) if extra > 0 else x


def _chunk_calls(fn: Callable, batch, chunk: int):
    """(`fn` of each `chunk` rows of a pytree of host arrays, in order, called as iterated (the
    last chunk padded by `pad_rows`); the row count)."""
    n = jax.tree.leaves(batch)[0].shape[0]
    total = math.ceil(n / chunk) * chunk
    padded = jax.tree.map(lambda x: pad_rows(np.asarray(x), total), batch)
    return (fn(jax.tree.map(lambda x: x[i : i + chunk], padded)) for i in range(0, total, chunk)), n


def map_in_chunks(fn: Callable, batch, chunk: int) -> np.ndarray:
    """`fn(rows)` over a pytree of host arrays with a leading row axis, `chunk` rows per call,
    each result brought to the host, concatenated and cut back to the row count."""
    calls, n = _chunk_calls(fn, batch, chunk)
    return np.concatenate([to_host(out) for out in calls])[:n]


def map_on_devices(fn: Callable, batch, chunk: int) -> jax.Array:
    """`map_in_chunks` whose results stay on the devices that computed them: concatenated there
    (a global array on several processes), never brought to the host, and split by rows as each
    chunk's result is when the row count allows (else as XLA chooses)."""
    calls, n = _chunk_calls(fn, batch, chunk)
    outs = tuple(calls)
    sharding = outs[0].sharding
    blocks = outs[0].shape[0] // sharding.shard_shape(outs[0].shape)[0]
    return _joined(outs, n, sharding if n % blocks == 0 else None)


@partial(jax.jit, static_argnums=(1, 2))
def _joined(outs: tuple[jax.Array, ...], n: int, sharding) -> jax.Array:
    joined = jnp.concatenate(outs)[:n]
    return joined if sharding is None else jax.lax.with_sharding_constraint(joined, sharding)
