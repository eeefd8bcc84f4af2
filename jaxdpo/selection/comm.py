"""Eq. 3's argmax across devices: leaders (score, global index; ties to the lowest index) and the
reductions the greedy makes over the mesh axis holding candidate blocks."""

from __future__ import annotations

from functools import partial
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
    """Reductions over the mesh axis (or axes) holding candidate blocks; `None`: one device."""

    axis: object

    def sum(self, x):
        return x if self.axis is None else jax.lax.psum(x, self.axis)

    def max(self, x):
        return x if self.axis is None else jax.lax.pmax(x, self.axis)

    def offset(self, block: int) -> Array:
        """Global index of this device's first candidate."""
        return jnp.int32(0) if self.axis is None else jax.lax.axis_index(self.axis).astype(jnp.int32) * block

    def leader(self, local: Leader) -> Leader:
        """The best of every device's leader (all devices agree)."""
        if self.axis is None:
            return local
        gather = partial(jax.lax.all_gather, axis_name=self.axis)
        return leader(gather(local.value), gather(local.index))

    def broadcast(self, row: Array, owned: Array) -> Array:
        return row if self.axis is None else jax.lax.psum(jnp.where(owned, row, 0.0), self.axis)
