"""The candidates a selection reads, and what one pass over them yields: the scale, the factored
prior and every candidate's initial score (or an upper bound on it).

φ is given densely `[n, d]`, or as per-response features g `[r, d]` with `pairs` `[n, 2]`
(φ_i = g[a_i] − g[b_i], never materialized: a pass reads g once and differences per pair).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxdpo.selection.algebra import (
    Prior,
    Scale,
    factor_prior,
    matmul,
    norm_exponent,
    scale,
    solve_t,
    times_power_of_two,
    triangular,
    whiten,
)

CHUNK = 1024  # candidate rows whitened at once for exact initial scores
PAIR_BYTES = 2**22  # pairs differenced at once: as many as make 4 MiB of rows (measured on CPU: d = 8192 → 128)
SUBSPACE_STEPS = 3  # subspace iterations for the prior's leading directions (bound pass)


class Candidates(NamedTuple):
    features: Array  # φ [n, d], or g [r, d] when pairs is given; float32/64, or half precision
    pairs: Array | None  # [n, 2] int: φ_i = g[a_i] − g[b_i] (indices into this block of g)
    dtype: object  # the compute dtype (float32 for half-precision features)
    subset: Array | None = None  # [k]: candidate j of this view is candidate subset[j] (rows only)

    @property
    def count(self) -> int:
        if self.subset is not None:
            return self.subset.shape[0]
        return self.features.shape[0] if self.pairs is None else self.pairs.shape[0]

    def restricted(self, subset: Int[Array, " k"]) -> Candidates:
        """The view of candidates `subset` (for `rows`; a pass still reads every candidate)."""
        return self._replace(subset=subset)

    def rows(self, indices: Int[Array, " k"]) -> Float[Array, "k d"]:
        """Candidate rows φ (unscaled) in the compute dtype."""
        if self.subset is not None:
            indices = self.subset[indices]
        if self.pairs is None:
            return self.features[indices].astype(self.dtype)
        return self.pair_rows(self.pairs[indices, 0], self.pairs[indices, 1])

    def pair_rows(self, a: Int[Array, " k"], b: Int[Array, " k"]) -> Float[Array, "k d"]:
        f = self.features
        return f[a].astype(self.dtype) - f[b].astype(self.dtype)

    def stored_norms(self) -> Float[Array, " rows"]:
        """‖row‖² of every stored row (φ, or g in pairs mode): one pass."""
        f = self.features.astype(self.dtype)
        return jnp.sum(f * f, axis=1)

    def squared_norms(self, stored: Array) -> Float[Array, " n"]:
        """‖φ_i‖² of every candidate (pairs mode: the differences, their rows read in cache-sized
        runs of consecutive pairs)."""
        if self.pairs is None:
            return stored
        return self.map_pairs(lambda a, b: jnp.sum(jnp.square(self.pair_rows(a, b)), axis=1))

    def map_pairs(self, fn) -> Array:
        """fn(a [k], b [k]) → [k] over all pairs, `PAIR_BYTES` of rows at a time (consecutive pairs
        share rows)."""
        size = min(max(16, PAIR_BYTES // (self.features.shape[1] * jnp.dtype(self.dtype).itemsize)), self.count)
        chunks = -(-self.count // size)
        padded = jnp.zeros((chunks * size, 2), self.pairs.dtype).at[: self.count].set(self.pairs)
        out = jax.lax.map(lambda p: fn(p[:, 0], p[:, 1]), padded.reshape(chunks, size, 2))
        return out.reshape(-1)[: self.count]

    def stored_dot(self, vectors: Array) -> Array:
        f = self.features
        if f.dtype == self.dtype:
            return matmul(f, vectors)
        if vectors.ndim == 1:  # convert, multiply, reduce: one fused pass, never an upcast copy of Φ
            return jnp.sum(f.astype(self.dtype) * vectors, axis=1)
        return jax.lax.map(lambda row: matmul(row.astype(self.dtype), vectors), f, batch_size=CHUNK)

    def dot(self, vectors: Array) -> Array:
        """φ_iᵀx for every candidate (x: [d] or [d, m]): one pass over the feature matrix."""
        products = self.stored_dot(vectors)
        if self.pairs is None:
            return products
        return products[self.pairs[:, 0]] - products[self.pairs[:, 1]]

    def map_rows(self, fn) -> Array:
        """fn(rows [k, d]) → [k] over all candidates, `CHUNK` rows at a time."""
        return jax.lax.map(lambda i: fn(self.rows(i[None]))[0], jnp.arange(self.count), batch_size=min(CHUNK, self.count))


# ---------------------------------------------------------------------------------------------
# Initial scores


class Start(NamedTuple):
    """Scale, prior factor and the initial scores: exact ŝ⁰ (`exact`), values with an error bound
    (`values`: the prior through its full difference form), or only upper bounds (a prior seen
    through its leading `bound_rank` directions)."""

    scale: Scale
    prior: Prior
    scores: Float[Array, " n"]
    error: Float[Array, " n"]
    valid: Array  # finite features, prior and scores; reg > 0; pairs in range
    exact: bool
    values: bool


def _exponent(candidates: Candidates, prior: Array | None, comm, stored: Array) -> tuple[Array, Array]:
    """(e, whether e came from the rare path): from the largest squared row norm when it is a
    normal float32 number, else (overflow, underflow) from max |entry| and a second pass."""
    largest = jnp.max(stored)
    if prior is not None and prior.shape[0]:
        largest = jnp.maximum(largest, jnp.max(jnp.sum(prior * prior, axis=1)))
    largest = comm.max(largest)  # the first collective, after the prior (replicated) is in place
    rare = ~((largest >= 2.0**-100) & (largest <= 2.0**100))

    def from_entries():
        entries = comm.max(jnp.max(jnp.abs(candidates.features)).astype(candidates.dtype))
        if prior is not None and prior.shape[0]:
            entries = jnp.maximum(entries, jnp.max(jnp.abs(prior)))
        coarse = jnp.frexp(entries)[1]
        f = times_power_of_two(candidates.features.astype(candidates.dtype), -coarse)
        fine = comm.max(jnp.max(jnp.sum(f * f, axis=1)))
        if prior is not None and prior.shape[0]:
            p = times_power_of_two(prior, -coarse)
            fine = jnp.maximum(fine, jnp.max(jnp.sum(p * p, axis=1)))
        return coarse + norm_exponent(fine)

    return jax.lax.cond(rare, from_entries, lambda: norm_exponent(largest)), rare


def bound_rows(prior: Prior, rank: int) -> Float[Array, "r d"]:
    """Rows C with ‖x‖² − ‖Cx‖² ≥ ρ²xᵀV₀⁻¹x (= when rank = p): the ridge score under the generators
    WᵀP alone, W [p, r] orthonormal (its leading eigen-directions of G by subspace iteration), as
    WᵀPᵀPW... ≼ PᵀP. C = R⁻ᵀWᵀP with RᵀR = WᵀGW from the QR of UW (never a squared condition)."""
    p = prior.rows.shape[0]
    if rank >= p:
        return solve_t(prior.tri, prior.rows.T).T  # U⁻ᵀP
    u = prior.tri.factor
    w = jax.random.normal(jax.random.key(0), (p, rank), u.dtype)
    for _ in range(SUBSPACE_STEPS):
        w = jnp.linalg.qr(matmul(u.T, matmul(u, w)))[0]
    r = jnp.linalg.qr(matmul(u, w), mode="r")
    return solve_t(triangular(r), matmul(w.T, prior.rows).T).T


def start(
    candidates: Candidates, prior: Array | None, reg: Array, comm, bound_rank: int | None, slack: float, allowance, pair_bounds: bool = False
) -> Start:
    """Scale, prior factor and initial scores: one pass over Φ (pairs: over g, then the pairs'
    differences, or with `pair_bounds` and no prior only the bounds (‖g_a‖ + ‖g_b‖)²), plus with a
    prior of p < d rows a pass of `bound_rank` products (None: exact whitened scores of every
    candidate, a pass of 2p products)."""
    stored = candidates.stored_norms()
    exponent, rare = _exponent(candidates, prior, comm, stored)
    sc = scale(exponent, reg)
    factor = factor_prior(None if prior is None else sc.scaled(prior, candidates.dtype), sc.rho)

    def scaled_stored():
        return jax.lax.cond(
            rare,
            lambda: jnp.sum(sc.scaled(candidates.features, candidates.dtype) ** 2, axis=1),
            lambda: times_power_of_two(times_power_of_two(stored, -exponent), -exponent),
        )

    def scaled_norms():
        if candidates.pairs is None:
            return scaled_stored()
        return jax.lax.cond(
            rare,
            lambda: candidates.map_pairs(lambda a, b: jnp.sum(sc.scaled(candidates.pair_rows(a, b), candidates.dtype) ** 2, axis=1)),
            lambda: times_power_of_two(times_power_of_two(candidates.squared_norms(stored), -exponent), -exponent),
        )

    exact, values = True, True
    if factor.kind == "none" and pair_bounds:  # ‖g_a − g_b‖ ≤ ‖g_a‖ + ‖g_b‖
        lengths = jnp.sqrt(scaled_stored())
        scores = jnp.square(lengths[candidates.pairs[:, 0]] + lengths[candidates.pairs[:, 1]])
        error = allowance(factor, scores)
        exact, values = False, False
    elif factor.kind == "none":
        scores = scaled_norms()
        error = slack * scores
    elif factor.kind == "low" and bound_rank is not None:
        rank = min(bound_rank, factor.rows.shape[0])
        bound = bound_rows(factor, rank)
        norms = scaled_norms()
        products = candidates.dot(times_power_of_two(bound.T, -exponent))
        scores = norms - jnp.sum(products * products, axis=1)
        error = allowance(factor, norms)
        exact, values = False, rank == factor.rows.shape[0]
    else:
        scores = candidates.map_rows(lambda rows: jnp.sum(whiten(factor, sc.scaled(rows, candidates.dtype)) ** 2, axis=1))
        error = slack * scores
    scores = jnp.maximum(scores, 0.0)
    bad = jnp.sum(~jnp.isfinite(scores), dtype=jnp.int32)
    if candidates.pairs is not None:
        rows = candidates.features.shape[0]
        bad += jnp.sum((candidates.pairs < 0) | (candidates.pairs >= rows), dtype=jnp.int32)
    valid = jnp.isfinite(reg) & (reg > 0) & (comm.sum(bad) == 0)
    return Start(sc, factor, scores, error, valid, exact, values)
