"""Eq. 3's argmax across devices: leaders (score, global index; ties to the lowest index) and the
reductions the greedy makes over the mesh axis holding candidate blocks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

NOBODY = np.iinfo(np.int32).max  # the index of no candidate


class Leader(NamedTuple):
    """A candidate (global index) and a score; the better of two has the larger score, then the
    lower index (Eq. 3's argmax with ties to the lowest index)."""

    value: Array
    index: Array


def better(a: Leader, b: Leader) -> Array:
    return (a.value > b.value) | ((a.value == b.value) & (a.index < b.index))


def best_of(a: Leader, b: Leader) -> Leader:
    first = better(a, b)
    return Leader(jnp.where(first, a.value, b.value), jnp.where(first, a.index, b.index))


def leader(values: Array, indices: Array) -> Leader:
    """The best (value, index) pair among equally long vectors."""
    top = jnp.max(values)
    return Leader(top, jnp.min(jnp.where(values == top, indices, NOBODY)).astype(jnp.int32))



class Comm(NamedTuple):
    """Reductions over the mesh axis (or axes) holding candidate blocks; `None`: one device.

    Every sync point of the greedy is ONE collective, and each depends on the one before: XLA's CPU
    runtime runs independent operations concurrently, so two independent collectives may start in
    a different order on each device — one device waiting in an all-gather while another waits in
    an all-reduce hangs both (seen in multi-process runs). Scalars travel together through
    `gather`; every device then reduces the same gathered values alike."""

    axis: object

    def gather(self, *scalars) -> tuple[Array, ...]:
        """Every device's value of each scalar, `[devices]` each, from one all-gather (their bytes
        packed side by side, so any mix of dtypes travels at once)."""
        scalars = [jnp.asarray(s) for s in scalars]
        if self.axis is None:
            return tuple(s[None] for s in scalars)
        as_bytes = [jax.lax.bitcast_convert_type(s.astype(jnp.uint8) if s.dtype == jnp.bool_ else s, jnp.uint8).reshape(-1) for s in scalars]
        rows = jax.lax.all_gather(jnp.concatenate(as_bytes), self.axis)  # [devices, bytes]
        out, start = [], 0
        for s, b in zip(scalars, as_bytes):
            chunk = rows[:, start : start + b.shape[0]]
            start += b.shape[0]
            value = chunk[:, 0] if b.shape[0] == 1 else jax.lax.bitcast_convert_type(chunk, s.dtype)
            out.append(value.astype(s.dtype))
        return tuple(out)

    def sum(self, x):
        values = self.gather(x)[0]
        return jnp.sum(values, dtype=values.dtype)  # int32 stays int32 (jnp.sum widens it under x64)

    def max(self, x):
        return jnp.max(self.gather(x)[0])

    def offset(self, block: int) -> Array:
        """Global index of this device's first candidate."""
        return jnp.int32(0) if self.axis is None else jax.lax.axis_index(self.axis).astype(jnp.int32) * block

    def leader(self, local: Leader) -> Leader:
        """The best of every device's leader (all devices agree)."""
        return leader(*self.gather(local.value, local.index))

    def broadcast(self, row: Array, owned: Array) -> Array:
        """The owner's `row` on every device (an all-reduce adding zeros: exact)."""
        return row if self.axis is None else jax.lax.psum(jnp.where(owned, row, 0.0), self.axis)
