"""Seeded random projections of per-example gradients (paper §3.3, "LoRA gradient with random projection").

Two methods, one random source (`rademacher`: ±1 entries from the bits of `jax.random`):

* Dense, on the fly (`dense_project`): y = P g / √dim with P a dim × k Rademacher matrix that is
  never stored. Each gradient leaf is split into blocks of `BLOCK` coordinates; the rows of Pᵀ
  for block j of leaf i come from `fold_in(fold_in(key, i), j)`. The mapping seed → matrix is
  therefore fixed (independent of batch size, chunking and device count), and one block of
  `BLOCK × dim` lives in memory at a time. E⟨Pg, Ph⟩/dim = ⟨g, h⟩.

* Factored, Kronecker (`FactoredPlan`): for a matrix W [a, b] the per-example gradient is
  G = Σ_t x_t δ_tᵀ. With P_l [k1, a] and P_r [k2, b] (±1), every entry (P_l G P_rᵀ)_ij is an
  unbiased estimate of ⟨G, H⟩ when paired with the same entry for H. `features.py` obtains
  P_l G P_rᵀ as ∂L/∂E of a zero probe E inserted as W + P_lᵀ E P_r, i.e. from the projected
  factors P_l x_t and P_r δ_t, never forming G. A plan spreads `dim` coordinates over the blocks
  (layer × target × {A, B}) as evenly as possible; block j keeps the first c_j entries of its grid,
  scaled by 1/√c_j, so Σ_j c_j = dim and inner products stay unbiased block by block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jaxdpo import checks

BLOCK = 2048  # gradient coordinates per generated block of the dense projection (part of the seed contract)


def as_key(seed_or_key) -> Array:
    """A typed PRNG key from an int seed or an existing key."""
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    key = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def rademacher(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
    """Entries ±1 with equal probability, 32 signs per random 32-bit word: generating the bits,
    not the matmul, bounds an on-the-fly projection, and this is 32× fewer generator calls than
    one draw per entry."""
    size = math.prod(shape)
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (1 - 2 * bits.astype(jnp.int8)).astype(dtype).reshape(-1)[:size].reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------
# Dense, on the fly


def _leaf_matrix(n: int, leaf: Array) -> Array:
    return leaf.reshape(n, -1)


def _project_leaf(key: Array, flat: Float[Array, "n k"], dim: int) -> Float[Array, "n dim"]:
    """Σ_j flat[:, block j] @ R_j with R_j = rademacher(fold_in(key, j), [BLOCK, dim])."""
    n, k = flat.shape
    blocks = -(-k // BLOCK)
    padded = jnp.pad(flat, ((0, 0), (0, blocks * BLOCK - k))).reshape(n, blocks, BLOCK).transpose(1, 0, 2)

    def add_block(total, inputs):
        j, chunk = inputs
        rows = rademacher(jax.random.fold_in(key, j), (BLOCK, dim), flat.dtype)
        return total + jnp.matmul(chunk, rows, preferred_element_type=jnp.float32), None

    total, _ = jax.lax.scan(add_block, jnp.zeros((n, dim), jnp.float32), (jnp.arange(blocks), padded))
    return total


def _check_batch(grads) -> tuple[list[ArrayLike], int]:
    leaves = jax.tree.leaves(grads)
    checks.require(len(leaves) > 0, "grads has no arrays")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    checks.require(
        len(sizes) == 1 and None not in sizes,
        f"every leaf of grads needs the same leading (example) axis, got leading sizes {sorted(map(str, sizes))}",
    )
    for i, leaf in enumerate(leaves):
        checks.check_floating(f"grads leaf {i}", leaf)
        checks.check_finite(f"grads leaf {i}", leaf)
    return leaves, sizes.pop()


def dense_project(grads, *, dim: int, key) -> Float[Array, "n dim"]:
    """Project a batch of gradients — a `[n, k]` array or a pytree whose leaves share a leading n
    axis — to `[n, dim]` float32 features P g / √dim (see the module docstring for the seed contract).
    """
    checks.require(isinstance(dim, (int, np.integer)) and dim >= 1, f"dim must be a positive int, got {dim!r}")
    leaves, n = _check_batch(grads)
    return project_leaves(leaves, as_key(key), int(dim))


@partial(jax.jit, static_argnames="dim")
def project_leaves(leaves: list[Array], key: Array, dim: int) -> Float[Array, "n dim"]:
    """The dense projection of per-example gradient leaves `[n, ...]` (no input checks: the jitted
    programs call it; `dense_project` is the checked entry point)."""
    n = leaves[0].shape[0]
    total = jnp.zeros((n, dim), jnp.float32)
    for i, leaf in enumerate(leaves):
        total = total + _project_leaf(jax.random.fold_in(key, i), _leaf_matrix(n, leaf), dim)
    return total / math.sqrt(dim)


def dense_projection_matrix(leaf_sizes: Sequence[int], *, dim: int, key) -> np.ndarray:
    """The explicit `[dim, Σ sizes]` matrix that `dense_project` applies (including 1/√dim), for
    tests and small k only: it materializes P."""
    key = as_key(key)
    columns = []
    for i, size in enumerate(leaf_sizes):
        leaf_key = jax.random.fold_in(key, i)
        blocks = -(-size // BLOCK)
        rows = [np.asarray(rademacher(jax.random.fold_in(leaf_key, j), (BLOCK, dim))) for j in range(blocks)]
        columns.append(np.concatenate(rows)[:size].T)
    return np.concatenate(columns, axis=1) / math.sqrt(dim)


# ---------------------------------------------------------------------------------------------
# Factored (Kronecker, LoGra-style)


@dataclasses.dataclass(frozen=True)
class FactoredBlock:
    """A family of per-layer matrices W [rows, cols] (one LoRA factor of one target), projected by
    P_l [k_left, rows] and P_r [k_right, cols]."""

    name: str
    rows: int
    cols: int
    k_left: int
    k_right: int


@dataclasses.dataclass(frozen=True)
class FactoredPlan:
    """How `dim` coordinates are spread over `num_layers` × blocks (see the module docstring).

    `gather` indexes the concatenation over blocks (in `blocks` order) of the flattened
    [num_layers, k_left, k_right] probe gradients; `scale` multiplies the gathered entries."""

    dim: int
    num_layers: int
    blocks: tuple[FactoredBlock, ...]
    gather: np.ndarray = dataclasses.field(compare=False)
    scale: np.ndarray = dataclasses.field(compare=False)

    def __hash__(self):
        return hash((self.dim, self.num_layers, self.blocks))

    def factors(self, key: Array, block: int, layer: int | Array) -> tuple[Array, Array]:
        """(P_l, P_r) of `block` at `layer` (an int or a traced int32)."""
        spec = self.blocks[block]
        layer_key = jax.random.fold_in(jax.random.fold_in(as_key(key), block), layer)
        left_key, right_key = jax.random.split(layer_key)
        return rademacher(left_key, (spec.k_left, spec.rows)), rademacher(right_key, (spec.k_right, spec.cols))

    def select(self, probe_grads: Sequence[Float[Array, "n L _ _"]]) -> Float[Array, "n dim"]:
        """Features from the probe gradients of every block (in `blocks` order)."""
        n = probe_grads[0].shape[0]
        flat = jnp.concatenate([g.reshape(n, -1) for g in probe_grads], axis=1)
        return flat[:, self.gather] * self.scale


def plan_factored(shapes: Sequence[tuple[str, int, int, int]], *, num_layers: int, dim: int) -> FactoredPlan:
    """Plan for blocks given as (name, rows, cols, rank_side) with rank_side 0 or 1 marking the
    LoRA-rank axis (kept at most `rank` wide, since more rows there only repeat information)."""
    checks.require(isinstance(dim, (int, np.integer)) and dim >= 1, f"dim must be a positive int, got {dim!r}")
    checks.require(len(shapes) > 0 and num_layers >= 1, "a factored projection needs at least one block")
    count = num_layers * len(shapes)
    checks.require(dim >= count, f"dim={dim} is below the number of projected blocks ({count}); use dim >= {count}")
    per_block = np.full(count, dim // count)
    per_block[: dim % count] += 1
    widest = int(per_block.max())
    blocks = []
    for name, rows, cols, rank_side in shapes:
        rank = (rows, cols)[rank_side]
        k_rank = min(rank, math.isqrt(widest - 1) + 1)
        k_other = -(-widest // k_rank)
        k_left, k_right = (k_rank, k_other) if rank_side == 0 else (k_other, k_rank)
        blocks.append(FactoredBlock(name, rows, cols, k_left, k_right))
    gather, scale, offset = [], [], 0
    for b, spec in enumerate(blocks):  # probe layout: block-major, then layer, then grid
        grid = spec.k_left * spec.k_right
        for layer in range(num_layers):
            c = int(per_block[b * num_layers + layer])
            gather.extend(range(offset + layer * grid, offset + layer * grid + c))
            scale.extend([1.0 / math.sqrt(c)] * c)
        offset += num_layers * grid
    return FactoredPlan(dim, num_layers, tuple(blocks), np.asarray(gather, np.int32), np.asarray(scale, np.float32))


def kronecker_project(
    left: Float[ArrayLike, "n t a"], right: Float[ArrayLike, "n t b"], p_left: Float[ArrayLike, "k1 a"], p_right: Float[ArrayLike, "k2 b"],
    token_mask=None,
) -> Float[Array, "n k1 k2"]:
    """P_l G P_rᵀ for G = Σ_t left_t right_tᵀ, from the projected factors (reference for one block)."""
    if token_mask is not None:
        left = left * jnp.asarray(token_mask, left.dtype)[..., None]
    return jnp.einsum("nta,ka,ntb,jb->nkj", left, p_left, right, p_right)
